#!/usr/bin/env bash
# The release side of Driftgate's chain of trust, end to end, on the sample models:
# make a release key, sign every model's manifest, verify each one (signature, size, sha256,
# self-test with tract), then show that a flipped byte and a foreign key are both refused.
# Exits non-zero if anything does not behave as described.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${WALKTHROUGH_DIR:-target/walkthrough}
rm -rf "$work"
mkdir -p "$work/models"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# DRIFTGATE_BIN_DIR: use the fleetctl already there (as scripts/fleet-demo.sh explains).
if [ -n "${DRIFTGATE_BIN_DIR:-}" ]; then
  fleetctl="$DRIFTGATE_BIN_DIR/fleetctl"
  step "using $fleetctl"
else
  step "building fleetctl"
  cargo build --quiet -p fleet-server --bin fleetctl
  fleetctl="${CARGO_TARGET_DIR:-target}/debug/fleetctl"
fi

step "1. a release key (offline) and, for contrast, a stranger's key"
run "$fleetctl" keys gen --out "$work/keys"
run "$fleetctl" keys gen --out "$work/stranger" >/dev/null

step "2. sign every sample model (signature read with tract, self-test from onnxruntime's outputs)"
for model in models/*/*.onnx; do
  name=$(basename "$(dirname "$model")")
  version=$(basename "$model" .onnx)
  copy="$work/models/$name-$version.onnx"
  cp "$model" "$copy"
  run "$fleetctl" model sign "$copy" --name "$name" --version "$version" \
    --key "$work/keys/release.pem" --self-test "${model%.onnx}.selftest.json"
done

step "3. verify each one as a device would: signature, size, sha256, then the self-test"
for copy in "$work"/models/*.onnx; do
  run "$fleetctl" model verify "$copy" --pubkey "$work/keys/release.pub" --self-test | tail -n 1
done

step "4. a model with one flipped byte is refused"
tampered="$work/models/digits-mlp-v2.onnx"
python3 - "$tampered" <<'PY'
import sys
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
data[len(data) // 2] ^= 1
open(path, "wb").write(data)
PY
if out=$("$fleetctl" model verify "$tampered" --pubkey "$work/keys/release.pub" 2>&1); then
  echo "UNEXPECTED: a tampered model verified"; exit 1
fi
echo "$out"
grep -q "hash mismatch" <<<"$out"

step "5. a manifest checked against a key the device does not trust is refused"
if out=$("$fleetctl" model verify "$work/models/wine-forest-v1.onnx" --pubkey "$work/stranger/release.pub" 2>&1); then
  echo "UNEXPECTED: verified with an untrusted key"; exit 1
fi
echo "$out"
grep -q "unknown key" <<<"$out"

step "done: every model signed and verified; tampering and foreign keys refused (files in $work)"
