#!/usr/bin/env bash
# Installs, on Debian 12 (bookworm), what cross/build-release.sh and cross/test-arm.sh need to
# build and test the ARM agents without containers:
# - rustc-web 1.96 (bookworm-security) with libstd-rust-web-dev:arm64: aarch64's standard library;
# - rust-web-src: the standard library's source, built for armv7 with -Zbuild-std;
# - the GNU cross compilers (linkers, and C for SQLite, ring and tract's kernels);
# - qemu-user-static, to run the results; file, for the architecture check; dpkg-dev.
# Needs root. The host's rustup toolchain stays the default; only the scripts use /usr/bin/rustc.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi
# A mirror mid-sync fails an index now and then: try again before giving up.
for attempt in 1 2 3; do
    apt-get update -qq && break
    [ "$attempt" -lt 3 ] || exit 1
    sleep 20
done
apt-get install -y -qq --no-install-recommends \
    rustc-web libstd-rust-web-dev:arm64 rust-web-src \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
    qemu-user-static file dpkg-dev >/dev/null
/usr/bin/rustc --version
qemu-aarch64-static --version | head -n 1
