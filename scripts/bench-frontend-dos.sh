#!/usr/bin/env bash
# The OpenAI frontend under abusive clients, each attack beside an idle baseline in the same run
# (mock engine, one agent on loopback, default frontend limits): 5,000 idle connections, 5,000
# slow-loris connections, then a 1 GiB body declared and chunked. Prints a markdown table of the
# normal clients' latency per phase and the bytes a 1 GiB upload got through before the cut
# (docs/benchmarks.md, "The frontend under abusive clients").
#
#   scripts/bench-frontend-dos.sh [--connections 5000] [--secs 15] [--clients 8]
#                                 [--max-tokens 16] [--token-us 500] [--workers 2]
#
# The attackers and the agent share this process, so 5,000 attack connections cost 10,000
# descriptors plus the clients': the soft limit is raised to 65536 (or the hard limit).
# Built with the dev profile (the agent is the same code as in the tests). Not a CI test.
set -euo pipefail
cd "$(dirname "$0")/.."
hard=$(ulimit -Hn)
if [[ "$hard" == unlimited || "$hard" -ge 65536 ]]; then
    ulimit -n 65536
else
    ulimit -n "$hard"
fi
echo "ulimit -n: $(ulimit -n)" >&2
exec cargo bench --profile dev -p kvfleet-agent --bench frontend_dos -- "$@"
