#!/usr/bin/env bash
# The package install test (issue 9), run by scripts/test.sh; needs root.
#
# Builds the .deb and .rpm files from the debug binaries (no release build: CI has 2 cores), then
# in a clean Debian 12 root (debootstrap minbase + systemd + dbus, cached as a tarball):
#   - installs kvfleet-agent and checks files, the kvfleet user and groups, directories, the
#     config file's owner and mode, the conffile, the enabled-but-not-started unit,
#     `systemd-analyze verify` against that root and `kvfleet-agent check-config` on the default;
#   - runs the packaged agent as kvfleet against the root's own dbus-daemon --system: the
#     packaged D-Bus policy lets it own org.kvfleet.Agent, lets anyone read Status and only root
#     Drain;
#   - edits the config, reinstalls the same package and upgrades to a newer version: edit kept;
#   - installs kvfleet-controlplane (+ the kvfleet CLI); boots the root with systemd-nspawn
#     and starts both units for real (Type=notify readiness, HTTP answers, the sandbox seen in
#     /proc, journald fields, an upgrade restarting the running agent, a clean stop), the
#     control plane on the test PostgreSQL cluster, and a chat completion from the real model
#     (SmolLM2 on a CPU worker) when KVFLEET_SMOLLM2_GGUF is set (scripts/test.sh sets it);
#     then the agent joins the control plane with a join token, and a deployment applied with
#     the packaged kvfleet CLI is served by the agent (the guide's first deployment and request);
#   - removes and purges the agent (the shared user and state stay while the control plane is
#     there), purges the control plane: state, cache, logs, /etc/kvfleet, the user and the unit
#     links are gone;
#   - installs and erases the .rpm in the same root with rpm --root (its scriptlets for real);
# and on the host: lintian (no errors), `systemd-analyze security` exposure, and the .rpm's
# file list, config files, modes and scriptlets against the .deb's.
#
# Environment:
#   KVFLEET_PACKAGING_NO_BUILD=1  package target/debug as it is (no cargo build first)
#   KVFLEET_TEST_ROOT_CACHE       cached root tarball (default /var/cache/kvfleet-test/...)
#   KVFLEET_DEBIAN_MIRROR         default http://deb.debian.org/debian
#   KVFLEET_TEST_ROOT=overlay     use the fallback root below even when debootstrap works
# Without debootstrap (or without the network on the first run) the root is an overlay of the
# host's own file system instead (a Debian 12 host), and the test says so.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

started=$(date +%s)
skip() { printf 'SKIP packaging/test-install.sh: %s\n' "$*" >&2; exit 0; }
fail() { printf 'FAIL packaging/test-install.sh: %s\n' "$*" >&2; exit 1; }
ok() { printf '  ok  %s\n' "$*" >&2; }
step() { log "install test: $*"; }

[ "$(id -u)" = 0 ] || skip "needs root (dpkg and rpm into a throwaway root, chroot)"
command -v dpkg >/dev/null || skip "not a Debian host (no dpkg)"

apt_install lintian rpm debootstrap systemd systemd-container || log "could not install every tool; going on with what is there"
command -v lintian >/dev/null || fail "lintian is missing"
command -v rpm >/dev/null || fail "rpm is missing"

# ---------------------------------------------------------------------------------------------
step "building the packages from the debug binaries"
if [ "${KVFLEET_PACKAGING_NO_BUILD:-0}" != 1 ]; then
    cargo build --quiet -p kvfleet-agent -p kvfleet-controlplane -p kvfleet --bins
fi
out="$(pwd)/target/kvfleet-packaging/test-out"
rm -rf "$out"
packaging/build.sh --profile dev --no-build --fast --out "$out"
version="$(dpkg-deb -f "$out"/kvfleet-agent_*.deb Version)"
agent_deb="$out/kvfleet-agent_${version}_amd64.deb"
cp_deb="$out/kvfleet-controlplane_${version}_amd64.deb"
agent_rpm="$(ls "$out"/kvfleet-agent-*.rpm)"
cp_rpm="$(ls "$out"/kvfleet-controlplane-*.rpm)"
for f in "$agent_deb" "$cp_deb" "$agent_rpm" "$cp_rpm"; do [ -f "$f" ] || fail "$f was not built"; done
ok "built $(cd "$out" && echo kvfleet-*)"

# ---------------------------------------------------------------------------------------------
step "lintian"
lintian_out="$(lintian --fail-on none "$agent_deb" "$cp_deb" 2>/dev/null)"
printf '%s\n' "$lintian_out" | sed 's/^/    /' >&2
if grep -q '^E:' <<<"$lintian_out"; then fail "lintian reports errors"; fi
ok "lintian: no errors ($(grep -c '^W:' <<<"$lintian_out" || true) warnings)"

step "systemd-analyze security (exposure, lower is better)"
for unit in systemd/kvfleet-agent.service systemd/kvfleet-controlplane.service; do
    exposure="$(systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n 1)"
    printf '    %s\n' "$exposure" >&2
    case "$exposure" in
        *" OK "* | *" SAFE "* | *" OK" | *" SAFE") ;;
        *) fail "$unit: exposure is worse than OK: $exposure" ;;
    esac
done

# ---------------------------------------------------------------------------------------------
step "a clean Debian 12 root"
work="$(mktemp -d /var/tmp/kvfleet-install-test.XXXXXX)"
root="$work/root"
overlay=0
# The root lives in memory: deleting a used root from this disk took 20 s, unmounting takes none.
tmpfs=0
if mount -t tmpfs -o size=3g,mode=0755 kvfleet-install-test "$work" 2>/dev/null; then tmpfs=1; fi
proc_mounted=0
agent_pid=
dbus_pid=
cleanup() {
    if [ -n "$agent_pid" ]; then kill -KILL "$agent_pid" 2>/dev/null || true; fi
    if [ -n "$dbus_pid" ]; then kill -TERM "$dbus_pid" 2>/dev/null || true; fi
    if [ "$proc_mounted" = 1 ]; then umount "$root/proc" 2>/dev/null || umount -l "$root/proc" 2>/dev/null || true; fi
    if [ "$overlay" = 1 ]; then umount "$root" 2>/dev/null || umount -l "$root" 2>/dev/null || true; fi
    if [ "$tmpfs" = 1 ]; then umount "$work" 2>/dev/null || umount -l "$work" 2>/dev/null || true; fi
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

cache="${KVFLEET_TEST_ROOT_CACHE:-/var/cache/kvfleet-test/debian-bookworm-minbase-systemd.tar}"
mirror="${KVFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [ "${KVFLEET_TEST_ROOT:-}" = overlay ]; then
    cache=/nonexistent
elif [ ! -f "$cache" ] && command -v debootstrap >/dev/null; then
    log "debootstrap --variant=minbase bookworm (once; cached in $cache)"
    if debootstrap --variant=minbase --include=systemd,dbus bookworm "$work/fresh" "$mirror" \
        >"$work/debootstrap.log" 2>&1; then
        mkdir -p "$(dirname "$cache")"
        tar -C "$work/fresh" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
        rm -rf --one-file-system "$work/fresh"
    else
        log "debootstrap failed (last lines below); falling back to an overlay of this host"
        tail -n 5 "$work/debootstrap.log" >&2
    fi
fi
mkdir -p "$root"
if [ -f "$cache" ]; then
    tar -C "$root" -xf "$cache"
    ok "root from $cache (debootstrap minbase bookworm + systemd, dbus)"
else
    grep -q '^VERSION_ID="12"' /etc/os-release || skip "no debootstrap root and the host is not Debian 12"
    mkdir -p "$work/upper" "$work/overlay-work"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/overlay-work" "$root" ||
        skip "neither debootstrap nor an overlay mount is possible here"
    overlay=1
    for pkg in kvfleet-agent kvfleet-controlplane; do
        if chroot "$root" dpkg-query -W "$pkg" >/dev/null 2>&1; then skip "$pkg is installed on this host"; fi
    done
    getent passwd kvfleet >/dev/null && skip "the host has a kvfleet user already"
    log "FALLBACK: the root is an overlay of this host's own Debian 12 system, not a debootstrap root"
fi
mkdir -p "$root/tmp/pkgs"
cp "$agent_deb" "$cp_deb" "$agent_rpm" "$cp_rpm" "$root/tmp/pkgs/"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }

# dpkg_install DEB...: dpkg -i, then apt-get -f install if dependencies were missing.
dpkg_install() {
    local args=()
    for deb in "$@"; do args+=("/tmp/pkgs/$(basename "$deb")"); done
    if ! in_root dpkg -i --force-confold "${args[@]}" >"$work/dpkg.log" 2>&1; then
        log "dpkg -i failed; trying apt-get -f install for missing dependencies"
        cat "$work/dpkg.log" >&2
        cp /etc/resolv.conf "$root/etc/resolv.conf"
        if ! { in_root apt-get update -qq && in_root apt-get -f install -y -qq >&2; }; then
            fail "dpkg -i ${args[*]} failed"
        fi
    fi
}
status_of() { in_root dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || echo not-installed; }
assert() { local what="$1"; shift; if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi; }
assert_not() { local what="$1"; shift; if "$@" >/dev/null; then fail "$what"; else ok "$what"; fi; }
mode_owner() { in_root stat -c '%a %U:%G' "$1"; }
wants() { echo "$root/etc/systemd/system/multi-user.target.wants/$1"; }

# ---------------------------------------------------------------------------------------------
step "dpkg -i kvfleet-agent"
dpkg_install "$agent_deb"
assert "kvfleet-agent is installed" [ "$(status_of kvfleet-agent)" = installed ]
for f in /usr/bin/kvfleet-agent /usr/lib/systemd/system/kvfleet-agent.service \
    /usr/share/dbus-1/system.d/org.kvfleet.Agent.conf /etc/kvfleet/agent.toml; do
    assert "$f is there" [ -f "$root$f" ]
done
assert "the kvfleet-agent system user exists" in_root getent passwd kvfleet-agent
assert_not "no shared kvfleet user is made" in_root getent passwd kvfleet
uid="$(in_root id -u kvfleet-agent)"
assert "kvfleet-agent is a system user (uid $uid < 1000)" [ "$uid" -lt 1000 ]
assert "kvfleet-agent has no login shell" [ "$(in_root getent passwd kvfleet-agent | cut -d: -f7)" = /usr/sbin/nologin ]
assert "kvfleet-agent is in the video group" sh -c "chroot '$root' id -nG kvfleet-agent | grep -qw video"
assert "/var/lib/kvfleet is root's, 0755 (the parent of both services' directories)" [ "$(mode_owner /var/lib/kvfleet)" = "755 root:root" ]
for d in /var/lib/kvfleet/agent /var/cache/kvfleet; do
    assert "$d is kvfleet-agent's, 0750" [ "$(mode_owner "$d")" = "750 kvfleet-agent:kvfleet-agent" ]
done
assert "agent.toml is root:kvfleet-agent 0640" [ "$(mode_owner /etc/kvfleet/agent.toml)" = "640 root:kvfleet-agent" ]
assert "agent.toml is a conffile" sh -c "chroot '$root' dpkg-query -W -f='\${Conffiles}' kvfleet-agent | grep -q ' /etc/kvfleet/agent.toml '"
assert "the unit is enabled" [ -L "$(wants kvfleet-agent.service)" ]
assert_not "the maintainer scripts never start the unit" \
    grep -Eq 'deb-systemd-invoke (start|restart) |systemctl (start|restart) ' "$root/var/lib/dpkg/info/kvfleet-agent.postinst"
assert "kvfleet-agent check-config accepts the shipped default" in_root kvfleet-agent check-config /etc/kvfleet/agent.toml
# The root has systemd: verify finds the binaries, the user and the targets in it.
verify="$(systemd-analyze verify --root="$root" kvfleet-agent.service 2>&1)" || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify kvfleet-agent.service is not clean: $verify"
ok "systemd-analyze verify --root kvfleet-agent.service: clean"

step "edited config survives a reinstall and an upgrade"
sed -i 's/^listen = "127.0.0.1:8000"/listen = "127.0.0.1:8100"   # edited by the install test/' "$root/etc/kvfleet/agent.toml"
grep -q 'edited by the install test' "$root/etc/kvfleet/agent.toml" || fail "could not edit agent.toml (is frontend.listen still 127.0.0.1:8000?)"
echo "state that must survive upgrades" >"$root/var/lib/kvfleet/agent/marker"
dpkg_install "$agent_deb"
assert "reinstall: the edit is kept" grep -q 'edited by the install test' "$root/etc/kvfleet/agent.toml"
# A newer version: the same package with its version bumped.
bumped="${version}+upgradetest"
dpkg-deb -R "$agent_deb" "$work/repack"
sed -i "s/^Version: .*/Version: $bumped/" "$work/repack/DEBIAN/control"
dpkg-deb -Zgzip -z1 -b "$work/repack" "$root/tmp/pkgs/kvfleet-agent_upgrade.deb" >/dev/null
dpkg_install "$root/tmp/pkgs/kvfleet-agent_upgrade.deb"
assert "upgrade: now at $bumped" [ "$(in_root dpkg-query -W -f='${Version}' kvfleet-agent)" = "$bumped" ]
assert "upgrade: the edit is kept" grep -q 'edited by the install test' "$root/etc/kvfleet/agent.toml"
assert "upgrade: still root:kvfleet-agent 0640" [ "$(mode_owner /etc/kvfleet/agent.toml)" = "640 root:kvfleet-agent" ]
assert "upgrade: state kept" [ -f "$root/var/lib/kvfleet/agent/marker" ]
assert "upgrade: still enabled" [ -L "$(wants kvfleet-agent.service)" ]
assert "kvfleet-agent check-config accepts the edited file" in_root kvfleet-agent check-config /etc/kvfleet/agent.toml

step "the packaged agent runs as kvfleet-agent on a system bus with the packaged D-Bus policy"
# What the unit does, by hand (no systemd as PID 1 here): user kvfleet-agent with its groups, the
# runtime directory, journald's environment (no terminal: NO_COLOR), the system bus at its
# usual address, run by dbus-daemon --system from the root with our policy file in system.d.
mount -t proc proc "$root/proc"
proc_mounted=1
mkdir -p "$root/run/dbus" "$root/run/kvfleet"
in_root chown kvfleet-agent:kvfleet-agent /run/kvfleet
in_root dbus-daemon --system --fork >/dev/null || fail "dbus-daemon --system does not start with the policy installed"
dbus_pid="$(cat "$root/run/dbus/pid")"
kv_uid="$(in_root id -u kvfleet-agent)"
kv_gid="$(in_root id -g kvfleet-agent)"
kv_gids="$(in_root id -G kvfleet-agent | tr ' ' ',')"
chroot --userspec="$kv_uid:$kv_gid" --groups="$kv_gids" "$root" env -i PATH=/usr/bin:/bin NO_COLOR=1 \
    kvfleet-agent run --config /etc/kvfleet/agent.toml --listen 127.0.0.1:0 >"$work/agent.log" 2>&1 &
agent_pid=$!
busctl_as() { local user="$1"; shift; chroot --userspec="$(in_root id -u "$user"):$(in_root id -g "$user")" "$root" env -i PATH=/usr/bin:/bin busctl --system "$@"; }
ready=0
for _ in $(seq 1 100); do
    status="$(busctl_as nobody call org.kvfleet.Agent /org/kvfleet/Agent org.kvfleet.Agent1 Status 2>/dev/null || true)"
    if grep -q '\\"ready\\":true' <<<"$status"; then
        ready=1
        break
    fi
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.2
done
[ "$ready" = 1 ] || { cat "$work/agent.log" >&2; fail "the agent did not become ready on the bus"; }
ok "kvfleet-agent (user kvfleet-agent, shipped config) owns org.kvfleet.Agent and is ready"
assert "anyone may read Status and the Ready property" busctl_as nobody get-property org.kvfleet.Agent /org/kvfleet/Agent org.kvfleet.Agent1 Ready
denied="$(busctl_as nobody call org.kvfleet.Agent /org/kvfleet/Agent org.kvfleet.Agent1 Drain 2>&1 || true)"
assert "others may not Drain (policy: $denied)" grep -q 'Access denied' <<<"$denied"
assert "root may Drain" busctl_as root call org.kvfleet.Agent /org/kvfleet/Agent org.kvfleet.Agent1 Drain
assert "the agent is draining" sh -c "chroot '$root' busctl --system call org.kvfleet.Agent /org/kvfleet/Agent org.kvfleet.Agent1 Status | grep -q 'draining[^,]*:true'"
denied="$(busctl_as nobody call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus RequestName su org.kvfleet.Agent 0 2>&1 || true)"
assert "others may not own org.kvfleet.Agent ($denied)" grep -q 'Access denied' <<<"$denied"
assert_not "no ANSI colour codes in the log (journald is no terminal)" grep -q $'\e\\[' "$work/agent.log"
kill -TERM "$agent_pid"
wait "$agent_pid" || { agent_pid=; fail "the agent did not exit cleanly on SIGTERM: $(tail -n 5 "$work/agent.log")"; }
agent_pid=
ok "SIGTERM: the agent drained and exited 0"
kill -TERM "$dbus_pid"
dbus_pid=
umount "$root/proc"
proc_mounted=0

step "dpkg -i kvfleet-controlplane (over what a version with the shared kvfleet user left)"
# An older control plane ran as the shared user kvfleet and kept its CA sealing key and the first
# admin token's file in /var/lib/kvfleet; the package moves them into its own directory.
in_root groupadd --system kvfleet
in_root useradd --system --gid kvfleet --no-create-home --home-dir /var/lib/kvfleet --shell /usr/sbin/nologin kvfleet
(umask 077 && echo "legacy sealing key" >"$root/var/lib/kvfleet/controlplane-ca.key" &&
    echo "legacy admin token" >"$root/var/lib/kvfleet/controlplane-admin-token")
in_root chown kvfleet:kvfleet /var/lib/kvfleet/controlplane-ca.key /var/lib/kvfleet/controlplane-admin-token
dpkg_install "$cp_deb"
assert "the kvfleet-cp system user exists" in_root getent passwd kvfleet-cp
assert "kvfleet-cp is a system user" [ "$(in_root id -u kvfleet-cp)" -lt 1000 ]
assert "kvfleet-cp has no login shell" [ "$(in_root getent passwd kvfleet-cp | cut -d: -f7)" = /usr/sbin/nologin ]
assert_not "kvfleet-cp is not in the agent's group" sh -c "chroot '$root' id -nG kvfleet-cp | grep -qw kvfleet-agent"
assert_not "kvfleet-agent is not in the control plane's group" sh -c "chroot '$root' id -nG kvfleet-agent | grep -qw kvfleet-cp"
assert "/var/lib/kvfleet/controlplane is kvfleet-cp's, 0750" [ "$(mode_owner /var/lib/kvfleet/controlplane)" = "750 kvfleet-cp:kvfleet-cp" ]
assert "upgrade from the shared user: the CA sealing key moved into it, kvfleet-cp's, 0600" \
    [ "$(mode_owner /var/lib/kvfleet/controlplane/ca.key)" = "600 kvfleet-cp:kvfleet-cp" ]
assert "upgrade from the shared user: the admin token file too" \
    [ "$(mode_owner /var/lib/kvfleet/controlplane/admin-token)" = "600 kvfleet-cp:kvfleet-cp" ]
assert "upgrade from the shared user: a link at the old path (a config naming it still works)" \
    [ "$(readlink "$root/var/lib/kvfleet/controlplane-ca.key")" = controlplane/ca.key ]
dpkg_install "$cp_deb"
assert "a reinstall leaves the moved key alone" grep -q 'legacy sealing key' "$root/var/lib/kvfleet/controlplane/ca.key"
assert_not "the agent's user cannot read the control plane's key" \
    chroot --userspec="$(in_root id -u kvfleet-agent):$(in_root id -g kvfleet-agent)" "$root" cat /var/lib/kvfleet/controlplane/ca.key
assert_not "the agent's user cannot read the control plane's config" \
    chroot --userspec="$(in_root id -u kvfleet-agent):$(in_root id -g kvfleet-agent)" "$root" cat /etc/kvfleet/controlplane.toml
assert_not "the control plane's user cannot read the agent's state" \
    chroot --userspec="$(in_root id -u kvfleet-cp):$(in_root id -g kvfleet-cp)" "$root" ls /var/lib/kvfleet/agent
# The legacy files are test data, not a real key: the control plane below makes its own.
rm -f "$root/var/lib/kvfleet/controlplane/ca.key" "$root/var/lib/kvfleet/controlplane/admin-token" \
    "$root/var/lib/kvfleet/controlplane-ca.key" "$root/var/lib/kvfleet/controlplane-admin-token"
for f in /usr/bin/kvfleet-controlplane /usr/bin/kvfleet /usr/lib/systemd/system/kvfleet-controlplane.service \
    /etc/kvfleet/controlplane.toml /usr/share/kvfleet/grafana/kvfleet-fleet.json \
    /usr/share/kvfleet/prometheus/kvfleet-alerts.yml /usr/share/kvfleet/prometheus/prometheus.example.yml \
    /usr/share/doc/kvfleet-controlplane/observability.md; do
    assert "$f is there" [ -f "$root$f" ]
done
assert "the packaged Grafana dashboard is JSON" python3 -m json.tool "$root/usr/share/kvfleet/grafana/kvfleet-fleet.json"
if command -v promtool >/dev/null; then
    assert "the packaged alert rules pass promtool check rules" \
        promtool check rules "$root/usr/share/kvfleet/prometheus/kvfleet-alerts.yml"
fi
assert "controlplane.toml is root:kvfleet-cp 0640" [ "$(mode_owner /etc/kvfleet/controlplane.toml)" = "640 root:kvfleet-cp" ]
assert "the control plane unit is enabled" [ -L "$(wants kvfleet-controlplane.service)" ]
assert "kvfleet-controlplane check-config accepts the shipped default" \
    in_root kvfleet-controlplane check-config --config /etc/kvfleet/controlplane.toml
assert "the kvfleet CLI runs" in_root kvfleet --version
verify="$(systemd-analyze verify --root="$root" kvfleet-controlplane.service 2>&1)" || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify kvfleet-controlplane.service is not clean: $verify"
ok "systemd-analyze verify --root kvfleet-controlplane.service: clean"

step "both services under systemd (systemd-nspawn --boot of the root)"
# The units for real: systemd as PID 1 in the root, private network, the test PostgreSQL
# cluster's socket directory bound in for the control plane. A probe unit starts both
# services (Type=notify: `systemctl start` returns once READY=1 came), asks their HTTP ports,
# reads the sandbox off /proc, stops them (the agent drains) and powers off.
boot_stage() {
    # Booting an overlay of the host would start the host's own services in a container.
    [ "$overlay" = 0 ] || { log "SKIP the systemd stage: the root is an overlay of the host"; return 0; }
    command -v systemd-nspawn >/dev/null || apt_install systemd-container >/dev/null 2>&1 ||
        { log "SKIP the systemd stage: no systemd-nspawn (package systemd-container)"; return 0; }
    ensure_test_postgres >/dev/null 2>&1 || { log "SKIP the systemd stage: no test PostgreSQL cluster"; return 0; }
    local pgdir="${KVFLEET_TEST_PG_DIR:-/var/tmp/kvfleet-test-pg}" pgport="${KVFLEET_TEST_PG_PORT:-55432}"
    local db=kvfleet_pkgtest
    PGOPTIONS="-c client_min_messages=warning" "$(pg_bindir)/psql" -q -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db OWNER kvfleet" >/dev/null
    sed -i "s|^url = .*|url = \"postgres://kvfleet@localhost/$db?host=/run/kvfleet-test-pg\&port=$pgport\"|" \
        "$root/etc/kvfleet/controlplane.toml"
    cat >"$root/usr/local/sbin/kvfleet-probe" <<'EOF'
#!/bin/bash
# Runs inside the booted root; the test reads /probe.out afterwards.
http_status() { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\nHost: probe\r\n\r\n' "$2" >&3 && head -n 1 <&3 | cut -d ' ' -f 2; exec 3>&-; }
{
    systemctl start kvfleet-agent.service kvfleet-controlplane.service
    for unit in kvfleet-agent kvfleet-controlplane; do
        systemctl show -p ActiveState -p SubState -p StatusText "$unit.service" | sed "s/^/$unit /"
        pid="$(systemctl show -p MainPID --value "$unit.service")"
        grep -E '^(Uid|Groups|NoNewPrivs|Seccomp|CapBnd|CapEff):' "/proc/$pid/status" | tr -s '\t ' ' ' | sed "s/^/$unit /"
        journalctl -o verbose -u "$unit.service" | grep -m 1 KVFLEET_COMPONENT | tr -d ' ' | sed "s/^/$unit journal /"
    done
    # The agent's port is the one the edit above set.
    echo "agent http $(http_status 8100 /ready)"
    # The packaged control plane serves HTTPS from the fleet CA: the CLI trusts it through the
    # CA certificate `kvfleet-controlplane ca` prints; plain HTTP gets no HTTP answer.
    runuser -u kvfleet-cp -- kvfleet-controlplane ca >/root/fleet-ca.pem 2>/root/fleet-ca.txt
    fingerprint="$(sed -n 's/^ca_fingerprint = "\(.*\)"$/\1/p' /root/fleet-ca.txt)"
    [ -n "$fingerprint" ] && echo "controlplane ca printed with its fingerprint"
    # (HOME as in an admin's shell: the CLI looks for its login file there.)
    export HOME=/root KVFLEET_URL=https://127.0.0.1:8080 KVFLEET_CA_FILE=/root/fleet-ca.pem
    kvfleet api /api/v1/status | grep -q '"schema_version"' && echo "controlplane https status"
    # The web UI is compiled into the binary: the package has no other assets to carry.
    kvfleet api /ui/ | grep -qi '<html' && echo "controlplane https ui"
    case "$(http_status 8080 /api/v1/status 2>/dev/null)" in
        [0-9][0-9][0-9]) ;;
        *) echo "controlplane plain http not served" ;;
    esac
    if [ -f /var/lib/kvfleet/models/smollm2.gguf ]; then
        body='{"model":"smollm2-135m","messages":[{"role":"user","content":"Say hi."}],"max_tokens":4,"temperature":0}'
        exec 3<>/dev/tcp/127.0.0.1/8100
        printf 'POST /v1/chat/completions HTTP/1.0\r\nHost: probe\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' "${#body}" "$body" >&3
        reply="$(cat <&3)"
        exec 3>&-
        echo "native http $(head -n 1 <<<"$reply" | cut -d ' ' -f 2)"
        grep -q '"choices"' <<<"$reply" && echo "native reply has choices"
        tail -n 1 <<<"$reply" | cut -c 1-300 | sed 's/^/native body /'
    fi
    # An upgrade (here: the same version again) restarts the running service, config kept.
    before="$(systemctl show -p MainPID --value kvfleet-agent.service)"
    dpkg -i --force-confold /root/kvfleet-agent_upgrade.deb >/dev/null
    after="$(systemctl show -p MainPID --value kvfleet-agent.service)"
    [ "$before" != "$after" ] && [ "$after" != 0 ] && echo "kvfleet-agent restarted by the upgrade"
    systemctl show -p ActiveState kvfleet-agent.service | sed "s/^/kvfleet-agent after upgrade /"
    if [ -f /root/join-probe ]; then
        token() { runuser -u kvfleet-cp -- kvfleet-controlplane token create --role "$1" --name "probe-$1" 2>/dev/null; }
        admin="$(token admin)"
        # [control_plane] replaces [[workers]] (check-config refuses both).
        sed -i '/^\[\[workers\]\]/,/^$/d' /etc/kvfleet/agent.toml
        # The join token carries the fleet CA's fingerprint (kvfj1.<hex>.<secret>): the agent
        # needs no ca_fingerprint line, and pins it from its first contact.
        join_token="$(token join)"
        case "$join_token" in "kvfj1.${fingerprint#sha256:}."*) echo "join token carries the CA fingerprint" ;; esac
        printf '\n[control_plane]\nurl = "https://127.0.0.1:8080"\njoin_token = "%s"\n' \
            "$join_token" >>/etc/kvfleet/agent.toml
        systemctl restart kvfleet-agent.service
        for _ in $(seq 1 50); do
            nodes="$(KVFLEET_TOKEN="$admin" kvfleet nodes --json 2>&1)"
            grep -q '"hostname"' <<<"$nodes" && break
            sleep 0.2
        done
        grep -q '"hostname"' <<<"$nodes" && echo "join node registered"
        # A join waits for an admin (the package's default): the guide approves it.
        grep -q '"pending"' <<<"$nodes" && echo "join node pending approval"
        KVFLEET_TOKEN="$admin" kvfleet nodes approve "$(hostname)" >/dev/null && echo "join node approved"
        [ -n "$(ls -A /var/lib/kvfleet/agent 2>/dev/null)" ] && echo "join state saved"
        systemctl show -p ActiveState kvfleet-agent.service | sed "s/^/kvfleet-agent joined /"
        # The guide's first deployment and first request, with the packaged CLI.
        export KVFLEET_TOKEN="$admin"
        printf 'name = "probe-mock"\nformat = "mock"\npath = "mock"\n' >/root/model.toml
        printf 'name = "probe"\nmodel = "probe-mock"\n[placement]\nallow_cpu = true\n' >/root/deployment.toml
        kvfleet models apply -f /root/model.toml >/dev/null && kvfleet deployments apply -f /root/deployment.toml >/dev/null &&
            echo "deployment applied with the kvfleet CLI"
        body='{"model":"probe-mock","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
        code=
        for _ in $(seq 1 100); do
            exec 3<>/dev/tcp/127.0.0.1/8100
            printf 'POST /v1/chat/completions HTTP/1.0\r\nHost: probe\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' "${#body}" "$body" >&3
            code="$(head -n 1 <&3 | cut -d ' ' -f 2)"
            exec 3>&-
            [ "$code" = 200 ] && break
            sleep 0.3
        done
        echo "deployment served http $code"
    fi
    systemctl stop kvfleet-agent.service kvfleet-controlplane.service
    for unit in kvfleet-agent kvfleet-controlplane; do
        systemctl show -p Result -p ExecMainStatus "$unit.service" | sed "s/^/$unit stopped /"
    done
    # Each service's own directories, as the units left them.
    stat -c '%n %a %U:%G' /var/lib/kvfleet /var/lib/kvfleet/agent /var/cache/kvfleet /var/lib/kvfleet/controlplane \
        /var/lib/kvfleet/controlplane/ca.key | sed 's/^/dir /'
    [ -f /var/lib/kvfleet/agent/control-plane-ca.fingerprint ] && echo "agent saved the pinned CA fingerprint"
    journalctl --no-pager -u kvfleet-agent -u kvfleet-controlplane | tail -n 40
} >/probe.out 2>&1
systemctl poweroff
EOF
    chmod 755 "$root/usr/local/sbin/kvfleet-probe"
    # The real model too, when the suite has it (scripts/test.sh installs it): a native CPU
    # worker must load and answer inside the sandbox.
    native=0
    if [ -n "${KVFLEET_SMOLLM2_GGUF:-}" ] && [ -f "$KVFLEET_SMOLLM2_GGUF" ]; then
        native=1
        mkdir -p "$root/var/lib/kvfleet/models"
        cp "$KVFLEET_SMOLLM2_GGUF" "$root/var/lib/kvfleet/models/smollm2.gguf"
        cat >>"$root/etc/kvfleet/agent.toml" <<'EOF'

# Added by the install test: the real model in a second CPU worker.
[[models]]
name = "smollm2-135m"
engine = "native"
path = "/var/lib/kvfleet/models/smollm2.gguf"
kv_memory = "128MiB"

[[workers]]
model = "smollm2-135m"
device = "cpu"
EOF
    else
        log "the systemd stage runs without the real model: KVFLEET_SMOLLM2_GGUF is not set"
    fi
    # Joining the control plane, when this agent build has the client ([control_plane] passes
    # check-config): registration and the node's saved credential under the sandbox.
    join=0
    printf '[control_plane]\nurl = "https://127.0.0.1:8080"\nca_fingerprint = "sha256:%s"\njoin_token = "kvf_aaaaaaaaaaaa_%s"\n' \
        "$(printf 'c%.0s' $(seq 64))" "$(printf 'b%.0s' $(seq 43))" >"$root/tmp/cp-probe.toml"
    if in_root kvfleet-agent check-config /tmp/cp-probe.toml >/dev/null 2>&1; then
        join=1
        touch "$root/root/join-probe"
    else
        log "the systemd stage does not join the control plane: this agent build has no [control_plane]"
    fi
    # (/tmp is a fresh tmpfs once systemd boots the root.)
    cp "$root/tmp/pkgs/kvfleet-agent_upgrade.deb" "$root/root/"
    cat >"$root/etc/systemd/system/kvfleet-probe.service" <<'EOF'
[Unit]
Description=kvfleet install test probe
After=multi-user.target dbus.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kvfleet-probe
[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/kvfleet-probe.service "$root/etc/systemd/system/multi-user.target.wants/"
    timeout 90 systemd-nspawn --quiet -D "$root" --boot --register=no --keep-unit --private-network \
        --bind="$pgdir:/run/kvfleet-test-pg" --console=pipe >"$work/boot.log" 2>&1 || true
    rm -f "$root/etc/systemd/system/multi-user.target.wants/kvfleet-probe.service" \
        "$root/etc/systemd/system/kvfleet-probe.service" "$root/usr/local/sbin/kvfleet-probe" \
        "$root/root/kvfleet-agent_upgrade.deb" "$root/root/join-probe" "$root/tmp/cp-probe.toml"
    PGOPTIONS="-c client_min_messages=warning" "$(pg_bindir)/psql" -q -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null || true
    if [ ! -s "$root/probe.out" ]; then
        tail -n 15 "$work/boot.log" >&2
        log "SKIP the systemd stage: systemd-nspawn could not boot the root here (log above)"
        return 0
    fi
    local probe
    probe="$(cat "$root/probe.out")"
    rm -f "$root/probe.out"
    local expect workers=$((1 + native)) cp_uid
    cp_uid="$(in_root id -u kvfleet-cp)"
    while IFS= read -r expect; do
        [ -n "$expect" ] || continue
        grep -qxF -- "$expect" <<<"$probe" || { printf '%s\n' "$probe" >&2; fail "under systemd: expected the line '$expect' (probe output above)"; }
        ok "under systemd: $expect"
    done <<EOF
kvfleet-agent ActiveState=active
kvfleet-agent SubState=running
kvfleet-agent StatusText=$workers/$workers workers ready, 0 requests in flight
kvfleet-agent Uid: $kv_uid $kv_uid $kv_uid $kv_uid
kvfleet-agent NoNewPrivs: 1
kvfleet-agent Seccomp: 2
kvfleet-agent CapBnd: 0000000000000000
kvfleet-agent journal KVFLEET_COMPONENT=agent
kvfleet-controlplane ActiveState=active
kvfleet-controlplane Uid: $cp_uid $cp_uid $cp_uid $cp_uid
kvfleet-controlplane SubState=running
kvfleet-controlplane NoNewPrivs: 1
kvfleet-controlplane Seccomp: 2
kvfleet-controlplane CapBnd: 0000000000000000
kvfleet-controlplane journal KVFLEET_COMPONENT=controlplane
agent http 200
controlplane ca printed with its fingerprint
controlplane https status
controlplane https ui
controlplane plain http not served
kvfleet-agent restarted by the upgrade
kvfleet-agent after upgrade ActiveState=active
kvfleet-agent stopped Result=success
kvfleet-agent stopped ExecMainStatus=0
kvfleet-controlplane stopped Result=success
kvfleet-controlplane stopped ExecMainStatus=0
dir /var/lib/kvfleet 755 root:root
dir /var/lib/kvfleet/agent 750 kvfleet-agent:kvfleet-agent
dir /var/cache/kvfleet 750 kvfleet-agent:kvfleet-agent
dir /var/lib/kvfleet/controlplane 750 kvfleet-cp:kvfleet-cp
dir /var/lib/kvfleet/controlplane/ca.key 600 kvfleet-cp:kvfleet-cp
EOF
    if [ "$join" = 1 ]; then
        for expect in "join token carries the CA fingerprint" "agent saved the pinned CA fingerprint" \
            "join node registered" "join node pending approval" "join node approved" \
            "join state saved" "kvfleet-agent joined ActiveState=active" \
            "deployment applied with the kvfleet CLI" "deployment served http 200"; do
            grep -qxF -- "$expect" <<<"$probe" || { printf '%s\n' "$probe" >&2; fail "under systemd: expected the line '$expect' (probe output above)"; }
            ok "under systemd, joining the control plane: $expect"
        done
    fi
    if [ "$native" = 1 ]; then
        for expect in "native http 200" "native reply has choices"; do
            grep -qxF -- "$expect" <<<"$probe" || { printf '%s\n' "$probe" >&2; fail "under systemd: expected the line '$expect' (probe output above)"; }
            ok "under systemd, the real model (SmolLM2, CPU worker): $expect"
        done
        grep '^native body ' <<<"$probe" | sed 's/^native body /    /' >&2 || true
    fi
    local video_gid
    video_gid="$(in_root getent group video | cut -d: -f3)"
    grep -Eq "^kvfleet-agent Groups: .*\\b$video_gid\\b" <<<"$probe" || { printf '%s\n' "$probe" >&2; fail "under systemd: the agent is not in the video group ($video_gid)"; }
    ok "under systemd: the agent runs with the video group ($video_gid)"
}
boot_stage

step "remove and purge"
in_root dpkg -r kvfleet-agent >/dev/null
assert "remove: the binary is gone" [ ! -e "$root/usr/bin/kvfleet-agent" ]
assert "remove: the config is kept" grep -q 'edited by the install test' "$root/etc/kvfleet/agent.toml"
# Debian keeps the enablement links of a removed package until purge, and masks the unit.
assert "remove: the unit is masked" [ "$(readlink "$root/etc/systemd/system/kvfleet-agent.service")" = /dev/null ]
in_root dpkg -P kvfleet-agent >/dev/null
assert "purge agent: agent.toml is gone" [ ! -e "$root/etc/kvfleet/agent.toml" ]
assert_not "purge agent: its user kvfleet-agent is gone" in_root getent passwd kvfleet-agent
assert "purge agent: its state is gone" [ ! -e "$root/var/lib/kvfleet/agent" ]
assert "purge agent: the control plane's user stays" in_root getent passwd kvfleet-cp
assert "purge agent: the control plane's directory stays" [ -d "$root/var/lib/kvfleet/controlplane" ]
assert "purge agent: the control plane config stays" [ -f "$root/etc/kvfleet/controlplane.toml" ]
in_root dpkg -P kvfleet-controlplane >/dev/null
assert "purge: no kvfleet package left" sh -c "! chroot '$root' dpkg-query -W 'kvfleet*' 2>/dev/null | grep -q ."
for d in /var/lib/kvfleet /var/cache/kvfleet /var/log/kvfleet /etc/kvfleet; do
    assert "purge: $d is gone" [ ! -e "$root$d" ]
done
for u in kvfleet-cp kvfleet; do
    assert_not "purge: the $u user is gone" in_root getent passwd "$u"
    assert_not "purge: the $u group is gone" in_root getent group "$u"
done
assert_not "purge: no unit link is left" sh -c "find '$root/etc/systemd' -name 'kvfleet*' | grep -q ."

# ---------------------------------------------------------------------------------------------
step "the .rpm against the .deb"
# deb_files DEB: the files it installs, without Debian's own copyright and changelog.
deb_files() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ {sub(/^\./, "", $6); print $6}' | grep -Ev '/usr/share/doc/[^/]+/(copyright|changelog\.Debian\.gz)$' | sort; }
rpm_files() { rpm -qlp "$1" 2>/dev/null | sort; }
for pair in "$agent_deb $agent_rpm" "$cp_deb $cp_rpm"; do
    # shellcheck disable=SC2086 # two paths without spaces, split on purpose
    set -- $pair
    name="$(dpkg-deb -f "$1" Package)"
    diff <(deb_files "$1") <(rpm_files "$2") >&2 || fail "$name: rpm -qlp differs from dpkg-deb -c (above)"
    ok "$name: same files ($(rpm_files "$2" | tr '\n' ' '))"
    diff <(dpkg-deb -I "$1" conffiles | sort) <(rpm -qpc "$2" 2>/dev/null | sort) >&2 ||
        fail "$name: config files differ"
    ok "$name: same config files"
    conf="$(dpkg-deb -I "$1" conffiles)"
    # Each service's own user and directories.
    case "$name" in
        kvfleet-agent) user=kvfleet-agent dirs="/var/lib/kvfleet/agent /var/cache/kvfleet" ;;
        *) user=kvfleet-cp dirs="/var/lib/kvfleet/controlplane" ;;
    esac
    assert "$name: rpm installs $conf root:$user 0640 (deb: postinst)" \
        sh -c "rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILENAMES}\n]' '$2' 2>/dev/null | grep -qxF -- '-rw-r----- root $user $conf'"
    unit="$name.service"
    dpkg-deb -e "$1" "$work/ctl-$name"
    deb_scripts="$(cat "$work/ctl-$name"/{preinst,postinst,prerm,postrm} 2>/dev/null || true)"
    rpm_scripts="$(rpm -qp --scripts "$2" 2>/dev/null)"
    # What both must do, as (description, pattern in the .deb scripts, pattern in the .rpm's).
    while IFS='|' read -r what deb_re rpm_re; do
        [ -n "$what" ] || continue
        grep -Eq -- "$deb_re" <<<"$deb_scripts" || fail "$name .deb scripts do not $what"
        grep -Eq -- "$rpm_re" <<<"$rpm_scripts" || fail "$name .rpm scripts do not $what"
        ok "$name: .deb and .rpm scripts both $what"
    done <<EOF
create the $user group|groupadd --system $user|groupadd --system $user
create the $user system user|useradd --system --gid $user|useradd --system --gid $user
make its own 0750 directories|install -d -o $user -g $user -m 0750 $dirs|install -d -o $user -g $user -m 0750 $dirs
move what the shared kvfleet user owned|chown (-R )?$user:$user|chown (-R )?$user:$user
enable the unit|deb-systemd-helper enable $unit|systemctl enable $unit
reload systemd|systemctl --system daemon-reload|systemctl daemon-reload
restart a running service on upgrade|deb-systemd-invoke try-restart $unit|systemctl try-restart $unit
stop the service on removal|deb-systemd-invoke stop $unit|systemctl stop $unit
EOF
    if [ "$name" = kvfleet-agent ]; then
        for s in "$deb_scripts" "$rpm_scripts"; do
            grep -q 'for group in video render' <<<"$s" || fail "$name: a script set does not join video/render"
        done
        ok "$name: .deb and .rpm scripts both add kvfleet-agent to video/render when present"
    fi
    for s in "$deb_scripts" "$rpm_scripts"; do
        if grep -Eq "(deb-systemd-invoke|systemctl) (start|restart) " <<<"$s"; then
            fail "$name: a script starts the service"
        fi
    done
    ok "$name: neither starts the service"
    # RPM has no purge: an erase is `apt remove` (see packaging/rpm/*/postun.sh, docs/install.md).
    grep -q 'rm -rf /var/lib/kvfleet' <<<"$deb_scripts" || fail "$name: the .deb purge does not remove state"
    if grep -q 'rm -rf /var/lib/kvfleet' <<<"$rpm_scripts"; then fail "$name: an rpm erase would delete state"; fi
    ok "$name: .deb purge removes state; .rpm erase keeps it (no purge in RPM, by design)"
done

step "rpm -i and rpm -e in the same root (the scriptlets for real)"
in_root dpkg-query -W passwd >/dev/null || fail "no passwd in the root"
rpm --root "$root" --initdb
# --nodeps: the root's rpm database knows nothing of its Debian libc.
# (Debian's rpm warns that it is not meant to install packages: that is the point here.)
rpm --root "$root" -i --nodeps "$agent_rpm" "$cp_rpm" >"$work/rpm.log" 2>&1 ||
    { cat "$work/rpm.log" >&2; fail "rpm -i failed"; }
assert "rpm: both packages are installed" rpm --root "$root" -q kvfleet-agent kvfleet-controlplane
assert "rpm: the kvfleet-agent and kvfleet-cp users exist" in_root getent passwd kvfleet-agent kvfleet-cp
assert "rpm: agent.toml is root:kvfleet-agent 0640" [ "$(mode_owner /etc/kvfleet/agent.toml)" = "640 root:kvfleet-agent" ]
assert "rpm: controlplane.toml is root:kvfleet-cp 0640" [ "$(mode_owner /etc/kvfleet/controlplane.toml)" = "640 root:kvfleet-cp" ]
assert "rpm: /var/lib/kvfleet/agent is kvfleet-agent's, 0750" [ "$(mode_owner /var/lib/kvfleet/agent)" = "750 kvfleet-agent:kvfleet-agent" ]
assert "rpm: /var/lib/kvfleet/controlplane is kvfleet-cp's, 0750" [ "$(mode_owner /var/lib/kvfleet/controlplane)" = "750 kvfleet-cp:kvfleet-cp" ]
assert "rpm: the agent unit is enabled" [ -L "$(wants kvfleet-agent.service)" ]
assert "rpm: the control plane unit is enabled" [ -L "$(wants kvfleet-controlplane.service)" ]
echo "# edited" >>"$root/etc/kvfleet/agent.toml"
rpm --root "$root" -e kvfleet-agent kvfleet-controlplane >"$work/rpm.log" 2>&1 ||
    { cat "$work/rpm.log" >&2; fail "rpm -e failed"; }
assert "rpm -e: the agent binary is gone" [ ! -e "$root/usr/bin/kvfleet-agent" ]
assert "rpm -e: the CLI is gone" [ ! -e "$root/usr/bin/kvfleet" ]
assert "rpm -e: the edited config is saved as .rpmsave" [ -f "$root/etc/kvfleet/agent.toml.rpmsave" ]
assert "rpm -e: the agent unit is disabled" [ ! -L "$(wants kvfleet-agent.service)" ]
assert "rpm -e: the control plane unit is disabled" [ ! -L "$(wants kvfleet-controlplane.service)" ]

log "install test passed in $(($(date +%s) - started)) s (cleanup follows)"
