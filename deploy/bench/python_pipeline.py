#!/usr/bin/env python3
"""The plain Python CLIP OOD pipeline a user would write: the baseline for oodgate's speed.

    python_pipeline.py --model DIR --images DIR [--batch 32] [--threads N]
                       [--bank BANK.npz] [--scale 50] [--json]

One process, no tricks:
  * preprocessing: Pillow open + convert("RGB"), resize the shortest side to the manifest's
    image size with BICUBIC (long side truncated, as torchvision's Resize does), centre crop
    (offsets round((w - size) / 2)), numpy float32 / 255, (x - mean) / std from model.toml
    (read with tomllib), HWC -> CHW;
  * encoder: onnxruntime on the CPU (intra_op_num_threads = --threads, graph optimisation
    ORT_ENABLE_ALL) on the model's image tower, input and output names from the manifest;
  * scoring: L2-normalise, cosine against an ID matrix (1000 x D) and an outlier matrix
    (200 x D), logits = scale * cos, score = the softmax mass on the ID rows,
    exp(logsumexp(id logits) - logsumexp(all logits)) (OLE without "no" embeddings). The
    matrices are random unit rows (numpy seed 0) unless --bank gives an .npz with arrays `id`
    [C, D] and `ood` [M, D] (rows are normalised here).

It prints images/s for preprocessing alone (all images, sequential), the encoder alone (the
preprocessed batches), and end to end (sequential: decode and preprocess a batch, run it,
score it; the last batch may be short). One batch is run first as a warm-up and not timed.
--json prints one JSON object instead. Needs numpy, pillow and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_manifest(model: Path) -> dict:
    with open(model / "model.toml", "rb") as f:
        return tomllib.load(f)


def preprocess(path: Path, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    x = (x - mean) / std
    return x.transpose(2, 0, 1)  # CHW


def preprocess_batch(paths, size, mean, std) -> np.ndarray:
    return np.stack([preprocess(p, size, mean, std) for p in paths])


def l2_normalise(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def score(z: np.ndarray, bank: np.ndarray, n_id: int, scale: float) -> np.ndarray:
    """Softmax mass on the first n_id rows of the bank, computed in log space."""
    logits = scale * (l2_normalise(z) @ bank.T)
    return np.exp(logsumexp(logits[:, :n_id]) - logsumexp(logits))


def load_bank(path: Path | None, dim: int) -> tuple[np.ndarray, int]:
    if path is None:
        rng = np.random.default_rng(0)
        id_rows = rng.standard_normal((1000, dim), dtype=np.float32)
        ood_rows = rng.standard_normal((200, dim), dtype=np.float32)
    else:
        with np.load(path) as f:
            if "id" not in f:
                sys.exit(f"error: {path} has no `id` array (it has: {', '.join(f.files)})")
            id_rows = f["id"].astype(np.float32)
            ood_rows = f["ood"].astype(np.float32) if "ood" in f else \
                np.zeros((0, dim), np.float32)
    if id_rows.shape[1] != dim or ood_rows.shape[1] != dim:
        sys.exit(f"error: bank width {id_rows.shape[1]} does not match embed_dim {dim}")
    bank = l2_normalise(np.concatenate([id_rows, ood_rows]))
    return np.ascontiguousarray(bank), id_rows.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="oodgate model folder")
    ap.add_argument("--images", type=Path, required=True, help="folder of images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--bank", type=Path, help=".npz with `id` [C,D] and `ood` [M,D] arrays")
    ap.add_argument("--scale", type=float, default=50.0, help="logit scale (OLE: 50)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.batch < 1 or args.threads < 1:
        ap.error("--batch and --threads must be >= 1")

    man = load_manifest(args.model)
    img = man["image"]
    size = int(img.get("size", 224))
    mean = np.asarray(img["mean"], np.float32)
    std = np.asarray(img["std"], np.float32)
    inp, out = img.get("input", "image"), img.get("output", "embedding")
    dim = int(man["embed_dim"])

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in EXTS)
    if not paths:
        sys.exit(f"error: no images in {args.images}")
    batches = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(args.model / img.get("file", "image.onnx")), so,
                                providers=["CPUExecutionProvider"])
    bank, n_id = load_bank(args.bank, dim)

    # warm-up: one batch through everything, not timed
    x = preprocess_batch(batches[0], size, mean, std)
    score(sess.run([out], {inp: x})[0], bank, n_id, args.scale)

    # preprocessing alone
    t0 = time.perf_counter()
    pre = [preprocess_batch(b, size, mean, std) for b in batches]
    t_pre = time.perf_counter() - t0

    # encoder alone, on the preprocessed batches
    t0 = time.perf_counter()
    for x in pre:
        sess.run([out], {inp: x})
    t_enc = time.perf_counter() - t0
    del pre

    # end to end, sequential
    scores = []
    t0 = time.perf_counter()
    for b in batches:
        x = preprocess_batch(b, size, mean, std)
        z = sess.run([out], {inp: x})[0]
        scores.append(score(z, bank, n_id, args.scale))
    t_e2e = time.perf_counter() - t0
    scores = np.concatenate(scores)

    n = len(paths)
    res = {
        "images": n, "batch": args.batch, "threads": args.threads,
        "model": man.get("name", str(args.model)), "embed_dim": dim, "image_size": size,
        "bank_rows": [n_id, int(bank.shape[0] - n_id)], "scale": args.scale,
        "preprocess_images_per_s": n / t_pre,
        "encoder_images_per_s": n / t_enc,
        "end_to_end_images_per_s": n / t_e2e,
        "preprocess_s": t_pre, "encoder_s": t_enc, "end_to_end_s": t_e2e,
        "score_mean": float(scores.mean()),
        "python": platform.python_version(), "numpy": np.__version__,
        "pillow": Image.__version__, "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{n} images, batch {args.batch}, {args.threads} threads, model {res['model']} "
              f"(onnxruntime {ort.__version__}, Pillow {Image.__version__}, "
              f"numpy {np.__version__})")
        print(f"  preprocessing alone : {res['preprocess_images_per_s']:8.1f} images/s")
        print(f"  encoder alone       : {res['encoder_images_per_s']:8.1f} images/s")
        print(f"  end to end          : {res['end_to_end_images_per_s']:8.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
