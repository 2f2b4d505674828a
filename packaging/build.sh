#!/usr/bin/env bash
# Builds every kvfleet package: kvfleet-agent and kvfleet-controlplane (with the kvfleet CLI),
# each as .deb (cargo-deb) and .rpm (cargo-generate-rpm), into target/kvfleet-packaging/out/.
# The web UI is compiled into kvfleet-controlplane, so there is nothing else to collect.
#
#   packaging/build.sh                          release build, then all four packages
#   packaging/build.sh --profile dev --no-build the debug binaries already in target/debug
#                                               (the install test: no extra release build)
#
# Options:
#   --profile NAME   cargo profile (default release; dev means target/debug)
#   --no-build       package the binaries already built for that profile
#   --fast           quicker, larger compression (tests)
#   --deb-only, --rpm-only
#   --out DIR        where the packages go (default target/kvfleet-packaging/out)
#
# Binaries are stripped into a staging directory (the cargo target dir is left alone), and both
# tools read them from there: they expect `target/release/...` in their asset lists.
# Installs cargo-deb and cargo-generate-rpm (pinned) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
BINS=(kvfleet-agent kvfleet-controlplane kvfleet)

profile=release
build=1
fast=0
want_deb=1
want_rpm=1
out=target/kvfleet-packaging/out
while [ $# -gt 0 ]; do
    case "$1" in
        --release) profile=release ;;
        --profile) profile="${2:?--profile needs a name}"; shift ;;
        --no-build) build=0 ;;
        --fast) fast=1 ;;
        --deb-only) want_rpm=0 ;;
        --rpm-only) want_deb=0 ;;
        --out) out="${2:?--out needs a directory}"; shift ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '==> %s\n' "$*" >&2; }

# ensure_tool BINARY CRATE VERSION: cargo install --locked, once.
ensure_tool() {
    local have
    have="$("$1" --version 2>/dev/null || true)"
    case "$have" in
        *"$3"*) return 0 ;;
    esac
    log "installing $2 $3 (cargo install)"
    cargo install --quiet --locked "$2" --version "$3"
}

target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
case "$profile" in
    dev | test) profile_dir=debug ;;
    *) profile_dir="$profile" ;;
esac

if [ "$build" = 1 ]; then
    log "cargo build --profile $profile (${BINS[*]})"
    cargo build --profile "$profile" -p kvfleet-agent -p kvfleet-controlplane -p kvfleet --bins
fi

# The Debian changelog names the version the packages carry: keep them together.
version="$(cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "kvfleet-agent"))')"
changelog_version="$(sed -n '1s/^kvfleet (\([^)]*\)).*/\1/p' packaging/debian/changelog)"
if [ "${changelog_version%-*}" != "$version" ]; then
    echo "build.sh: packaging/debian/changelog is at $changelog_version but the crates are at $version:" \
        "add a changelog entry" >&2
    exit 1
fi

stage="$target_dir/kvfleet-packaging/stage"
rm -rf "$stage"
mkdir -p "$stage/release" "$out"
for bin in "${BINS[@]}"; do
    src="$target_dir/$profile_dir/$bin"
    [ -x "$src" ] || { echo "build.sh: $src is missing (build it, or drop --no-build)" >&2; exit 1; }
    strip --strip-all -o "$stage/release/$bin" "$src"
done

if [ "$want_deb" = 1 ]; then
    ensure_tool cargo-deb cargo-deb "$CARGO_DEB_VERSION"
    deb_flags=(--no-build --no-strip --no-dbgsym -o "$out/")
    [ "$fast" = 1 ] && deb_flags+=(--fast)
    for pkg in kvfleet-agent kvfleet-controlplane; do
        log "cargo deb -p $pkg"
        CARGO_TARGET_DIR="$stage" cargo deb --quiet -p "$pkg" "${deb_flags[@]}"
    done
fi

if [ "$want_rpm" = 1 ]; then
    ensure_tool cargo-generate-rpm cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"
    compress=zstd
    [ "$fast" = 1 ] && compress=gzip
    for pkg in kvfleet-agent kvfleet-controlplane; do
        log "cargo generate-rpm -p $pkg"
        cargo generate-rpm -p "${pkg#kvfleet-}" --target-dir "$stage" --payload-compress "$compress" -o "$out/"
    done
fi

rm -rf "$stage"
log "packages in $out:"
ls -1 "$out"/kvfleet-*"$version"* >&2
