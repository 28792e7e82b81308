#!/usr/bin/env bash
# Release artifacts of the device agent, per target:
#   dist/edge-agent-<version>-<target>.tar.gz   binary, sample config, systemd unit, README
#   dist/edge-agent_<version>-1_<arch>.deb      for the glibc targets (amd64, arm64, armhf)
#   dist/SHA256SUMS                             of every archive and package in dist/
#
# usage: cross/build-release.sh [--host-toolchain] [--profile NAME] [--binary PATH] [--out DIR] TARGET…
#        (no TARGET: x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
#
# How each target is built:
# - with `cross` (CROSS_CONFIG=cross/Cross.toml), when it is installed and Docker or Podman
#   answers, unless --host-toolchain;
# - otherwise with a host toolchain: the host's own target with cargo; another target with
#   rustup's standard library for it when installed (`rustup target add`), else Debian's:
#   `cross/install-host-toolchain.sh` installs rustc-web with libstd-rust-web-dev:arm64 for
#   aarch64, and rust-web-src for armv7, whose standard library is built with -Zbuild-std.
#   The static musl targets need cross or rustup's standard library.
# --profile picks another cargo profile than `release` (CI packages its `dev` build of the host
# target to check the .deb without a second optimised build; the package is the same but for
# the binary's size and speed).
# --binary packages an edge-agent built already, for the host target only (CI packages the one
# its tests ran against: `cargo build -p edge-agent` would resolve other dependency features
# than `cargo test --workspace` and compile much of the workspace again).
#
# Environment: CARGO_TARGET_DIR (default target/, and target/cross for Debian's rustc),
# SOURCE_DATE_EPOCH (default: the last commit's time) for reproducible archives.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

host_toolchain=0
profile=release
prebuilt=
out="$root/dist"
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --host-toolchain) host_toolchain=1 ;;
        --out) out=$(realpath -m "$2"); shift ;;
        --profile) profile=$2; shift ;;
        --binary) prebuilt=$(realpath -m "$2"); shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
fi

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { echo "error: $*" >&2; exit 1; }

version=$(cargo pkgid -p edge-agent | sed 's/.*[@#]//')
host=$(rustc -vV | sed -n 's/^host: //p')
if [ -n "$prebuilt" ]; then
    [ "${targets[*]}" = "$host" ] || fail "--binary packages the host target ($host) alone, not: ${targets[*]}"
    [ -x "$prebuilt" ] || fail "--binary $prebuilt is not an executable file"
fi
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
target_dir=${CARGO_TARGET_DIR:-$root/target}
debian_target_dir="$target_dir/cross"
profile_dir=$profile
[ "$profile" != dev ] || profile_dir=debug

# The Debian architecture of a glibc target (empty: no .deb), and its GNU tool prefix.
deb_arch() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo amd64 ;;
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        *) echo "" ;;
    esac
}
gnu_prefix() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo x86_64-linux-gnu ;;
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        x86_64-unknown-linux-musl) echo x86_64-linux-musl ;;
        aarch64-unknown-linux-musl) echo aarch64-linux-musl ;;
        *) fail "unsupported target $1 (supported: the five in cross/Cross.toml)" ;;
    esac
}

can_use_cross() {
    [ "$host_toolchain" = 0 ] || return 1
    command -v cross >/dev/null || return 1
    { command -v docker >/dev/null && docker info >/dev/null 2>&1; } ||
        { command -v podman >/dev/null && podman info >/dev/null 2>&1; }
}

rustup_has_target() {
    command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx "$1"
}

# Cargo's per-target environment for a cross linker and C compiler named PREFIX-gcc.
cross_env() {
    local target=$1 prefix=$2 upper lower
    upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
    lower=$(echo "$target" | tr '-' '_')
    command -v "$prefix-gcc" >/dev/null ||
        fail "$target needs the C cross compiler $prefix-gcc (cross/install-host-toolchain.sh installs it)"
    export "CARGO_TARGET_${upper}_LINKER=$prefix-gcc" "CC_${lower}=$prefix-gcc" "AR_${lower}=$prefix-ar"
}

# Builds TARGET; prints the path of the binary on the last line.
build() {
    local target=$1
    if [ -n "$prebuilt" ]; then
        step "$target: packaging $prebuilt (built already)"
        echo "$prebuilt"
        return
    fi
    if can_use_cross; then
        step "$target: cross build (container)"
        CROSS_CONFIG="$root/cross/Cross.toml" cross build -p edge-agent --profile "$profile" --target "$target" >&2
        echo "$target_dir/$target/$profile_dir/edge-agent"
        return
    fi
    if [ "$target" = "$host" ]; then
        # Without --target: the same build as `cargo build` (and the tests') in target/.
        step "$target: cargo build with $(rustc --version)"
        cargo build -p edge-agent --profile "$profile" >&2
        echo "$target_dir/$profile_dir/edge-agent"
        return
    fi
    if rustup_has_target "$target"; then
        step "$target: cargo build with $(rustc --version)"
        cross_env "$target" "$(gnu_prefix "$target")"
        cargo build -p edge-agent --profile "$profile" --target "$target" >&2
        echo "$target_dir/$target/$profile_dir/edge-agent"
        return
    fi
    local debian_rustc=/usr/bin/rustc
    case "$target" in
        aarch64-unknown-linux-gnu)
            [ -x "$debian_rustc" ] && [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib ] ||
                fail "$target: no standard library for it: install cross and Docker/Podman, run 'rustup target add $target', or on Debian run cross/install-host-toolchain.sh"
            step "$target: cargo build with Debian's $($debian_rustc --version)"
            cross_env "$target" aarch64-linux-gnu
            RUSTC=$debian_rustc CARGO_TARGET_DIR=$debian_target_dir \
                cargo build -p edge-agent --profile "$profile" --target "$target" >&2
            ;;
        armv7-unknown-linux-gnueabihf)
            [ -x "$debian_rustc" ] && [ -d /usr/lib/rustlib/src/rust/library ] ||
                fail "$target: no standard library for it: install cross and Docker/Podman, run 'rustup target add $target', or on Debian run cross/install-host-toolchain.sh"
            step "$target: cargo build -Zbuild-std with Debian's $($debian_rustc --version)"
            cross_env "$target" arm-linux-gnueabihf
            # Debian ships no armhf standard library for rustc-web; its source builds one.
            RUSTC_BOOTSTRAP=1 RUSTC=$debian_rustc CARGO_TARGET_DIR=$debian_target_dir \
                cargo build -p edge-agent --profile "$profile" --target "$target" -Zbuild-std=std,panic_abort >&2
            ;;
        *)
            fail "$target: needs cross with Docker or Podman, or 'rustup target add $target' (and a $(gnu_prefix "$target")-gcc)"
            ;;
    esac
    echo "$debian_target_dir/$target/$profile_dir/edge-agent"
}

# The newest glibc symbol version BINARY needs (empty for a static binary).
glibc_needed() {
    readelf -W --dyn-syms "$1" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1
}

archive() {
    local target=$1 binary=$2 name stage
    name="edge-agent-$version-$target"
    stage="$out/.stage/$name"
    rm -rf "$stage" && mkdir -p "$stage"
    install -m 0755 "$binary" "$stage/edge-agent"
    install -m 0644 cross/package/agent.toml cross/package/edge-agent.service cross/package/README.md "$stage/"
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        -C "$out/.stage" -cf - "$name" | gzip -9n > "$out/$name.tar.gz"
    echo "$out/$name.tar.gz"
}

debian_package() {
    local target=$1 binary=$2 arch=$3 stage glibc depends file
    stage="$out/.stage/deb-$arch"
    rm -rf "$stage"
    mkdir -p "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
        "$stage/etc/driftgate" "$stage/usr/share/doc/edge-agent"
    install -m 0755 "$binary" "$stage/usr/bin/edge-agent"
    install -m 0644 cross/package/edge-agent.service "$stage/lib/systemd/system/"
    install -m 0644 cross/package/agent.toml "$stage/etc/driftgate/agent.toml"
    install -m 0644 cross/package/README.md cross/package/debian/copyright "$stage/usr/share/doc/edge-agent/"
    install -m 0755 cross/package/debian/postinst cross/package/debian/prerm cross/package/debian/postrm "$stage/DEBIAN/"
    echo /etc/driftgate/agent.toml > "$stage/DEBIAN/conffiles"
    glibc=$(glibc_needed "$binary")
    depends="adduser"
    [ -z "$glibc" ] || depends="libc6 (>= $glibc), $depends"
    cat > "$stage/DEBIAN/control" <<EOF
Package: edge-agent
Version: $version-1
Architecture: $arch
Maintainer: Driftgate maintainers <maintainers@driftgate.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $depends
Section: net
Priority: optional
Homepage: https://github.com/driftgate/driftgate
Description: Driftgate edge agent: signed model delivery and local inference
 Installs signed ONNX model versions that arrive over MQTT, runs them locally
 with tract behind the Open Inference Protocol (KServe v2) HTTP API, buffers
 telemetry, drift figures and sampled inputs on disk until the fleet server
 has them, and rolls back on its own when a new version misbehaves.
 .
 Runs as a hardened systemd service under its own user (driftgate).
EOF
    (cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
    find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    file="$out/edge-agent_${version}-1_${arch}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$file" >/dev/null
    echo "$file"
}

command -v dpkg-deb >/dev/null || echo "note: dpkg-deb not found: no .deb packages (apt-get install dpkg-dev)" >&2
mkdir -p "$out"
summary=()
for target in "${targets[@]}"; do
    gnu_prefix "$target" >/dev/null
    binary=$(build "$target" | tail -n 1)
    [ -x "$binary" ] || fail "$target: the build left no binary at $binary"
    # The release profile strips already; another profile's binary (CI's dev build: 450 MB of
    # debug info) is stripped on a copy, with the target's own strip when there is one.
    if file -b "$binary" | grep -q 'not stripped'; then
        strip_tool=$(gnu_prefix "$target")-strip
        command -v "$strip_tool" >/dev/null || strip_tool=strip
        mkdir -p "$out/.stage/bin-$target"
        "$strip_tool" -o "$out/.stage/bin-$target/edge-agent" "$binary"
        binary="$out/.stage/bin-$target/edge-agent"
    fi
    step "$target: package"
    file -b "$binary" | sed 's/^/    /'
    size=$(stat -c %s "$binary")
    glibc=$(glibc_needed "$binary")
    needs="no libc (static)"
    [ -z "$glibc" ] || needs="glibc >= $glibc"
    printf '    stripped size: %s bytes (%s MiB); needs %s\n' "$size" \
        "$(awk "BEGIN { printf \"%.1f\", $size / 1048576 }")" "$needs"
    tarball=$(archive "$target" "$binary")
    echo "    $tarball"
    arch=$(deb_arch "$target")
    deb=""
    if [ -n "$arch" ] && command -v dpkg-deb >/dev/null; then
        deb=$(debian_package "$target" "$binary" "$arch")
        echo "    $deb"
    fi
    summary+=("$(printf '%-32s %10s  %s' "$target" "$size" "$(basename "$tarball")${deb:+ $(basename "$deb")}")")
done
rm -rf "$out/.stage"

step "checksums: $out/SHA256SUMS"
(cd "$out" && sha256sum -- *.tar.gz $(ls -- *.deb 2>/dev/null) > SHA256SUMS && cat SHA256SUMS)

step "built"
printf '%-32s %10s  %s\n' target "bytes" artifacts
printf '%s\n' "${summary[@]}"
