#!/usr/bin/env bash
# The agent's tests on ARM, under qemu-user, without containers:
#   1. the smoke test natively: every sample model installed over a real broker into a real
#      agent and answered through its API; what it served is recorded;
#   2. per target, the agent crate's whole test suite built for that target and run under
#      qemu (unit tests, integration tests, and the smoke test again, now also comparing its
#      outputs with the native run's within each model's self-test tolerance);
#   3. when cross/build-release.sh has built the target's release binary, the native smoke
#      test once more, driving that binary under qemu (the shipped build, its idle memory).
#
# usage: cross/test-arm.sh [--build-only] [TARGET…]
#        (default: aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
#        extra arguments for the test binaries after `--`, e.g. `-- --test-threads=1`
#        --build-only: only build the tests for each target (CI builds them, niced, while the
#        x86_64 tests run, and runs this script again afterwards to run them)
#
# Needs what cross/install-host-toolchain.sh installs. Test binaries run under
# `qemu-<arch>-static -L <sysroot>` (cargo's runner; which sysroot is explained below), and the
# agent processes the tests start go through the same line (DRIFTGATE_TARGET_RUNNER), so no
# binfmt_misc registration is needed.
# With Docker or Podman, `CROSS_CONFIG=cross/Cross.toml cross test -p edge-agent --target …`
# runs the same suite in cross's images.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

targets=()
test_args=()
build_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; test_args=("$@"); break ;;
        --build-only) build_only=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "error: $*" >&2; exit 1; }

target_dir=${CARGO_TARGET_DIR:-$root/target}
debian_rustc=/usr/bin/rustc
reference="$target_dir/arm-smoke/native-outputs.json"
mkdir -p "$(dirname "$reference")"

# The native runs select the whole workspace (`--workspace --test smoke` still builds only the
# smoke test) so that dependencies get the features `cargo test --workspace` gave them and its
# build is reused; `-p edge-agent` alone would resolve other features and compile much again.
if [ "$build_only" = 0 ]; then
    step "smoke test, native ($(rustc -vV | sed -n 's/^host: //p')): the reference outputs"
    DRIFTGATE_SMOKE_OUTPUTS="$reference" cargo test --workspace --test smoke -- --nocapture
fi

for target in "${targets[@]}"; do
    case "$target" in
        aarch64-unknown-linux-gnu) qemu=qemu-aarch64-static; prefix=aarch64-linux-gnu; deb_arch=arm64; build_std=() ;;
        armv7-unknown-linux-gnueabihf) qemu=qemu-arm-static; prefix=arm-linux-gnueabihf; deb_arch=armhf; build_std=(-Zbuild-std) ;;
        *) fail "unsupported target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" ;;
    esac
    command -v "$qemu" >/dev/null || fail "$qemu not found: run cross/install-host-toolchain.sh"
    command -v "$prefix-gcc" >/dev/null || fail "$prefix-gcc not found: run cross/install-host-toolchain.sh"
    [ -x "$debian_rustc" ] || fail "$debian_rustc not found: run cross/install-host-toolchain.sh"
    upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
    lower=$(echo "$target" | tr '-' '_')
    # The guest's dynamic loader and libc must come from one glibc. libstd-rust-web-dev:arm64
    # brings Debian's multiarch libc6:arm64 into /lib/aarch64-linux-gnu, and qemu falls back to
    # host paths the prefix lacks: with `-L /usr/aarch64-linux-gnu` the loader of the cross
    # libc would then load the multiarch libc.so.6 of another build, and the first
    # pthread_create hangs. So the multiarch root when it is there, else the cross sysroot.
    sysroot=/usr/$prefix
    if dpkg-query -W -f '${Status}' "libc6:$deb_arch" 2>/dev/null | grep -q 'ok installed'; then
        sysroot=/
    fi
    runner="$qemu -L $sysroot"
    export "CARGO_TARGET_${upper}_LINKER=$prefix-gcc" "CARGO_TARGET_${upper}_RUNNER=$runner" \
        "CC_${lower}=$prefix-gcc" "AR_${lower}=$prefix-ar"

    # armv7's standard library is built from Debian's source, which needs -Z flags on stable.
    toolchain=(env RUSTC=$debian_rustc CARGO_TARGET_DIR="$target_dir/cross")
    [ ${#build_std[@]} -eq 0 ] || toolchain+=(RUSTC_BOOTSTRAP=1)

    step "$target: building the agent's tests with Debian's $($debian_rustc --version)"
    # --lib --bins --tests: every test but the doctests, which rustdoc (rustup's, another
    # version than Debian's rustc) cannot build for the target; they run natively anyway.
    "${toolchain[@]}" cargo test -p edge-agent --target "$target" "${build_std[@]}" --lib --bins --tests --no-run
    file -b "$target_dir/cross/$target/debug/edge-agent"
    [ "$build_only" = 0 ] || continue

    step "$target: the agent's tests under $runner"
    # One broker per test (Mosquitto when installed, which runs natively): the broker is not
    # what runs on ARM, and the tests that loop over brokers take twice as long under qemu.
    "${toolchain[@]}" DRIFTGATE_TARGET_RUNNER="$runner" DRIFTGATE_TEST_ONE_BROKER=1 \
        cargo test -p edge-agent --target "$target" "${build_std[@]}" --lib --bins --tests -- \
        --skip every_sample_model_serves_its_self_test_through_the_api "${test_args[@]}"

    step "$target: smoke test under $runner, against the native outputs"
    "${toolchain[@]}" DRIFTGATE_TARGET_RUNNER="$runner" DRIFTGATE_SMOKE_REFERENCE="$reference" \
        cargo test -p edge-agent --target "$target" "${build_std[@]}" --test smoke -- --nocapture

    release="$target_dir/cross/$target/release/edge-agent"
    if [ -x "$release" ]; then
        step "$target: the smoke test driving the release binary ($release) under $runner"
        DRIFTGATE_AGENT_BINARY="$release" DRIFTGATE_TARGET_RUNNER="$runner" DRIFTGATE_SMOKE_REFERENCE="$reference" \
            cargo test --workspace --test smoke -- --nocapture
    else
        echo "(no release binary at $release: cross/build-release.sh $target builds one)"
    fi
done
step "done: ${targets[*]}"
