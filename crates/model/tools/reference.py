#!/usr/bin/env python3
"""A plain numpy forward pass (f64, dequantized weights) for the GGUF Llama and Gemma 3 models,
used to tell quantization noise from arithmetic bugs when our logits disagree with llama.cpp's.

    python3 crates/model/tools/reference.py MODEL.gguf GOLDEN.json [--case N] [--dump DIR]

For each golden case: runs the prompt, prints our reference's top-5 first-position
log-probabilities next to llama.cpp's (max difference at the end). `--dump` writes each
layer's residual stream (last token) to DIR/case{N}.npz for layer-by-layer comparison.
Needs `pip install gguf numpy`. Not run in CI (seconds per case, a few hundred MB of f64).
"""
import argparse
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load(path):
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer."):
            continue
        try:
            meta[k] = f.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata is not needed here
            pass
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        shape = tuple(int(x) for x in reversed(t.shape))
        w[t.name] = a.reshape(shape)
    return meta, w


def rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(x, pos, theta, interleaved):
    # x [T, H, D]
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d // 2) * 2.0 / d)
    ang = np.asarray(pos)[:, None] * inv[None, :]  # [T, D/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        out = np.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    return out


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


def forward(meta, w, ids, dump=None, trace=None):
    tr = trace if trace is not None else (lambda name, il, v: None)
    arch = meta["general.architecture"]
    k = lambda s: meta[f"{arch}.{s}"]  # noqa: E731
    gemma = arch == "gemma3"
    h = int(k("embedding_length"))
    nh = int(k("attention.head_count"))
    nkv = int(k("attention.head_count_kv"))
    hd = int(meta.get(f"{arch}.attention.key_length", h // nh))
    eps = float(k("attention.layer_norm_rms_epsilon"))
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    nl = int(k("block_count"))
    swa = int(meta.get(f"{arch}.attention.sliding_window", 0)) if gemma else 0
    t = len(ids)
    pos = np.arange(t)
    x = w["token_embd.weight"][ids]
    if gemma:
        x = x * np.sqrt(h)
    layers = []
    for li in range(nl):
        p = f"blk.{li}."
        sliding = gemma and (li % 6) < 5
        xn = rms(x, w[p + "attn_norm.weight"], eps)
        tr("attn_norm", li, xn)
        q = (xn @ w[p + "attn_q.weight"].T).reshape(t, nh, hd)
        kk = (xn @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd)
        v = (xn @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd)
        if p + "attn_q_norm.weight" in w:
            q = rms(q, w[p + "attn_q_norm.weight"], eps)
            kk = rms(kk, w[p + "attn_k_norm.weight"], eps)
        th = 10000.0 if sliding else theta
        q = rope(q, pos, th, not gemma)
        kk = rope(kk, pos, th, not gemma)
        tr("Qcur", li, q.reshape(t, -1))
        tr("Kcur", li, kk.reshape(t, -1))
        tr("Vcur", li, v.reshape(t, -1))
        grp = nh // nkv
        out = np.zeros((t, nh, hd))
        mask = np.tril(np.ones((t, t), dtype=bool))
        if sliding:
            mask &= (pos[:, None] - pos[None, :]) < swa
        for hh in range(nh):
            g = hh // grp
            s = (q[:, hh, :] @ kk[:, g, :].T) / np.sqrt(hd)
            s = np.where(mask, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True)
            out[:, hh, :] = pr @ v[:, g, :]
        tr("kqv_out", li, out.reshape(t, -1))
        o = out.reshape(t, nh * hd) @ w[p + "attn_output.weight"].T
        tr("attn_out", li, o)
        if gemma:
            o = rms(o, w[p + "post_attention_norm.weight"], eps)
        x = x + o
        tr("ffn_inp", li, x)
        xn = rms(x, w[p + "ffn_norm.weight"], eps)
        tr("ffn_norm", li, xn)
        gt = xn @ w[p + "ffn_gate.weight"].T
        up = xn @ w[p + "ffn_up.weight"].T
        act = gelu_tanh(gt) if gemma else gt / (1 + np.exp(-gt))
        tr("ffn_act", li, act * up)
        d = (act * up) @ w[p + "ffn_down.weight"].T
        tr("ffn_out", li, d)
        if gemma:
            d = rms(d, w[p + "post_ffw_norm.weight"], eps)
        x = x + d
        layers.append(x[-1].copy())
        tr("l_out", li, x)
    xn = rms(x[-1:], w["output_norm.weight"], eps)
    tr("result_norm", 0, xn)
    head = w.get("output.weight", w["token_embd.weight"])
    logits = (xn @ head.T)[0]
    tr("result_output", 0, logits[None, :])
    if dump is not None:
        np.savez(dump, layers=np.array(layers), logits=logits)
    return logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("golden")
    ap.add_argument("--case", type=int)
    ap.add_argument("--dump")
    args = ap.parse_args()
    meta, w = load(args.model)
    golden = json.load(open(args.golden))
    # token text for matching golden top-5 by text
    r = GGUFReader(args.model)
    f = r.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
    worst = 0.0
    for ci, case in enumerate(golden["cases"]):
        if args.case is not None and ci != args.case:
            continue
        dump = os.path.join(args.dump, f"case{ci}.npz") if args.dump else None
        logits = forward(meta, w, case["prompt_ids"], dump)
        lp = logits - logits.max()
        lp = lp - np.log(np.exp(lp).sum())
        top = np.argsort(-lp)[:5]
        want = case["top5_logprobs_first4"][0]
        print(case.get("prompt", case["prompt_text"][-40:]).__repr__())
        print("  ref top:", [(vocab[i], round(float(lp[i]), 4)) for i in top])
        for text, l in sorted(want.items(), key=lambda kv: -kv[1]):
            enc = text.replace(" ", "\u0120").replace("\n", "\u010a") if not meta["general.architecture"] == "gemma3" else text.replace(" ", "\u2581")
            ids = [i for i, v in enumerate(vocab) if v == enc]
            ours = float(lp[ids[0]]) if ids else None
            if ours is not None:
                worst = max(worst, abs(ours - l))
            print(f"  {text!r}: llama.cpp {l:.4f} ref {ours}")
    print(f"max |ref - llama.cpp| = {worst:.3f}")


if __name__ == "__main__":
    sys.exit(main())
