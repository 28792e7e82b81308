#!/usr/bin/env bash
# The fleet on one machine, end to end: fleet-server (embedded MQTT broker, SQLite), two local
# edge agents enrolled from the bundles fleetctl writes, a signed sample model with its drift
# profile pushed and assigned, inference requests served by both agents (held-out digits on
# one, the same digits with a mean shift on the other), and what the agents report — health,
# telemetry, drift per device and per site — read back with fleetctl.
#
#   bash scripts/fleet-demo.sh            # DEMO_DIR=… to keep the files elsewhere,
#                                         # DRIFTGATE_BIN_DIR=… to use binaries built already
#
# Needs Rust and python3 (standard library only). Everything stops when the script ends;
# exits non-zero if any step does not behave as described.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${DEMO_DIR:-target/demo}
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq 1 $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $what" >&2
  return 1
}

# DRIFTGATE_BIN_DIR: use the binaries already there (CI runs the ones its tests built: a
# `cargo build -p …` resolves other dependency features than `cargo test --workspace` and
# would compile much of the workspace a second time).
if [ -n "${DRIFTGATE_BIN_DIR:-}" ]; then
  bin=$DRIFTGATE_BIN_DIR
  step "using fleet-server, fleetctl and edge-agent from $bin"
else
  step "building fleet-server, fleetctl and edge-agent"
  cargo build --quiet -p fleet-server -p edge-agent --bins
  bin="${CARGO_TARGET_DIR:-target}/debug"
fi
bin=$(cd "$bin" && pwd)
fleetctl="$bin/fleetctl"

step "1. a release key (offline), and digits-mlp v2 signed with its drift profile"
run "$fleetctl" keys gen --out "$work/keys"
cp models/digits-mlp/v2.onnx "$work/digits-mlp-v2.onnx"
run "$fleetctl" model sign "$work/digits-mlp-v2.onnx" --name digits-mlp --version v2 \
  --key "$work/keys/release.pem" --self-test models/digits-mlp/v2.selftest.json \
  --profile models/digits-mlp/v2.profile.json

step "2. the fleet server: embedded broker (mTLS), SQLite, REST API — its first start creates keys and the device CA"
"$bin/fleet-server" run --data-dir "$work/server" --api-listen 127.0.0.1:0 \
  --mqtt-listen 127.0.0.1:0 --release-key "$work/keys/release.pub" 2>"$work/server.log" &
pids+=($!)
wait_for "the server" 60 test -s "$work/server/endpoints.json"
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$work/server/endpoints.json")
sed -n '/fleet-server is running/,$p' "$work/server.log"
export DRIFTGATE_SERVER=$url
DRIFTGATE_TOKEN=$("$bin/fleet-server" token create --role admin --name demo --data-dir "$work/server")
export DRIFTGATE_TOKEN
echo "admin token in DRIFTGATE_TOKEN (fleet-server token create --role admin)"

step "3. two devices enrolled; each agent runs from its bundle as is"
ports=()
for dev in berlin paris; do
  port=$(free_port)
  ports+=("$port")
  run "$fleetctl" device enroll "dev-$dev" --label "site=$dev" --label hw=demo \
    --out "$work/dev-$dev" --api-listen "127.0.0.1:$port"
  "$bin/edge-agent" run --config "$work/dev-$dev/agent.toml" 2>"$work/dev-$dev.log" &
  pids+=($!)
done
wait_for "both devices online" 30 bash -c "\"$fleetctl\" device list | grep -c ' online ' | grep -qx 2"
run "$fleetctl" device list

step "4. push the model to the registry and assign it to both devices"
run "$fleetctl" model push "$work/digits-mlp-v2.onnx" --profile models/digits-mlp/v2.profile.json
run "$fleetctl" model list
for dev in berlin paris; do
  run "$fleetctl" device assign "dev-$dev" digits-mlp@v2
done

step "5. inference on the devices: held-out digits on dev-berlin, mean-shifted digits on dev-paris"
python3 - "${ports[0]}" models/data/digits/holdout.X.npy "${ports[1]}" models/data/digits/shift-mean.X.npy <<'PY'
import ast, json, struct, sys, time, urllib.request

def npy_rows(path):
    with open(path, "rb") as f:
        assert f.read(6) == b"\x93NUMPY"
        major = f.read(2)[0]
        n = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
        header = ast.literal_eval(f.read(n).decode())
        rows, cols = header["shape"]
        code = {"<f4": "f", "<f8": "d"}[header["descr"]]
        data = struct.unpack("<%d%s" % (rows * cols, code), f.read())
    return [list(data[i * cols:(i + 1) * cols]) for i in range(rows)]

def infer(port, rows):
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                   "shape": [len(rows), len(rows[0])],
                                   "data": [x for r in rows for x in r]}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits-mlp/infer", body,
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))

for port, path in [(sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])]:
    deadline = time.time() + 60
    while True:  # until the agent has installed and self-tested the model
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/digits-mlp/ready", timeout=2)
            break
        except Exception:
            if time.time() > deadline:
                sys.exit(f"the agent on port {port} never served digits-mlp")
            time.sleep(0.2)
    rows = npy_rows(path)
    served = 0
    for i in range(0, len(rows), 8):
        out = infer(port, rows[i:i + 8])
        served += len(rows[i:i + 8])
    print(f"port {port}: {served} rows from {path} served by {out['model_name']} {out['model_version']}")
PY

step "6. what the devices reported (telemetry every 10 s, drift windows of 256 rows)"
wait_for "telemetry from both devices" 40 bash -c "\"$fleetctl\" telemetry digits-mlp@v2 | grep -q 'on 2 devices'"
run "$fleetctl" telemetry digits-mlp@v2
wait_for "drift windows from both devices" 40 bash -c "\"$fleetctl\" drift digits-mlp@v2 | grep -c '^dev-.*  256 ' | grep -qx 2"
run "$fleetctl" drift digits-mlp@v2 --label site
# dev-paris got shifted rows: its merged windows must be flagged, dev-berlin's must not.
drift=$("$fleetctl" drift digits-mlp@v2)
grep -E '^dev-paris +256 .* DRIFT' <<<"$drift" >/dev/null || { echo "dev-paris's shift was not flagged"; exit 1; }
grep -E '^dev-berlin +256 .* ok' <<<"$drift" >/dev/null || { echo "dev-berlin was flagged without a shift"; exit 1; }
run "$fleetctl" device show dev-paris

step "done: the REST API is documented at $url/api/v1/openapi.json; files are in $work"
