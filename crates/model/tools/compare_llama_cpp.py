#!/usr/bin/env python3
"""Layer-by-layer comparison of our forward pass with llama.cpp's on one prompt.

    python3 crates/model/tools/compare_llama_cpp.py MODEL.gguf ID,ID,... [--ours DIR] [--layers 0,1,29]

Runs the prompt through llama.cpp (llama-cpp-python, its graph callback capturing every named
f32 activation) and, unless --ours names an existing trace, through our
`cargo run -p kvfleet-model --example trace`; prints the relative error of each activation
(all tokens, and the last token alone) so the first place the two disagree stands out.

Needs `pip install llama-cpp-python numpy` built without AMX kernels on VMs that do not enable
AMX tile state (`CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"`).
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np
import llama_cpp

GGML_MAX_DIMS = 4


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def llama_cpp_trace(model, ids, threads):
    """Every f32 activation llama.cpp names, as {name: array [rows, width]}."""
    got = {}

    def cb(tp, ask, _user):
        t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
        if ask:
            return True
        name = t.name.decode(errors="replace")
        if t.type != 0 or not t.data:  # f32 only
            return True
        ne = [t.ne[i] for i in range(4)]
        nb = [t.nb[i] for i in range(4)]
        size = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
        buf = (ctypes.c_char * size).from_address(t.data)
        arr = np.ndarray(
            shape=tuple(reversed(ne)),
            dtype=np.float32,
            buffer=buf,
            strides=tuple(reversed(nb)),
        )
        got[name] = np.array(arr).reshape(-1, ne[0] if ne[0] > 0 else 1)
        return True

    cb_c = llama_cpp.ggml_backend_sched_eval_callback(cb)
    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 512
    cp.n_batch = 512
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = cb_c
    cp.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(m, cp)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    batch = llama_cpp.llama_batch_get_one(arr, len(ids))
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(m)
    return got, logits


# ours name -> llama.cpp name (same unless listed)
RENAME = {"ffn_out": "ffn_down", "l_out": "l_out", "inp_embd": "inp_embd"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("--ours", help="an existing trace directory (else run the example)")
    ap.add_argument("--layers", default="0,1,2,15,29")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounding", default="avx512", help="avx2 or avx512: the llama.cpp build imported")
    ap.add_argument("--save", help="also write llama.cpp's activations to this directory (.npy)")
    ap.add_argument("--names", default="attn_norm,Qcur,Kcur,Vcur,kqv_out,attn_out,ffn_inp,ffn_norm,ffn_out,l_out")
    args = ap.parse_args()
    ids = [int(x) for x in args.ids.split(",")]
    ours_dir = args.ours
    if ours_dir is None or not os.path.isdir(ours_dir) or not os.listdir(ours_dir):
        ours_dir = ours_dir or tempfile.mkdtemp(prefix="kvfleet-trace-")
        subprocess.run(
            ["cargo", "run", "-q", "-p", "kvfleet-model", "--example", "trace", "--", args.model, args.ids, ours_dir, args.rounding],
            check=True,
        )
    ref, logits = llama_cpp_trace(args.model, ids, args.threads)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, arr in ref.items():
            np.save(os.path.join(args.save, name.replace("/", "_") + ".npy"), arr)
        np.save(os.path.join(args.save, "logits.npy"), logits)
    layers = [int(x) for x in args.layers.split(",")]
    t = len(ids)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    for li in layers:
        for name in args.names.split(","):
            theirs = ref.get(f"{RENAME.get(name, name)}-{li}")
            path = os.path.join(ours_dir, f"{name}-{li}.f32")
            if theirs is None or not os.path.exists(path):
                continue
            ours = np.fromfile(path, dtype=np.float32)
            theirs = theirs.reshape(-1)
            if ours.size != theirs.size:
                # llama.cpp keeps only the output row in the last layer
                w = theirs.size
                ours = ours[-w:]
            o, r = ours.reshape(-1), theirs.reshape(-1)
            rows = t if o.size % t == 0 and o.size // t > 0 and o.size > 1 else 1
            last_o, last_r = o.reshape(rows, -1)[-1], r.reshape(rows, -1)[-1]
            print(f"{name:10s} L{li:<2d} rel {rel(o, r):.2e}  last {rel(last_o, last_r):.2e}  max|d| {np.abs(o - r).max():.2e}")
    ours_logits = np.fromfile(os.path.join(ours_dir, "result_output-0.f32"), dtype=np.float32)

    def lsm(x):
        x = x.astype(np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    lo, lr = lsm(ours_logits), lsm(logits)
    top = np.argsort(-lr)[:5]
    print("logits rel", f"{rel(ours_logits, logits):.2e}", "top-5 log-prob |d|:",
          " ".join(f"{i}:{abs(lo[i] - lr[i]):.3f}" for i in top))
    print("argmax ours", int(np.argmax(lo)), "llama.cpp", int(np.argmax(lr)))


if __name__ == "__main__":
    sys.exit(main())
