#!/usr/bin/env python3
"""Prefix hit rate of one shared LRU cache over a Mooncake trace: the reference the fleet
simulator's hit rates are compared with in docs/benchmarks.md ("Fleet simulator").

A request hits the leading hash ids (512-token blocks) found in the cache, capped at its
input_length; then all its blocks enter the cache (most recent last) and the oldest are evicted.

    python3 crates/sim/tools/lru_bound.py ../shared/traces/synthetic_trace.jsonl 832 6656 0

prints the token hit rate for each capacity in 512-token blocks (0 = unlimited).
832 blocks = one worker's 425,984 KV tokens; 6,656 = eight workers'.
"""
import json
import sys
from collections import OrderedDict


def hit_rate(requests, capacity):
    cache = OrderedDict()
    hit = total = 0
    for r in requests:
        ids, n = r["hash_ids"], r["input_length"]
        k = 0
        while k < len(ids) and ids[k] in cache:
            k += 1
        hit += min(k * 512, n)
        total += n
        for h in ids:
            cache[h] = True
            cache.move_to_end(h)
        while capacity and len(cache) > capacity:
            cache.popitem(last=False)
    return hit / total


def main():
    with open(sys.argv[1]) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    for capacity in map(int, sys.argv[2:]):
        print(f"{capacity} blocks: {hit_rate(requests, capacity):.4f}")


if __name__ == "__main__":
    main()
