#!/usr/bin/env python3
"""Check and time a text tower fed with cut token rows (manifest `dynamic_length = true`).

    text_length.py --model DIR [--batch 64] [--threads 2] [--short 12] [--reps 5]
                   [--reference OLD_TEXT_ONNX] [--json]

The CLIP text tower is causal and pools at the end-of-text (EOT) token, so a batch of
77-token rows cut after its longest EOT (L = max EOT position + 1) must give the same
embeddings. This script checks that on several batches (short texts of different lengths,
mixed lengths up to 77, equal lengths, batch 1, Hugging Face style padding with the EOT id)
and fails when any row differs by 1e-5 or more. --reference compares the full 77-token
output with another text.onnx (e.g. a fixed-length graph with the same weights).

It then times batches of `--batch` texts of at most `--short` tokens (SOT + words + EOT) fed
as 77-token rows and as cut rows, on the CPU with `--threads` intra-op threads, and prints
texts/s for both. Needs numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    import tomllib
except ImportError:  # pragma: no cover
    sys.exit("error: Python 3.11+ is required (tomllib)")
import onnxruntime as ort

SOT_ID, EOT_ID = 49406, 49407
TOLERANCE = 1e-5


def rows(rng: np.random.Generator, n: int, ctx: int, words: tuple[int, int],
         pad: int = 0) -> np.ndarray:
    """Tokenizer-shaped rows: SOT, words[0]..words[1] random ids, EOT, padding."""
    toks = np.full((n, ctx), pad, np.int64)
    for i in range(n):
        k = int(rng.integers(words[0], words[1] + 1))
        toks[i, 0] = SOT_ID
        toks[i, 1:1 + k] = rng.integers(1, SOT_ID, size=k)
        toks[i, 1 + k] = EOT_ID
    return toks


def cut(toks: np.ndarray) -> np.ndarray:
    """The batch up to and including its longest EOT (what oodgate feeds)."""
    last = max(int(np.argmax(r == EOT_ID)) if (r == EOT_ID).any() else r.size - 1
               for r in toks)
    return np.ascontiguousarray(toks[:, :last + 1])


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rate(sess, inp: str, out: str, toks: np.ndarray, reps: int) -> float:
    sess.run([out], {inp: toks})  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run([out], {inp: toks})
        best = min(best, time.perf_counter() - t0)
    return toks.shape[0] / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="oodgate model folder")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--short", type=int, default=12,
                    help="timed texts have at most this many tokens, SOT and EOT included")
    ap.add_argument("--reps", type=int, default=5, help="timed runs (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", type=Path,
                    help="another text.onnx to compare the full 77-token output with")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    man = tomllib.loads((args.model / "model.toml").read_text(encoding="utf-8"))
    t = man["text"]
    inp, out, ctx = t.get("input", "tokens"), t.get("output", "embedding"), \
        int(t.get("context_length", 77))
    pad = int(t.get("pad_id", 0))
    if "attention_mask" in t:
        sys.exit("error: models with an attention_mask input are not handled by this script")
    if not t.get("dynamic_length", False):
        print("note: the manifest does not say dynamic_length = true", file=sys.stderr)
    sess = session(args.model / t.get("file", "text.onnx"), args.threads)
    ref = session(args.reference, args.threads) if args.reference else None
    rng = np.random.default_rng(args.seed)

    batches = {
        "short, 1..10 words": rows(rng, 16, ctx, (1, 10), pad),
        "mixed, 1..75 words": rows(rng, 16, ctx, (1, ctx - 2), pad),
        "equal, 5 words": rows(rng, 8, ctx, (5, 5), pad),
        "one text, 3 words": rows(rng, 1, ctx, (3, 3), pad),
        "one text, 75 words (no cut)": rows(rng, 1, ctx, (ctx - 2, ctx - 2), pad),
        "padded with the EOT id": rows(rng, 8, ctx, (1, 20), EOT_ID),
    }
    checks, worst, worst_ref = [], 0.0, 0.0
    for name, toks in batches.items():
        full = sess.run([out], {inp: toks})[0]
        short = cut(toks)
        got = sess.run([out], {inp: short})[0]
        d = float(np.max(np.abs(got - full)))
        worst = max(worst, d)
        entry = {"batch": name, "rows": int(toks.shape[0]), "length": int(short.shape[1]),
                 "max_abs_diff": d, "max_abs": float(np.max(np.abs(full)))}
        if ref is not None:
            r = ref.run(None, {ref.get_inputs()[0].name: toks})[0]
            entry["reference_max_abs_diff"] = float(np.max(np.abs(r - full)))
            worst_ref = max(worst_ref, entry["reference_max_abs_diff"])
        checks.append(entry)

    short_toks = rows(rng, args.batch, ctx, (max(1, args.short - 4), args.short - 2), pad)
    short_cut = cut(short_toks)
    full_rate = rate(sess, inp, out, short_toks, args.reps)
    cut_rate = rate(sess, inp, out, short_cut, args.reps)
    result = {
        "model": str(args.model), "onnxruntime": ort.__version__, "threads": args.threads,
        "batch": args.batch, "checks": checks, "max_abs_diff": worst,
        "texts_per_s_77": full_rate, "texts_per_s_cut": cut_rate,
        "cut_length": int(short_cut.shape[1]), "speedup": cut_rate / full_rate,
    }
    if ref is not None:
        result["reference_max_abs_diff"] = worst_ref
    ok = worst < TOLERANCE and (ref is None or worst_ref < TOLERANCE)
    if args.json:
        print(json.dumps(result))
    else:
        for c in checks:
            extra = (f", vs reference {c['reference_max_abs_diff']:.2e}"
                     if "reference_max_abs_diff" in c else "")
            print(f"  {c['batch']:<30} {c['rows']:>3} rows cut to {c['length']:>2}: "
                  f"max |d| = {c['max_abs_diff']:.2e} (|emb| up to {c['max_abs']:.2f}){extra}")
        print(f"parity {'ok' if ok else 'FAILED'}: max |d| = {worst:.2e} "
              f"(tolerance {TOLERANCE:g})")
        print(f"throughput (batch {args.batch}, {args.threads} threads, onnxruntime "
              f"{ort.__version__}): {ctx} tokens {full_rate:.1f} texts/s, "
              f"{short_cut.shape[1]} tokens {cut_rate:.1f} texts/s "
              f"(x{cut_rate / full_rate:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
