#!/usr/bin/env bash
# The OpenAI frontend under abusive clients, each attack beside an idle baseline in the same run
# (mock engine, one agent on loopback, default frontend limits): 5,000 idle connections, 5,000
# slow-loris connections, then a 1 GiB body declared and chunked. Prints a markdown table of the
# normal clients' latency per phase and the bytes a 1 GiB upload got through before the cut
# (docs/benchmarks.md, "The frontend under abusive clients").
#
#   scripts/bench-frontend-dos.sh [--connections 5000] [--secs 15] [--clients 8]
#                                 [--max-tokens 16] [--token-us 500] [--workers 2]
#                                 [--attacker-ips 40]
#
# The agent runs in the bench's process, the attackers and the normal clients each in a process
# of their own (the bench re-runs itself with --role attacker / --role clients); the attack
# connections come from --attacker-ips loopback addresses 127.1.0.x. 5,000 attack connections
# cost 5,000 descriptors on each side: the soft limit is raised to 65536 (or the hard limit),
# which the helper processes inherit.
# Built with the dev profile: the release profile rebuilds every dependency (tens of minutes on
# a shared 2-core box), and the agent is the same code as in the tests. Not a CI test.
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
