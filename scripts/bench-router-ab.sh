#!/usr/bin/env bash
# Router selection latency, old build against new, in one run on one machine.
#
#   scripts/bench-router-ab.sh [BASE] [ROUNDS]
#
# Builds the kv-router `router` bench of BASE (a commit, default: main) in a copy of that commit
# under $KVFLEET_AB_DIR (default /var/tmp/kvfleet-router-ab) with its own target directory, and the
# bench of this checkout; then runs their `select/` cases (the default `kv` mode) ROUNDS times
# (default 3), alternating old and new, so both see the same machine load, and prints each
# case's median and best time over the rounds for each build and the ratios new / old. Criterion's own output is kept in $KVFLEET_AB_DIR/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/common.sh

base="${1:-main}"
rounds="${2:-3}"
dir="${KVFLEET_AB_DIR:-/var/tmp/kvfleet-router-ab}"
commit="$(git rev-parse --verify "$base^{commit}")"
mkdir -p "$dir"
old="$dir/old-$commit"
if [ ! -f "$old/Cargo.toml" ]; then
    mkdir -p "$old"
    git archive "$commit" | tar -x -C "$old"
fi
log "old: $(git log -1 --format='%h %s' "$commit" | cut -c1-80)"
log "new: this checkout ($(git log -1 --format='%h') + working tree)"

# bench_binary DIR: builds DIR's router bench and prints the path of its binary.
bench_binary() {
    (cd "$1" && cargo bench -p kvfleet-kv-router --bench router --no-run --message-format=json 2>/dev/null) |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "router" and m.get("executable"):
        print(m["executable"])'
}
log "building the old bench (its own target directory: $old/target)"
old_bin="$(bench_binary "$old")"
log "building the new bench"
new_bin="$(bench_binary .)"
[ -x "$old_bin" ] && [ -x "$new_bin" ] || { log "a bench did not build"; exit 1; }

args=(--bench '^select/' --warm-up-time 1 --measurement-time 3)
for round in $(seq 1 "$rounds"); do
    for side in old new; do
        bin="$old_bin"; [ "$side" = new ] && bin="$new_bin"
        log "round $round: $side"
        "$bin" "${args[@]}" > "$dir/$side.$round.log" 2>&1
    done
done

python3 - "$dir" "$rounds" <<'EOF'
import re, statistics, sys
dir, rounds = sys.argv[1], int(sys.argv[2])
unit = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
times = {}
for side in ("old", "new"):
    for r in range(1, rounds + 1):
        text = open(f"{dir}/{side}.{r}.log").read()
        for m in re.finditer(r"^(select/\S+)\s+time:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+)", text, re.M):
            name, median, u = m.group(1), float(m.group(4)), m.group(5)
            times.setdefault((name, side), []).append(median * unit[u])
names = sorted({n for n, _ in times}, key=lambda n: (int(n.split("/")[1].split("_")[0]), int(n.split("/")[2].split("_")[0])))
# On a shared machine one quiet minute can make a round's best; the median over the rounds is
# the steadier comparison, the best is shown beside it.
print(f"| case | old (µs): median / best of {rounds} | new (µs): median / best of {rounds} | new / old (median) | new / old (best) |")
print("| --- | ---: | ---: | ---: | ---: |")
for n in names:
    o, w = times.get((n, "old")), times.get((n, "new"))
    if o and w:
        om, wm = statistics.median(o), statistics.median(w)
        print(f"| {n} | {om:.1f} / {min(o):.1f} | {wm:.1f} / {min(w):.1f} | {wm / om:.2f} | {min(w) / min(o):.2f} |")
EOF
