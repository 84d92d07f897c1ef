#!/usr/bin/env python3
"""Write an encoder variant (fused fp32, int8 or fp16) of a model folder's image tower.

    optimize.py --reference REF_DIR --out OUT_DIR --precision {fp32,int8,fp16}
                [--num-heads N] [--hidden-size W] [--model-type clip|vit]
                [--static --calibration-images DIR [--calibration-count N]]
                [--calibration-images DIR]  (with any precision: the comparison batch)
                [--quantize-all] [--reduce-range] [--int8-base auto|fused|plain]
                [--external-data] [--seed N] [--json] [--verbose] [--force]

Reads REF_DIR/model.toml (or model.json) and its image tower, writes OUT_DIR/image.onnx and
OUT_DIR/model.toml. Needs the PyPI packages onnx, onnxruntime, numpy and sympy (the
optimizer's symbolic shape inference), plus pillow for --calibration-images.

Precisions:

  fp32  The ONNX Runtime transformers optimizer (onnxruntime.transformers.optimizer, model
        type `clip` by default, its Python fusions only: opt_level 0, so the file is not tied
        to one execution provider). num_heads and hidden_size are read from the graph (the
        patch Conv's output channels, the [.., .., heads, head_dim] Reshape of the attention)
        unless given. It fuses LayerNorm / SkipLayerNorm / GELU / BiasGelu / Attention where
        its patterns match; the counts are reported as found. The fused attention patterns
        are those of Hugging Face CLIP exports: OpenCLIP's packed in_proj + Split attention
        (our make_test_model.py graphs, export_openclip.py exports) is not fused.
  int8  Signed int8 per-channel weights. By default dynamic quantization (quantize_dynamic,
        QInt8 weights, MatMul with a constant weight only), applied to the fused fp32 graph
        when attention was fused there, else to the plain graph. --static quantizes with
        QDQ nodes (int8 activations and weights, S8S8), calibrated with MinMax on
        --calibration-count CLIP-preprocessed images from --calibration-images. The patch
        embedding (the first Conv after the input) and the final projection (the last
        MatMul/Gemm before the output) are found in the graph and kept in float unless
        --quantize-all. --reduce-range uses 7-bit weights (may help on CPUs without VNNI).
  fp16  For CUDA: onnxruntime.transformers.float16.convert_float_to_float16 on the plain
        graph with keep_io_types=True (input and output stay float32, as oodgate feeds
        them) and the library's default op_block_list (only non-neural ops, none of which a
        CLIP tower has): LayerNormalization and Softmax run in float16, which ONNX Runtime's
        CUDA kernels accumulate in float32. The CPU execution provider usually lacks float16
        kernels; then the check is skipped with a message.

--external-data stores the weights in OUT_DIR/image.onnx.data (ONNX external data, listed in
the manifest's [image] external_data and covered by the fingerprint and image_sha256): the
worker's load peak, and so its peak memory, was about 75 MiB lower on ViT-B/32 (README
"Performance").

The variant has no text tower (serving never needs one; banks are built with the
reference's text tower). Its manifest copies the reference's top-level fields, [image]
(file = "image.onnx") and [source], is named "<reference name>-<precision>", and adds a
[variant] table: precision, of (the reference's fingerprint: SHA-256 over the SHA-256 digests
of its image file and, when it has [text], its text file; what oodgate computes),
reference_name, method, tool and image_sha256.

Before installing, the variant is loaded in onnxruntime (CPU) and run next to the reference
on one batch of 8 inputs (seeded N(0,1) tensors, or preprocessed images when
--calibration-images is given); one summary line gives the sizes, the min / median cosine of
the embeddings against the reference and the fused and quantized op counts (--json: the same
as JSON). Output shape, dtype and finiteness are checked; the cosine is reported, not
judged. A variant, int8 above all, must pass `oodgate model check` against its reference
before it serves: thresholds and banks calibrated on the reference do not carry over
blindly.

OUT_DIR is written atomically (OUT_DIR.tmp-XXXX beside it, then a rename); an existing
non-empty OUT_DIR is only replaced with --force. Exit status 0 on success, 1 on any error
(missing or invalid reference, unsupported graph, failed check), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import NoReturn

DATA_FILE = "image.onnx.data"
TOOL = "deploy/model/optimize.py"
MANIFEST_FILES = ("model.toml", "model.json")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
EVAL_BATCH = 8
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Ops the optimizer can fuse, as onnxruntime.transformers names them (Attention and
# MultiHeadAttention are counted together as "Attention").
FUSED_OPS = ("SkipLayerNormalization", "LayerNormalization", "BiasGelu", "Gelu", "FastGelu",
             "QuickGelu", "BiasAdd", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization")
QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QAttention",
             "QLinearMatMul", "QLinearConv")


def die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()


# --- manifest ---------------------------------------------------------------------------

def read_manifest(ref: Path) -> tuple[dict, Path]:
    if not ref.is_dir():
        die(f"reference {ref} is not a folder")
    path = next((ref / f for f in MANIFEST_FILES if (ref / f).is_file()), None)
    if path is None:
        die(f"reference {ref} has no model.toml or model.json")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            m = json.loads(text)
        else:
            import tomllib  # Python 3.11+
            m = tomllib.loads(text)
    except Exception as e:  # noqa: BLE001 - TOMLDecodeError / JSONDecodeError
        die(f"invalid manifest {path}: {e}")
    if not isinstance(m.get("image"), dict) or "file" not in m["image"]:
        die(f"invalid manifest {path}: no [image] table with a file")
    if not isinstance(m.get("embed_dim"), int) or m["embed_dim"] <= 0:
        die(f"invalid manifest {path}: embed_dim must be a positive integer")
    if "variant" in m:
        die(f"{ref} is itself a variant ({m['variant'].get('precision')} of "
            f"{m['variant'].get('reference_name')}); use the reference model folder")
    return m, path


def fingerprint(ref: Path, m: dict) -> str:
    """What oodgate computes (ModelManifest::fingerprint): SHA-256 over the raw SHA-256
    digests of the image file, its external data files, then the text file when the manifest
    has [text]."""
    files = [ref / m["image"]["file"]]
    files += [ref / f for f in m["image"].get("external_data", [])]
    if isinstance(m.get("text"), dict):
        files.append(ref / m["text"]["file"])
    outer = hashlib.sha256()
    for f in files:
        if not f.is_file():
            die(f"reference encoder file {f} is missing")
        outer.update(sha256_file(f))
    return outer.hexdigest()


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def toml_value(v) -> str:
    import datetime
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are valid TOML escapes
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()
                               if x is not None) + "}"
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


def toml_table(header: str, table: dict, comments: dict | None = None,
               header_comment: str = "") -> list[str]:
    """[header] with scalar keys first, then sub-tables as [header.sub]."""
    comments = comments or {}
    lines = [f"[{header}]" + (f"{'':<28} # {header_comment}" if header_comment else "")]
    subs = []
    for k, v in table.items():
        if v is None:  # (JSON null: TOML has none)
            continue
        if isinstance(v, dict):
            subs.append((k, v))
            continue
        line = f"{toml_key(k)} = {toml_value(v)}"
        if k in comments:
            line = f"{line:<40} # {comments[k]}"
        lines.append(line)
    for k, v in subs:
        lines += toml_table(f"{header}.{toml_key(k)}", v)
    return lines


def variant_manifest(ref_m: dict, precision: str, variant: dict, checked: str,
                     data_files: list[str]) -> str:
    name = f"{ref_m.get('name') or 'model'}-{precision}"
    lines = ["# oodgate model manifest (see README \"Model folder contract\"): an encoder",
             f"# variant written by {TOOL}; no text tower (banks use the reference's)"]
    top = {k: v for k, v in ref_m.items() if not isinstance(v, dict) and v is not None}
    if "name" not in top:
        top = {"format": top.pop("format", 1), "name": name, **top}
    for k, v in top.items():
        lines.append(f"{toml_key(k)} = {toml_value(name if k == 'name' else v)}")
    image = dict(ref_m["image"])
    image["file"] = "image.onnx"
    image.pop("external_data", None)
    if data_files:
        image["external_data"] = data_files
    lines += toml_table("image", image)
    lines += toml_table("variant", variant, {
        "of": "fingerprint of the reference model",
        "image_sha256": "SHA-256 of this folder's image.onnx (with external data: over the "
                        "SHA-256 of it and of each data file)",
    })
    lines.append(f"# {checked}")
    if isinstance(ref_m.get("source"), dict):
        lines += toml_table("source", ref_m["source"],
                            header_comment="the reference's provenance")
    text = "\n".join(lines) + "\n"
    import tomllib
    parsed = tomllib.loads(text)  # must round-trip
    if parsed.get("variant") != variant or parsed.get("name") != name:
        raise RuntimeError("the written manifest does not parse back")
    return text


# --- graph inspection -------------------------------------------------------------------

def const_value(graph, name: str):
    """The numpy value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def const_dims(graph, name: str) -> list[int] | None:
    """The shape of an initializer (without reading its data, which may be external)."""
    for init in graph.initializer:
        if init.name == name:
            return list(init.dims)
    return None


def initializer_names(graph) -> set[str]:
    return {i.name for i in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"}


def find_patch_conv(graph, input_name: str, max_depth: int = 6):
    """The first Conv with a constant weight downstream of the image input."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = initializer_names(graph)
    seen, q = set(), deque([(input_name, 0)])
    while q:
        t, d = q.popleft()
        for n in consumers.get(t, []):
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in consts:
                return n
            if d < max_depth:
                q.extend((o, d + 1) for o in n.output)
    return None


def find_projection(graph, output_name: str, max_depth: int = 6):
    """The MatMul/Gemm with a constant weight nearest upstream of the output."""
    producer = {o: n for n in graph.node for o in n.output}
    consts = initializer_names(graph)
    seen, q = set(), deque([(output_name, 0)])
    while q:
        t, d = q.popleft()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type in ("MatMul", "Gemm") and any(i in consts for i in n.input[:2]):
            return n
        if d < max_depth:
            q.extend((i, d + 1) for i in n.input if i and i not in consts)
    return None


def detect_dims(graph, input_name: str) -> tuple[int, int]:
    """(num_heads, hidden_size) read from the graph; 0 where not found."""
    hidden = 0
    conv = find_patch_conv(graph, input_name)
    if conv is not None:
        w = const_dims(graph, conv.input[1])
        if w is not None and len(w) == 4:
            hidden = int(w[0])
    if not hidden:  # the most common LayerNorm width
        widths = Counter()
        for n in graph.node:
            if n.op_type == "LayerNormalization" and len(n.input) > 1:
                s = const_dims(graph, n.input[1])
                if s is not None and len(s) == 1:
                    widths[int(s[0])] += 1
        if widths:
            hidden = widths.most_common(1)[0][0]
    heads = Counter()
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        shape = const_value(graph, n.input[1])
        hd = None
        if shape is not None and shape.ndim == 1 and shape.size == 4:
            hd = (int(shape[2]), int(shape[3]))
        else:
            p = producer.get(n.input[1])
            if p is not None and p.op_type == "Concat" and len(p.input) == 4:
                a, b = const_value(graph, p.input[2]), const_value(graph, p.input[3])
                if a is not None and b is not None and a.size == 1 and b.size == 1:
                    hd = (int(a.reshape(-1)[0]), int(b.reshape(-1)[0]))
        if hd and hd[0] > 0 and hd[1] > 0 and (not hidden or hd[0] * hd[1] == hidden):
            heads[hd] += 1
    if heads:
        (h, d), _ = heads.most_common(1)[0]
        return h, hidden or h * d
    return 0, hidden


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def name_nodes(model) -> None:
    """Give unnamed nodes unique names (the quantizer excludes nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            k = f"{n.op_type}_{i}"
            while k in used:
                k += "_"
            n.name = k
            used.add(k)


def tidy(path: Path, ref_ir: int) -> None:
    """Keep the reference's IR version (the converters may raise it for no feature) and drop
    the opset imports no node uses (quant_pre_process's ONNX Runtime pass lists every domain
    it knows)."""
    import onnx
    model = onnx.load(str(path))
    changed = False
    if model.ir_version > ref_ir >= 7:
        model.ir_version, changed = ref_ir, True
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        changed = True
    if changed:
        onnx.save(model, str(path))


# --- inputs -----------------------------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        die(f"--calibration-images {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        die(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {folder}")
    return files


def preprocess(path: Path, size: int, mean, std):
    """CLIP preprocessing as oodgate does it (Pillow + torchvision semantics): RGB, shortest
    side to `size` with bicubic, centre crop, /255, mean/std, CHW float32."""
    import numpy as np
    from PIL import Image
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
        a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def load_images(files: list[Path], size: int, mean, std):
    import numpy as np
    out = []
    for f in files:
        try:
            out.append(preprocess(f, size, mean, std))
        except Exception as e:  # noqa: BLE001 - any decode error
            die(f"cannot read calibration image {f}: {e}")
    return np.stack(out).astype(np.float32)


class ImageReader:
    """onnxruntime.quantization CalibrationDataReader over preprocessed images."""

    def __init__(self, input_name: str, images, batch: int = 8):
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        x = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: x}

    def rewind(self):
        self.pos = 0


# --- the conversions --------------------------------------------------------------------

def fuse(src: Path, model_type: str, heads: int, hidden: int, verbose: bool):
    """Python fusions of the transformers optimizer; returns (OnnxModel, fused op counts)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    before = op_counts(onnx.load(str(src), load_external_data=False))
    opts = FusionOptions(model_type)
    with quiet(verbose):
        opt = optimize_model(str(src), model_type=model_type, num_heads=heads,
                             hidden_size=hidden, optimization_options=opts, opt_level=0,
                             use_gpu=False)
    after = op_counts(opt.model)
    fused = {op: after[op] for op in FUSED_OPS if after[op] > before[op]}
    fused["Attention"] = after["Attention"] + after["MultiHeadAttention"] \
        - before["Attention"] - before["MultiHeadAttention"]
    return opt, fused


@contextlib.contextmanager
def quiet(verbose: bool):
    """Silence the libraries' logging (e.g. "Model producer not matched") unless --verbose."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


def describe_fusion(fused: dict) -> str:
    parts = [f"{op} x{n}" for op, n in fused.items() if op != "Attention" and n > 0]
    att = fused.get("Attention", 0)
    parts.append(f"Attention x{att}" if att else "no Attention fused")
    return ", ".join(parts)


def build(args, ref: Path, ref_m: dict, work: Path, dst: Path, calib) -> dict:
    """Writes the variant to dst; returns facts for the manifest and the summary."""
    import onnx
    src = ref / ref_m["image"]["file"]
    img = ref_m["image"]
    in_name, out_name = img.get("input", "image"), img.get("output", "embedding")
    ref_proto = onnx.load(str(src), load_external_data=False)
    g = ref_proto.graph
    ins = [i.name for i in g.input if i.name not in initializer_names(g)]
    outs = [o.name for o in g.output]
    if in_name not in ins or out_name not in outs:
        die(f"unsupported graph {src}: expected input {in_name!r} and output {out_name!r}, "
            f"found inputs {ins} and outputs {outs}")
    t = next(i.type.tensor_type for i in g.input if i.name == in_name)
    if t.elem_type != onnx.TensorProto.FLOAT or len(t.shape.dim) != 4:
        die(f"unsupported graph {src}: input {in_name!r} is not a 4-D float32 tensor")
    ref_ir = ref_proto.ir_version
    facts: dict = {"fused": {}, "quantized": {}}

    need_fusion = args.precision == "fp32" or (
        args.precision == "int8" and not args.static and args.int8_base != "plain")
    fused_path = None
    if need_fusion:
        heads, hidden = detect_dims(g, in_name)
        heads, hidden = args.num_heads or heads, args.hidden_size or hidden
        if args.precision == "fp32" and (heads <= 0 or hidden <= 0):
            die(f"unsupported graph {src}: cannot read the number of heads / hidden size "
                f"from it; pass --num-heads and --hidden-size")
        if heads and hidden and hidden % heads:
            die(f"--hidden-size {hidden} is not a multiple of --num-heads {heads}")
        facts["heads"], facts["hidden"] = heads, hidden
        opt, fused = fuse(src, args.model_type, heads, hidden, args.verbose)
        facts["fused"] = fused
        fused_path = work / "fused.onnx"
        opt.save_model_to_file(str(fused_path), use_external_data_format=False)
        del opt

    if args.precision == "fp32":
        shutil.move(str(fused_path), dst)
        tidy(dst, ref_ir)
        facts["method"] = (f"onnxruntime.transformers optimizer, model_type {args.model_type}, "
                           f"{facts['heads']} heads, hidden {facts['hidden']}, Python fusions "
                           f"only (opt_level 0): {describe_fusion(facts['fused'])}")
        return facts

    if args.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = onnx.load(str(src))
        with quiet(args.verbose):
            model = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(model, str(dst))
        tidy(dst, ref_ir)
        facts["method"] = ("float16 weights and compute (convert_float_to_float16, "
                           "keep_io_types, default op_block_list) on the plain graph; "
                           "float32 input and output; for CUDA")
        return facts

    # int8
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    att = facts["fused"].get("Attention", 0)
    use_fused = fused_path is not None and (args.int8_base == "fused" or att > 0)
    base = fused_path if use_fused else src
    facts["int8_base"] = "fused" if use_fused else "plain"
    if not use_fused:
        facts["fused"] = {}
    prep = work / "prep.onnx"
    # Shape inference (symbolic, for the transformer's dynamic axes) and the basic,
    # provider-independent graph optimisations the quantizer expects.
    with quiet(args.verbose):
        quant_pre_process(str(base), str(prep), skip_optimization=False)
    model = onnx.load(str(prep))
    name_nodes(model)
    g = model.graph
    exclude, kept = [], []
    if not args.quantize_all:
        conv = find_patch_conv(g, in_name)
        proj = find_projection(g, out_name)
        if conv is not None:
            exclude.append(conv.name)
            kept.append("patch embedding")
        if proj is not None:
            exclude.append(proj.name)
            kept.append("projection")
        if conv is None or proj is None:
            print("warning: " + " and ".join(
                w for w, n in (("no patch-embedding Conv", conv), ("no final projection", proj))
                if n is None) + " found; nothing to keep in float there", file=sys.stderr)
    facts["excluded"] = exclude
    onnx.save(model, str(prep))
    ops = ["MatMul"] + (["Attention"] if use_fused else []) + (["Conv"] if args.quantize_all
                                                               else [])
    tail = ((", " + " and ".join(kept) + " in float") if kept else
            (", all MatMul/Conv weights quantized" if args.quantize_all else ""))
    rr = ", 7-bit range (reduce_range)" if args.reduce_range else ""
    # DefaultTensorType: the type of tensors shape inference leaves untyped (com.microsoft ops)
    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    with quiet(args.verbose):
        if args.static:
            from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                                  quantize_static)
            reader = ImageReader(in_name, calib)
            quantize_static(str(prep), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=ops, per_channel=True,
                            reduce_range=args.reduce_range, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options=extra)
            facts["method"] = (f"static QDQ int8 (S8S8), per-channel weights, MinMax "
                               f"calibration on {len(calib)} images, "
                               f"{'/'.join(ops)} with constant weights{rr}{tail}")
        else:
            quantize_dynamic(str(prep), str(dst), op_types_to_quantize=ops, per_channel=True,
                             reduce_range=args.reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude, extra_options=extra)
            facts["method"] = (f"dynamic per-channel int8 weights (quantize_dynamic, QInt8), "
                               f"{'/'.join(ops)} with constant weights, on the "
                               f"{'fused' if use_fused else 'plain'} fp32 graph{rr}{tail}")
    model = onnx.load(str(dst))
    c = op_counts(model)
    if args.static:
        facts["quantized"] = {"QDQ weights": sum(
            1 for n in model.graph.node if n.op_type == "DequantizeLinear"
            and n.input[0] in initializer_names(model.graph))}
    else:
        facts["quantized"] = {op: c[op] for op in QUANT_OPS if c[op]}
    if not sum(facts["quantized"].values()):
        die(f"unsupported graph {src}: the quantizer quantized nothing")
    if model.ir_version > ref_ir >= 7:
        onnx.save(model, str(dst))
        tidy(dst, ref_ir)
    return facts


# --- the check --------------------------------------------------------------------------

def session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare(ref_path: Path, var_path: Path, in_name: str, out_name: str, embed_dim: int,
            x, precision: str) -> dict:
    import numpy as np
    try:
        want = session(ref_path).run([out_name], {in_name: x})[0]
    except Exception as e:  # noqa: BLE001
        die(f"unsupported graph {ref_path}: the reference does not run on a "
            f"{list(x.shape)} float32 batch: {e}")
    try:
        sess = session(var_path)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        if precision == "fp16":
            first = str(e).strip().splitlines()[0][:200]
            return {"skipped": f"the CPU execution provider cannot run it ({first}); "
                               f"check it on CUDA"}
        die(f"the variant does not load in onnxruntime: {e}")
    try:
        got = sess.run([out_name], {in_name: x})[0]
    except Exception as e:  # noqa: BLE001
        if precision == "fp16":
            return {"skipped": f"the CPU execution provider cannot run it ({e}); "
                               f"check it on CUDA"}
        die(f"the variant fails to run in onnxruntime: {e}")
    if got.shape != (x.shape[0], embed_dim) or got.dtype != np.float32:
        die(f"the variant outputs {got.shape} {got.dtype}, want "
            f"({x.shape[0]}, {embed_dim}) float32")
    if not np.all(np.isfinite(got)):
        die("the variant produced non-finite values")
    a, b = want.astype(np.float64), got.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    res = {"cosine_min": float(cos.min()), "cosine_median": float(statistics.median(cos))}
    if precision == "fp16":
        res["note"] = ("on CPU, onnxruntime computes the float16 nodes it has no CPU kernel for "
                       "in float32 (inserted Casts): this measures weight rounding, not CUDA's "
                       "float16 arithmetic")
    return res


# --- main -------------------------------------------------------------------------------

def install(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.rename(out, old / "x")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for what each precision does.")
    ap.add_argument("--reference", type=Path, required=True, help="the reference model folder")
    ap.add_argument("--out", type=Path, required=True, help="the variant folder to write")
    ap.add_argument("--precision", required=True, choices=("fp32", "int8", "fp16"))
    ap.add_argument("--num-heads", type=int, default=0, help="attention heads (default: from "
                    "the graph)")
    ap.add_argument("--hidden-size", type=int, default=0, help="transformer width (default: "
                    "from the graph)")
    ap.add_argument("--model-type", choices=("clip", "vit"), default="clip",
                    help="the optimizer's model type (default clip)")
    ap.add_argument("--static", action="store_true",
                    help="int8: static QDQ quantization calibrated on --calibration-images")
    ap.add_argument("--calibration-images", type=Path,
                    help="images for static calibration; with any precision also the "
                         "comparison batch")
    ap.add_argument("--calibration-count", type=int, default=64,
                    help="images used for calibration (default 64)")
    ap.add_argument("--quantize-all", action="store_true",
                    help="int8: quantize the patch embedding and the projection too")
    ap.add_argument("--reduce-range", action="store_true",
                    help="int8: 7-bit weights (may help accuracy on CPUs without VNNI)")
    ap.add_argument("--int8-base", choices=("auto", "fused", "plain"), default="auto",
                    help="dynamic int8: quantize the fused graph (auto: when attention was "
                         "fused) or the plain one")
    ap.add_argument("--external-data", action="store_true",
                    help="store the weights in image.onnx.data beside the graph (ONNX external "
                         "data): a lower peak memory when the worker loads the model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random comparison batch")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--verbose", action="store_true", help="keep the libraries' logging")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = ap.parse_args()
    if args.precision != "int8":
        for flag, on in (("--static", args.static), ("--quantize-all", args.quantize_all),
                         ("--reduce-range", args.reduce_range),
                         ("--int8-base", args.int8_base != "auto")):
            if on:
                ap.error(f"{flag} only applies to --precision int8")
    if args.static and args.calibration_images is None:
        ap.error("--static needs --calibration-images DIR")
    if args.static and args.int8_base == "fused":
        ap.error("--static quantizes the plain graph (--int8-base fused is for dynamic int8)")
    if args.calibration_count < 1:
        ap.error("--calibration-count must be >= 1")
    if args.num_heads < 0 or args.hidden_size < 0:
        ap.error("--num-heads and --hidden-size must be positive")

    try:
        import numpy as np
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as e:
        die(f"{e.name} is missing: the PyPI packages onnx, onnxruntime and numpy are needed "
            f"(run deploy/setup/venv.sh)")
    try:
        import sympy  # noqa: F401
    except ImportError:
        die("the PyPI package sympy is missing (onnxruntime's symbolic shape inference "
            "needs it; run deploy/setup/venv.sh)")

    t0 = time.monotonic()
    ref, out = args.reference.resolve(), args.out.resolve()
    ref_m, _ = read_manifest(ref)
    if out == ref or out in ref.parents:
        die(f"--out {out} would replace the reference folder")
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        die(f"{out} exists and is not empty; pass --force to replace it")
    img = ref_m["image"]
    src = ref / img["file"]
    if not src.is_file():
        die(f"reference image tower {src} is missing")
    fp = fingerprint(ref, ref_m)
    in_name, out_name = img.get("input", "image"), img.get("output", "embedding")
    size = int(img.get("size", 224))
    mean, std = img.get("mean", CLIP_MEAN), img.get("std", CLIP_STD)

    # comparison batch (and calibration set)
    eval_note = f"{EVAL_BATCH} random N(0,1) inputs, seed {args.seed}"
    calib = None
    if args.calibration_images is not None:
        files = list_images(args.calibration_images)
        calib_files = files[:args.calibration_count]
        rest = files[len(calib_files):]
        eval_files = (rest if len(rest) >= EVAL_BATCH else files)[:EVAL_BATCH]
        if args.static:
            calib = load_images(calib_files, size, mean, std)
        x = load_images(eval_files, size, mean, std)
        held = " held-out" if args.static and eval_files[0] in rest else ""
        eval_note = f"{len(eval_files)}{held} images from {args.calibration_images}"
    else:
        x = np.random.default_rng(args.seed).standard_normal(
            (EVAL_BATCH, 3, size, size), dtype=np.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets normal modes
    try:
        work = tmp / ".work"
        work.mkdir()
        dst = tmp / "image.onnx"
        try:
            facts = build(args, ref, ref_m, work, dst, calib)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - the converters raise anything
            die(f"{args.precision} conversion of {src} failed: {type(e).__name__}: {e}")
        shutil.rmtree(work)
        check = compare(src, dst, in_name, out_name, ref_m["embed_dim"], x, args.precision)
        if "skipped" in check:
            checked = f"not run on CPU: {check['skipped']}"[:300]
        else:
            checked = (f"checked with onnxruntime {ort.__version__} (CPU): cosine vs reference "
                       f"min {check['cosine_min']:.6f} median {check['cosine_median']:.6f} "
                       f"({eval_note})")
            if "note" in check:
                checked += "; float16 nodes ran as float32 on CPU: weight rounding only"
        data_files = []
        digest = sha256_file(dst).hex()
        if args.external_data:
            model = onnx.load(str(dst))
            onnx.save_model(model, str(dst), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
            data_files = [DATA_FILE]
            # oodgate's ModelManifest::image_digest: over the file's and each data file's digest
            outer = hashlib.sha256(sha256_file(dst))
            outer.update(sha256_file(tmp / DATA_FILE))
            digest = outer.hexdigest()
        variant = {
            "precision": args.precision,
            "of": fp,
            "reference_name": ref_m.get("name", ""),
            "method": facts["method"] + (", weights as external data" if data_files else ""),
            "tool": TOOL,
            "image_sha256": digest,
        }
        (tmp / "model.toml").write_text(
            variant_manifest(ref_m, args.precision, variant, checked, data_files),
            encoding="utf-8")
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    ref_mb = (src.stat().st_size + sum((ref / f).stat().st_size
                                       for f in img.get("external_data", []))) / 1e6
    var_mb = sum(f.stat().st_size for f in (out / "image.onnx", out / DATA_FILE)
                 if f.is_file()) / 1e6
    summary = {
        "precision": args.precision, "out": str(out), "name": f"{ref_m.get('name')}-"
        f"{args.precision}", "reference_mb": round(ref_mb, 2), "variant_mb": round(var_mb, 2),
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in check.items()},
        "inputs": eval_note, "fused": facts["fused"], "quantized": facts["quantized"],
        "excluded": facts.get("excluded", []), "method": facts["method"], "fingerprint_of": fp,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if "int8_base" in facts:
        summary["int8_base"] = facts["int8_base"]
    if args.json:
        print(json.dumps(summary))
    else:
        cos = (f"cosine min {check['cosine_min']:.6f} median {check['cosine_median']:.6f} "
               f"({eval_note}{'; CPU: weight rounding only' if 'note' in check else ''})"
               if "skipped" not in check
               else f"check skipped: {check['skipped']}")
        fused = (", ".join(f"{k} {v}" for k, v in facts["fused"].items())
                 if facts["fused"] else "none")
        q = ", ".join(f"{k} {v}" for k, v in facts["quantized"].items())
        print(f"{args.precision}: {ref_mb:.1f} MB -> {var_mb:.1f} MB; {cos}; fused: {fused}"
              + (f"; quantized: {q}" if q else "") + f"; {out} ({summary['seconds']} s)")
    if "cosine_min" in check and check["cosine_min"] < 0.99:
        print(f"warning: min cosine {check['cosine_min']:.4f} < 0.99 against the reference",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - one clear line; --verbose for the traceback
        if "--verbose" in sys.argv:
            raise
        die(f"{type(e).__name__}: {e}")
