#!/usr/bin/env python3
"""Repeats a Mooncake trace back to back for 24 hours (each copy with its own hash ids, so
copies share nothing), for the "A day of traffic" figure in docs/benchmarks.md:

    python3 crates/sim/tools/day_trace.py ../shared/traces/synthetic_trace.jsonl /tmp/day_trace.jsonl
"""
import json
import sys

DAY_MS = 86_400_000


def main():
    with open(sys.argv[1]) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    span = requests[-1]["timestamp"] + 250
    id_offset = max(max(r["hash_ids"], default=0) for r in requests) + 1
    written = 0
    with open(sys.argv[2], "w") as out:
        copy = 0
        while copy * span <= DAY_MS:
            for r in requests:
                t = r["timestamp"] + copy * span
                if t > DAY_MS:
                    break
                ids = [h + copy * id_offset for h in r["hash_ids"]]
                out.write(json.dumps({"timestamp": t, "input_length": r["input_length"],
                                      "output_length": r["output_length"], "hash_ids": ids}) + "\n")
                written += 1
            copy += 1
    print(f"{copy} copies, {written} requests")


if __name__ == "__main__":
    main()
