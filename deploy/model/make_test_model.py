#!/usr/bin/env python3
"""Generate random-weight ONNX models with the real CLIP architecture (oodgate test models).

Writes DIR/image.onnx, DIR/text.onnx and DIR/model.toml (see README "Model folder contract").
Needs only the PyPI packages `onnx` and `numpy` (plus `onnxruntime` for the final check).

    make_test_model.py --preset tiny|vit-b-32|vit-b-16 -o DIR [--seed N] [--quick-gelu]
                       [--no-check] [--force]

The graphs have exactly the operators and shapes of an OpenCLIP ViT export:

  image tower: image f32 [batch,3,S,S] -> Conv patchify (no bias) -> [batch,N,W]
               -> prepend class embedding -> + positional embedding -> ln_pre
               -> L pre-norm residual blocks (multi-head self-attention, MLP 4W, GELU)
               -> ln_post on token 0 -> projection W x E -> embedding f32 [batch,E]
  text tower:  tokens i64 [batch,seq] -> token + positional embedding[:seq]
               -> Lt blocks with a causal mask [:seq,:seq] -> ln_final -> row at ArgMax(tokens)
               -> projection Wt x E -> embedding f32 [batch,E]

The text input's sequence axis is dynamic (1 <= seq <= 77; the manifest says
`dynamic_length = true`). The tower is causal and pools at the EOT position, so a batch cut
after its longest EOT (seq = max EOT position + 1) gives the same embeddings as the full
77-token rows, for a fraction of the work on short texts.

Embeddings are NOT L2-normalised in the graph. Weights are N(0, 0.02^2) from
numpy.random.default_rng(seed); LayerNorm gain 1, bias 0. Opset 18, IR version 9, one file
per tower. These models are for plumbing, batching, latency and backend parity only: never
use them for any accuracy, AUROC or threshold claim.

The output folder is written atomically (DIR.tmp-XXXX, then rename). If DIR already holds a
model.toml of the same preset, seed, activation and generator version, the script exits 0
("already present"); --force regenerates it anyway. A folder written by an older version
of this generator, or for another preset or seed, is replaced; any other existing
non-empty DIR is only replaced with --force.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - environment problem
    sys.exit("error: the PyPI package onnx is required (run deploy/setup/venv.sh)")

OPSET = 18
IR_VERSION = 9
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
SOT_ID = 49406
EOT_ID = 49407
INIT_STD = 0.02
LN_EPS = 1e-5
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
GENERATOR = "deploy/model/make_test_model.py"
# Bump whenever the graphs or the weight stream change, so that cached folders are rebuilt.
# 2: dynamic text sequence length (same weights; image.onnx unchanged).
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch: int
    width: int
    layers: int
    heads: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int


PRESETS = {
    "tiny": Preset(224, 32, 64, 2, 2, 64, 2, 2, 64),
    "vit-b-32": Preset(224, 32, 768, 12, 12, 512, 12, 8, 512),
    "vit-b-16": Preset(224, 16, 768, 12, 12, 512, 12, 8, 512),
}


class GraphBuilder:
    """Tiny helper around onnx.helper: named nodes, random/constant initializers."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[tuple[str, np.ndarray]] = []  # serialized only when saving
        self.n_params = 0
        self._counter = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None,
           n_out: int = 1, out: str | None = None, **attrs) -> str | list[str]:
        base = hint or op_type.lower()
        if out is not None:
            outs = [out]
        else:
            outs = [self.fresh(base) if n_out == 1 else self.fresh(f"{base}_o{i}")
                    for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"n_{base}"),
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def _add(self, name: str, arr: np.ndarray, param: bool) -> str:
        self.inits.append((name, arr))
        if param:
            self.n_params += arr.size
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        """A trainable tensor drawn from N(0, INIT_STD^2) in float32 (no float64 detour)."""
        arr = self.rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(INIT_STD)
        return self._add(name, arr, True)

    def ones(self, name: str, n: int) -> str:
        return self._add(name, np.ones((n,), np.float32), True)

    def zeros(self, name: str, n: int) -> str:
        return self._add(name, np.zeros((n,), np.float32), True)

    def const(self, value, dtype=np.float32) -> str:
        """A non-trainable constant (shapes, scalars), deduplicated."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self._add(self.fresh("const"), arr, False)
        return self._consts[key]

    def tensor_const(self, name: str, arr: np.ndarray) -> str:
        return self._add(name, arr, False)

    # --- layers -------------------------------------------------------------------------

    def layer_norm(self, x: str, prefix: str, width: int) -> str:
        g = self.ones(f"{prefix}.weight", width)
        b = self.zeros(f"{prefix}.bias", width)
        return self.op("LayerNormalization", [x, g, b], hint=prefix.split(".")[-1],
                       axis=-1, epsilon=LN_EPS)

    def linear(self, x: str, prefix: str, n_in: int, n_out: int, bias: bool = True) -> str:
        # Stored as [in, out] (torch's Linear weight transposed), as torch.onnx.export does.
        w = self.weight(f"{prefix}.weight_t", (n_in, n_out))
        y = self.op("MatMul", [x, w], hint=prefix.split(".")[-1])
        if bias:
            b = self.weight(f"{prefix}.bias", (n_out,))
            y = self.op("Add", [y, b], hint=prefix.split(".")[-1] + "_b")
        return y

    def gelu(self, x: str, quick: bool) -> str:
        if quick:  # QuickGELU (OpenAI weights): x * sigmoid(1.702 x)
            s = self.op("Sigmoid", [self.op("Mul", [x, self.const(1.702)])])
            return self.op("Mul", [x, s], hint="quick_gelu")
        # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))  (the pattern torch exports at opset < 20)
        e = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))])])
        e1 = self.op("Add", [e, self.const(1.0)])
        return self.op("Mul", [self.op("Mul", [x, e1]), self.const(0.5)], hint="gelu")

    def attention(self, x: str, prefix: str, width: int, heads: int,
                  mask: str | None) -> str:
        hd = width // heads
        qkv = self.linear(x, f"{prefix}.in_proj", width, 3 * width)  # [B,T,3W]
        q, k, v = self.op("Split", [qkv, self.const([width] * 3, np.int64)], hint="qkv",
                          n_out=3, axis=-1)
        heads_shape = self.const([0, 0, heads, hd], np.int64)
        q = self.op("Transpose", [self.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
        k = self.op("Transpose", [self.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
        v = self.op("Transpose", [self.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
        q = self.op("Mul", [q, self.const(1.0 / math.sqrt(hd))], hint="q_scaled")
        scores = self.op("MatMul", [q, k], hint="scores")  # [B,H,T,T]
        if mask is not None:
            scores = self.op("Add", [scores, mask], hint="masked")
        probs = self.op("Softmax", [scores], hint="probs", axis=-1)
        ctx = self.op("MatMul", [probs, v], hint="ctx")  # [B,H,T,D]
        ctx = self.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        ctx = self.op("Reshape", [ctx, self.const([0, 0, width], np.int64)])
        return self.linear(ctx, f"{prefix}.out_proj", width, width)

    def resblock(self, x: str, prefix: str, width: int, heads: int, quick: bool,
                 mask: str | None) -> str:
        h = self.layer_norm(x, f"{prefix}.ln_1", width)
        x = self.op("Add", [x, self.attention(h, f"{prefix}.attn", width, heads, mask)],
                    hint="res_attn")
        h = self.layer_norm(x, f"{prefix}.ln_2", width)
        h = self.linear(h, f"{prefix}.mlp.c_fc", width, 4 * width)
        h = self.gelu(h, quick)
        h = self.linear(h, f"{prefix}.mlp.c_proj", 4 * width, width)
        return self.op("Add", [x, h], hint="res_mlp")

    def model(self, graph_name: str, inputs, outputs, doc: str,
              meta: dict[str, str]) -> "Tower":
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="oodgate-make_test_model", producer_version="1",
                              doc_string=doc)
        m.ir_version = IR_VERSION
        for k, v in meta.items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        return Tower(m, self.inits)


@dataclass
class Tower:
    """A ModelProto whose graph lacks its initializers, plus those initializers as arrays.

    Keeping the weights as numpy arrays and streaming them into the file (see `save`) keeps
    peak memory near one copy of the weights, instead of the three or four copies that
    make_graph + make_model + SerializeToString would hold for a 350 MB tower.
    """
    proto: onnx.ModelProto
    inits: list[tuple[str, np.ndarray]]

    def to_proto(self) -> onnx.ModelProto:
        """The complete in-memory model (for small models and tests)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.proto)
        m.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.inits)
        return m


def build_image(p: Preset, rng: np.random.Generator, quick: bool,
                meta: dict[str, str]) -> tuple[Tower, int]:
    g = GraphBuilder(rng)
    w, s, pt = p.width, p.image_size, p.patch
    n_tok = (s // pt) ** 2 + 1
    conv_w = g.weight("visual.conv1.weight", (w, 3, pt, pt))
    x = g.op("Conv", ["image", conv_w], hint="patchify", kernel_shape=[pt, pt],
             strides=[pt, pt])  # [B,W,G,G]
    x = g.op("Reshape", [x, g.const([0, w, -1], np.int64)])  # [B,W,N]
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # [B,N,W]
    # class token expanded to [B,1,W] so the batch stays dynamic
    batch = g.op("Shape", [x], hint="batch", start=0, end=1)
    cls_shape = g.op("Concat", [batch, g.const([1, w], np.int64)], hint="cls_shape", axis=0)
    cls = g.weight("visual.class_embedding", (1, 1, w))
    cls = g.op("Expand", [cls, cls_shape], hint="cls")
    x = g.op("Concat", [cls, x], hint="tokens", axis=1)  # [B,N+1,W]
    x = g.op("Add", [x, g.weight("visual.positional_embedding", (n_tok, w))], hint="pos")
    x = g.layer_norm(x, "visual.ln_pre", w)
    for i in range(p.layers):
        x = g.resblock(x, f"visual.transformer.resblocks.{i}", w, p.heads, quick, None)
    x = g.op("Gather", [x, g.const(0, np.int64)], hint="cls_out", axis=1)  # [B,W]
    x = g.layer_norm(x, "visual.ln_post", w)
    g.op("MatMul", [x, g.weight("visual.proj", (w, p.embed_dim))], out="embedding")
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, s, s])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                        ["batch", p.embed_dim])
    doc = "oodgate random-weight CLIP image tower (NOT a trained model)"
    return g.model("clip_image_tower", [inp], [out], doc, meta), g.n_params


def build_text(p: Preset, rng: np.random.Generator, quick: bool,
               meta: dict[str, str]) -> tuple[Tower, int]:
    g = GraphBuilder(rng)
    w, t = p.text_width, CONTEXT_LENGTH
    x = g.op("Gather", [g.weight("token_embedding.weight", (VOCAB_SIZE, w)), "tokens"],
             hint="tok_emb", axis=0)  # [B,T,W], T = the input's length (<= 77)
    # Dynamic length: the first T rows of the positional embedding, the top-left T x T block
    # of the causal mask (the weights are drawn in the same order as with a fixed length).
    seq = g.op("Shape", ["tokens"], hint="seq_len", start=1, end=2)  # [1] int64 = [T]
    pos = g.op("Slice", [g.weight("positional_embedding", (t, w)), g.const([0], np.int64), seq,
                         g.const([0], np.int64)], hint="pos_emb")  # [T,W]
    x = g.op("Add", [x, pos], hint="pos")
    # additive causal mask, -inf above the diagonal (what OpenCLIP's attn_mask buffer holds)
    mask = np.triu(np.full((t, t), -np.inf, np.float32), k=1)
    mask_full = g.tensor_const("attn_mask", mask)
    mask_end = g.op("Concat", [seq, seq], hint="mask_end", axis=0)  # [T,T]
    mask_name = g.op("Slice", [mask_full, g.const([0, 0], np.int64), mask_end,
                               g.const([0, 1], np.int64)], hint="causal_mask")  # [T,T]
    for i in range(p.text_layers):
        x = g.resblock(x, f"transformer.resblocks.{i}", w, p.text_heads, quick, mask_name)
    x = g.layer_norm(x, "ln_final", w)
    # EOT pooling: EOT (49407) is the largest id and ArgMax returns its first occurrence,
    # so Hugging Face style padding with 49407 also works. ArgMax runs on the int64 ids
    # directly, as in torch's export of OpenCLIP's `text.argmax(dim=-1)`.
    eot = g.op("ArgMax", ["tokens"], hint="eot_pos", axis=-1, keepdims=1)  # [B,1] int64
    x = g.op("GatherND", [x, eot], hint="eot_feat", batch_dims=1)  # [B,W]
    g.op("MatMul", [x, g.weight("text_projection", (w, p.embed_dim))], out="embedding")
    inp = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                        ["batch", p.embed_dim])
    doc = "oodgate random-weight CLIP text tower (NOT a trained model)"
    return g.model("clip_text_tower", [inp], [out], doc, meta), g.n_params


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _split_fields(msg, number: int):
    """Two copies of msg: the fields numbered below `number`, and those above it."""
    lo, hi = type(msg)(), type(msg)()
    lo.CopyFrom(msg)
    hi.CopyFrom(msg)
    for field, _ in msg.ListFields():
        if field.number <= number:
            hi.ClearField(field.name)
        if field.number >= number:
            lo.ClearField(field.name)
    return lo, hi


def save(tower: Tower, path: Path) -> None:
    """Write one single-file model (no external data), streaming the initializers.

    Produces the canonical encoding, byte for byte what `to_proto().SerializeToString()`
    gives (fields in field-number order: ModelProto.graph is field 7,
    GraphProto.initializer field 5, TensorProto.raw_data field 9, the last one set).
    """
    if sys.byteorder != "little":  # raw_data is little-endian
        raise SystemExit("error: this generator assumes a little-endian host")
    entries = []  # (bytes before raw data, array)
    for name, arr in tower.inits:
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            arr = arr.copy(order="C")
        head = onnx.TensorProto(dims=arr.shape, name=name,
                                data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        tensor_head = head.SerializeToString() + _len_field(9, arr.nbytes)
        entries.append((_len_field(5, len(tensor_head) + arr.nbytes) + tensor_head, arr))
    g_lo, g_hi = _split_fields(tower.proto.graph, 5)
    g_lo, g_hi = g_lo.SerializeToString(), g_hi.SerializeToString()
    graph_len = len(g_lo) + len(g_hi) + sum(len(h) + a.nbytes for h, a in entries)
    if graph_len >= 2**31:
        raise SystemExit("error: model exceeds protobuf's 2 GB limit")
    m_lo, m_hi = _split_fields(tower.proto, 7)
    with open(path, "wb") as f:
        f.write(m_lo.SerializeToString())
        f.write(_len_field(7, graph_len))
        f.write(g_lo)
        for head, arr in entries:
            f.write(head)
            f.write(arr.data)
        f.write(g_hi)
        f.write(m_hi.SerializeToString())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(name: str, p: Preset, preset: str, seed: int, quick: bool,
             n_img: int, n_txt: int, sha_img: str, sha_txt: str) -> str:
    mean = ", ".join(repr(v) for v in OPENAI_MEAN)
    std = ", ".join(repr(v) for v in OPENAI_STD)
    return f"""# oodgate model manifest (see README "Model folder contract")
format = 1
name = "{name}"
weights = "random"
embed_dim = {p.embed_dim}
[image]
file = "image.onnx"
input = "image"
output = "embedding"
size = {p.image_size}
mean = [{mean}]
std = [{std}]
[text]
file = "text.onnx"
input = "tokens"
output = "embedding"
# attention_mask = "attention_mask"  # optional input name; when set oodgate feeds a 0/1 int64 mask
context_length = {CONTEXT_LENGTH}
dynamic_length = true            # the graph also takes [batch, L], L <= context_length
tokenizer = "clip-bpe"
pad_id = 0                       # OpenAI/OpenCLIP pad with 0; Hugging Face exports pad with 49407
[source]                         # optional provenance, free-form keys
generator = "{GENERATOR}"
generator_version = {GENERATOR_VERSION}
preset = "{preset}"
seed = {seed}
quick_gelu = {"true" if quick else "false"}
opset = {OPSET}
ir_version = {IR_VERSION}
precision = "fp32"
image_params = {n_img}
text_params = {n_txt}
image_sha256 = "{sha_img}"
text_sha256 = "{sha_txt}"
note = "random weights: for plumbing, latency and parity tests only, never for accuracy"
"""


def read_source(toml_path: Path) -> dict | None:
    """The [source] table of a manifest, or None if it cannot be read."""
    try:
        text = toml_path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        import tomllib  # Python 3.11+
        try:
            return tomllib.loads(text).get("source")
        except tomllib.TOMLDecodeError:
            return None
    except ImportError:  # Python 3.10: enough of TOML for our own manifests
        src: dict = {}
        section = None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                section = line.strip("[] ")
            elif section == "source" and "=" in line:
                k, v = (s.strip() for s in line.split("=", 1))
                if v in ("true", "false"):
                    src[k] = v == "true"
                elif re.fullmatch(r"-?\d+", v):
                    src[k] = int(v)
                else:
                    src[k] = v.strip('"')
        return src


def already_present(out: Path, preset: str, seed: int, quick: bool) -> bool:
    src = read_source(out / "model.toml")
    if not src:
        return False
    if (src.get("generator") != GENERATOR or src.get("generator_version") != GENERATOR_VERSION
            or src.get("preset") != preset
            or src.get("seed") != seed or bool(src.get("quick_gelu", False)) != quick):
        return False
    return all((out / f).is_file() and (out / f).stat().st_size > 0
               for f in ("image.onnx", "text.onnx"))


def fake_tokens(rng: np.random.Generator, batch: int,
                max_words: int = CONTEXT_LENGTH - 2) -> np.ndarray:
    """Rows shaped like CLIP tokenizer output: SOT, 1..max_words ids, EOT, zero padding."""
    toks = np.zeros((batch, CONTEXT_LENGTH), np.int64)
    for i in range(batch):
        n = int(rng.integers(1, max_words + 1))  # words between SOT and EOT
        toks[i, 0] = SOT_ID
        toks[i, 1:1 + n] = rng.integers(1, SOT_ID, size=n)
        toks[i, 1 + n] = EOT_ID
    return toks


def check(out: Path, p: Preset, seed: int) -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "check skipped: onnxruntime not importable"
    rng = np.random.default_rng(seed + 1)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    worst = worst_cut = 0.0
    inputs = {
        "image": rng.standard_normal((3, 3, p.image_size, p.image_size), dtype=np.float32),
        "tokens": fake_tokens(rng, 3),
    }
    for tower, inp in (("image", "image"), ("text", "tokens")):
        sess = ort.InferenceSession(str(out / f"{tower}.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        x = inputs[inp]
        full = sess.run(["embedding"], {inp: x})[0]
        if full.shape != (3, p.embed_dim) or full.dtype != np.float32:
            raise SystemExit(f"error: {tower} tower output {full.shape} {full.dtype}, "
                             f"want (3, {p.embed_dim}) float32")
        if not np.all(np.isfinite(full)):
            raise SystemExit(f"error: {tower} tower produced non-finite values")
        for i in range(3):
            one = sess.run(["embedding"], {inp: x[i:i + 1]})[0]
            if one.shape != (1, p.embed_dim):
                raise SystemExit(f"error: {tower} tower batch-1 output shape {one.shape}")
            d = float(np.max(np.abs(one[0] - full[i])))
            worst = max(worst, d)
            if d >= 1e-4:
                raise SystemExit(f"error: {tower} tower row {i}: batch 1 vs batch 3 "
                                 f"differ by {d:.3g}")
        if np.max(np.abs(full[0] - full[1])) < 1e-6:
            raise SystemExit(f"error: {tower} tower gives identical rows for different inputs")
        if tower == "text":
            # causal mask: ids after EOT must not change the embedding
            y = x[:1].copy()
            eot = int(np.argmax(y[0]))
            y[0, eot + 1:] = rng.integers(1, SOT_ID, size=CONTEXT_LENGTH - eot - 1)
            d = float(np.max(np.abs(sess.run(["embedding"], {inp: y})[0][0] - full[0])))
            if d >= 1e-4:
                raise SystemExit(f"error: text tower is not causal (ids after EOT moved the "
                                 f"embedding by {d:.3g})")
            # dynamic length: a batch cut after its longest EOT gives the same embeddings
            for toks in (x, fake_tokens(rng, 4, max_words=12)):
                want = full if toks is x else sess.run(["embedding"], {inp: toks})[0]
                cut = int(np.max(np.argmax(toks, axis=1))) + 1
                got = sess.run(["embedding"], {inp: np.ascontiguousarray(toks[:, :cut])})[0]
                d = float(np.max(np.abs(got - want)))
                worst_cut = max(worst_cut, d)
                if got.shape != want.shape or d >= 1e-4:
                    raise SystemExit(f"error: text tower on {cut} of {CONTEXT_LENGTH} tokens "
                                     f"differs from the full rows by {d:.3g}")
        del sess
    return (f"check ok (onnxruntime {ort.__version__}): batch 1 vs 3 max |d| = {worst:.2e}, "
            f"cut vs 77 tokens max |d| = {worst_cut:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick-gelu", action="store_true",
                    help="QuickGELU x*sigmoid(1.702x) (OpenAI weights) instead of exact GELU")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    ap.add_argument("--force", action="store_true",
                    help="regenerate even if DIR already holds this model, and replace "
                         "whatever DIR holds")
    args = ap.parse_args()
    if args.seed < 0:
        ap.error("--seed must be >= 0")

    out: Path = args.out.resolve()
    preset, seed, quick = args.preset, args.seed, args.quick_gelu
    p = PRESETS[preset]
    if not args.force and already_present(out, preset, seed, quick):
        print(f"{out}: already present ({preset}, seed {seed})")
        return 0
    # A folder this generator wrote earlier (other preset, seed or version) is replaced;
    # anything else is only replaced with --force.
    ours = (read_source(out / "model.toml") or {}).get("generator") == GENERATOR
    if out.exists() and not (args.force or ours) and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and was not written by this generator; "
              f"pass --force to replace it", file=sys.stderr)
        return 1

    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets normal modes
    try:
        name = f"{preset}-random" + ("-quickgelu" if quick else "")
        meta = {"oodgate.preset": preset, "oodgate.seed": str(seed),
                "oodgate.weights": "random", "oodgate.quick_gelu": str(quick).lower()}
        # one generator stream: image tower first, then text tower
        rng = np.random.default_rng(seed)
        model, n_img = build_image(p, rng, quick, meta)
        save(model, tmp / "image.onnx")
        del model  # free the weights before the checker loads the file
        onnx.checker.check_model(str(tmp / "image.onnx"))
        model, n_txt = build_text(p, rng, quick, meta)
        save(model, tmp / "text.onnx")
        del model
        onnx.checker.check_model(str(tmp / "text.onnx"))
        t_gen = time.monotonic() - t0
        sha_img, sha_txt = sha256_file(tmp / "image.onnx"), sha256_file(tmp / "text.onnx")
        msg = "check skipped (--no-check)" if args.no_check else check(tmp, p, seed)
        (tmp / "model.toml").write_text(
            manifest(name, p, preset, seed, quick, n_img, n_txt, sha_img, sha_txt),
            encoding="utf-8")

        old = None
        if out.exists():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:  # ours or --force: move the old folder aside, swap in the new one
                old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
                os.rename(out, old / "x")
        try:
            os.rename(tmp, out)
        except OSError:
            if already_present(out, preset, seed, quick):  # a concurrent run won the race
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"{out}: already present ({preset}, seed {seed})")
                return 0
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    mb = lambda f: (out / f).stat().st_size / 1e6  # noqa: E731
    print(f"{out}: {name} image {n_img / 1e6:.2f} M params ({mb('image.onnx'):.1f} MB), "
          f"text {n_txt / 1e6:.2f} M params ({mb('text.onnx'):.1f} MB); "
          f"generated in {t_gen:.1f} s, total {time.monotonic() - t0:.1f} s; {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
