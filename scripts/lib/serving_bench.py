#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers: streaming /v1/completions from N concurrent
streams, each sending requests back to back; reports TTFT, ITL and output tokens/s as JSON.

Used by scripts/bench-serving-vs-llamacpp.sh against kvfleet-agent and llama-server alike
(standard library only). Prompts are token ids (exactly --prompt-tokens each, distinct per
request, so no prefix cache helps either server) and every request generates exactly
--max-tokens tokens (`ignore_eos`, which both servers accept).

    python3 scripts/lib/serving_bench.py --url http://127.0.0.1:8000 --model m \\
        --streams 8 --requests 32 --prompt-tokens 128 --max-tokens 32 --vocab-from model.gguf
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse


def gguf_vocab(path):
    """The vocabulary size of a GGUF file (the length of `tokenizer.ggml.tokens`)."""
    import struct
    with open(path, "rb") as f:
        b = f.read(64 << 20)
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return b[pos - n:pos].decode("utf-8", "replace")

    sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def skip(t):
        if t in sizes:
            take(sizes[t])
        elif t == 8:
            string()
        elif t == 9:
            et, n = take("I"), take("Q")
            for _ in range(n):
                skip(et)
        else:
            raise ValueError(f"GGUF value type {t}")

    if b[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 8
    take("Q")
    for _ in range(take("Q")):
        key, t = string(), take("I")
        if key == "tokenizer.ggml.tokens" and t == 9:
            take("I")
            return take("Q")
        skip(t)
    raise ValueError(f"{path} has no tokenizer.ggml.tokens")


def one_request(url, model, prompt, max_tokens):
    """Streams one completion; returns (ttft_s, [inter-token gaps], tokens)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times = []
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if msg.get("choices"):
                    times.append(time.perf_counter())
    conn.close()
    if not times:
        raise RuntimeError("no tokens streamed")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - start, gaps, len(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8, help="requests in all (spread over the streams)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, help="ids are drawn from [vocab/8, vocab)")
    ap.add_argument("--vocab-from", help="read the vocabulary size from this GGUF file")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    vocab = args.vocab or (gguf_vocab(args.vocab_from) if args.vocab_from else None)
    if not vocab:
        ap.error("give --vocab or --vocab-from")
    rng = random.Random(args.seed)
    low = vocab // 8
    prompts = [[rng.randrange(low, vocab) for _ in range(args.prompt_tokens)]
               for _ in range(args.requests)]
    ttft, itl, tokens, errors = [], [], [0], []
    lock = threading.Lock()
    queue = list(enumerate(prompts))

    def stream():
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop()
            try:
                t, gaps, n = one_request(args.url, args.model, prompt, args.max_tokens)
            except Exception as e:  # reported, and the run fails below
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                ttft.append(t)
                itl.extend(gaps)
                tokens[0] += n

    start = time.perf_counter()
    workers = [threading.Thread(target=stream) for _ in range(args.streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start

    def pct(v, p):
        if not v:
            return None
        v = sorted(v)
        return v[min(len(v) - 1, int(p / 100 * len(v)))]

    out = {
        "streams": args.streams,
        "requests": len(ttft),
        "errors": errors[:5],
        "wall_s": wall,
        "output_tokens": tokens[0],
        "output_tok_s": tokens[0] / wall if wall > 0 else None,
        "ttft_ms_p50": 1e3 * statistics.median(ttft) if ttft else None,
        "ttft_ms_p90": 1e3 * pct(ttft, 90) if ttft else None,
        "itl_ms_p50": 1e3 * statistics.median(itl) if itl else None,
        "itl_ms_p90": 1e3 * pct(itl, 90) if itl else None,
    }
    print(json.dumps(out))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
