#!/usr/bin/env bash
# Checks an edge-agent .deb: its metadata and contents always; and when it is for this
# machine's architecture (and we are root), that it really installs: `dpkg -i`, the system
# user it creates, the binary and sample configuration as that user, `systemd-analyze verify`
# on the installed unit, then `dpkg --purge`. Leaves the machine as it found it, but for the
# driftgate user (Debian keeps system users).
#
# usage: cross/check-deb.sh dist/edge-agent_<version>-1_<arch>.deb…
set -euo pipefail

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "error: $*" >&2; exit 1; }

[ $# -gt 0 ] || fail "usage: $0 PACKAGE.deb…"
host_arch=$(dpkg --print-architecture)

for deb in "$@"; do
    [ -f "$deb" ] || fail "$deb: no such file"
    step "$deb"
    dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
    arch=$(dpkg-deb --field "$deb" Architecture)
    contents=$(dpkg-deb --contents "$deb")
    echo "$contents"
    for path in ./usr/bin/edge-agent ./lib/systemd/system/edge-agent.service ./etc/driftgate/agent.toml \
        ./usr/share/doc/edge-agent/README.md ./usr/share/doc/edge-agent/copyright; do
        grep -q " $path\$" <<< "$contents" || fail "$deb lacks $path"
    done
    echo "$contents" | grep -v '^d' | awk '{ print $2 }' | grep -qvx 'root/root' &&
        fail "$deb has files not owned by root"
    [ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = /etc/driftgate/agent.toml ] ||
        fail "$deb: agent.toml is not a conffile"

    if [ "$arch" != "$host_arch" ]; then
        echo "(not installed: $arch is not this machine's $host_arch)"
        continue
    fi
    [ "$(id -u)" = 0 ] || fail "installing $deb needs root"
    dpkg -s edge-agent >/dev/null 2>&1 && fail "edge-agent is already installed here; remove it first"

    step "dpkg -i $deb"
    dpkg -i "$deb"
    trap 'dpkg --purge edge-agent >/dev/null 2>&1 || true' EXIT

    step "the driftgate system user and the configuration's owner"
    entry=$(getent passwd driftgate) || fail "no driftgate user after install"
    echo "$entry"
    uid=$(cut -d: -f3 <<< "$entry")
    [ "$uid" -lt 1000 ] || fail "driftgate is not a system user (uid $uid)"
    [ "$(cut -d: -f7 <<< "$entry")" = /usr/sbin/nologin ] || fail "driftgate has a login shell"
    stat -c '%U:%G %a %n' /etc/driftgate /etc/driftgate/agent.toml
    [ "$(stat -c '%U:%G %a' /etc/driftgate)" = "root:driftgate 750" ] || fail "/etc/driftgate owner or mode"
    [ "$(stat -c '%U:%G %a' /etc/driftgate/agent.toml)" = "root:driftgate 640" ] || fail "agent.toml owner or mode"

    step "the binary, and the sample configuration read as driftgate"
    /usr/bin/edge-agent --version
    setpriv --reuid=driftgate --regid=driftgate --init-groups \
        /usr/bin/edge-agent check-config --config /etc/driftgate/agent.toml | head -n 5

    step "systemd-analyze verify /lib/systemd/system/edge-agent.service"
    # Any finding is printed to stderr: the unit must produce none.
    findings=$(systemd-analyze verify /lib/systemd/system/edge-agent.service 2>&1) ||
        fail "systemd-analyze verify refused the unit: $findings"
    if grep -i 'edge-agent' <<< "$findings"; then
        fail "systemd-analyze verify has findings about the unit"
    fi
    echo "accepted${findings:+ (about other units: $findings)}"
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
        systemd-analyze security --offline=true /lib/systemd/system/edge-agent.service 2>/dev/null |
            tail -n 1 || true
    fi

    step "dpkg --purge edge-agent"
    dpkg --purge edge-agent
    trap - EXIT
    [ ! -e /usr/bin/edge-agent ] && [ ! -e /lib/systemd/system/edge-agent.service ] &&
        [ ! -e /etc/driftgate/agent.toml ] || fail "files left after purge"
    echo "removed; the driftgate user stays, as Debian keeps system users"
done
step "every package checked"
