#!/usr/bin/env python3
"""Export an OpenCLIP (or OpenAI CLIP) checkpoint to an oodgate model folder.

Writes DIR/image.onnx, DIR/text.onnx and DIR/model.toml (README "Model folder contract"):

  image.onnx  input `image`  f32 [batch, 3, S, S]  ->  output `embedding` f32 [batch, E]
  text.onnx   input `tokens` i64 [batch, seq]      ->  output `embedding` f32 [batch, E]

The text tower is exported with a dynamic sequence axis (seq <= 77): a wrapper slices the
positional embedding to positional_embedding[:seq] and the model's 77 x 77 causal mask buffer
(`attn_mask`) to attn_mask[:seq, :seq]. The tower is causal and pools at the EOT token, so a
batch cut after its longest EOT gives the same embeddings as full 77-token rows; the manifest
then says `dynamic_length = true` (checked with onnxruntime on full and cut rows). For the
export the text transformer's nn.MultiheadAttention modules are swapped for an equivalent
plain implementation, because torch's traces a constant sequence length into them. Text
towers that are not causal, pool elsewhere or append a class token (CoCa) are exported with
a fixed [batch, 77] input and `dynamic_length = false`.

Embeddings are NOT L2-normalised (encode_image / encode_text with normalize=False); oodgate
normalises them itself.

Needs torch, open_clip and internet access for the weights (this is not run in CI):

    pip install torch open_clip_torch onnx onnxruntime

Examples:

    # OLE's backbone (docs/method.md section 1): OpenCLIP ViT-B/16 trained on LAION-2B
    export_openclip.py --model ViT-B-16 --pretrained laion2b_s34b_b88k -o models/vit-b-16-laion2b
    # OpenAI CLIP ViT-B/32 (for the MCM / NegLabel / EOE baselines); QuickGELU is switched
    # on automatically because the pretrained tag asks for it (same as ViT-B-32-quickgelu)
    export_openclip.py --model ViT-B-32 --pretrained openai -o models/vit-b-32-openai
    # the architecture only, random weights, nothing downloaded
    export_openclip.py --model ViT-B-16 --random-init -o models/vit-b-16-random-torch

With --fp16 the weights are converted to float16 after export (needs the PyPI package
onnxconverter-common); inputs and outputs stay float32. An fp16 model is a separate artefact
and needs its own thresholds.

Check the weights' licence before redistributing an exported folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IR_VERSION = 9  # what the ONNX Runtime builds and tract versions oodgate uses load
GENERATOR = "deploy/model/export_openclip.py"


def die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def import_torch_stack():
    try:
        import torch
    except ImportError:
        die("torch is not installed; run: pip install torch open_clip_torch")
    try:
        import open_clip
    except ImportError:
        die("open_clip is not installed; run: pip install torch open_clip_torch")
    try:
        import onnx
    except ImportError:
        die("onnx is not installed; run: pip install onnx")
    return torch, open_clip, onnx


def preprocess_config(model) -> dict:
    """Image size, mean and std as OpenCLIP's own preprocessing uses them."""
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})  # open_clip >= 2.24
    if "size" not in cfg and getattr(visual, "image_size", None) is not None:
        cfg["size"] = visual.image_size
    if "mean" not in cfg and getattr(visual, "image_mean", None) is not None:
        cfg["mean"] = visual.image_mean
    if "std" not in cfg and getattr(visual, "image_std", None) is not None:
        cfg["std"] = visual.image_std
    cfg.setdefault("size", 224)
    cfg.setdefault("mean", OPENAI_MEAN)
    cfg.setdefault("std", OPENAI_STD)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            die(f"non-square image size {tuple(size)} is not supported by oodgate")
        size = size[0]
    cfg["size"] = int(size)
    cfg["mean"] = [float(v) for v in cfg["mean"]]
    cfg["std"] = [float(v) for v in cfg["std"]]
    return cfg


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else
                                                 ("inf" if v > 0 else "-inf"))
    return json.dumps(str(v), ensure_ascii=False)  # a valid TOML basic string


def write_manifest(path: Path, name: str, weights: str, embed_dim: int, pp: dict,
                   context_length: int, dynamic_length: bool, source: dict) -> None:
    mean = ", ".join(repr(v) for v in pp["mean"])
    std = ", ".join(repr(v) for v in pp["std"])
    src = "\n".join(f"{k} = {toml_value(v)}" for k, v in source.items())
    path.write_text(f"""# oodgate model manifest (see README "Model folder contract")
format = 1
name = {toml_value(name)}
weights = "{weights}"
embed_dim = {embed_dim}
[image]
file = "image.onnx"
input = "image"
output = "embedding"
size = {pp["size"]}
mean = [{mean}]
std = [{std}]
[text]
file = "text.onnx"
input = "tokens"
output = "embedding"
# attention_mask = "attention_mask"  # optional input name; when set oodgate feeds a 0/1 int64 mask
context_length = {context_length}
dynamic_length = {toml_value(dynamic_length)}{"            # the graph also takes [batch, L], L <= context_length" if dynamic_length else "           # feed full context_length rows"}
tokenizer = "clip-bpe"
pad_id = 0                       # OpenAI/OpenCLIP pad with 0; Hugging Face exports pad with 49407
[source]                         # optional provenance, free-form keys
{src}
""", encoding="utf-8")


def export_tower(torch, onnx, module, example, path: Path, input_name: str, opset: int,
                 seq_axis: bool = False):
    in_axes = {0: "batch", 1: "seq"} if seq_axis else {0: "batch"}
    kwargs = dict(
        input_names=[input_name],
        output_names=["embedding"],
        dynamic_axes={input_name: in_axes, "embedding": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
        export_params=True,
    )
    # The TorchScript exporter writes one self-contained file with plain named axes.
    # torch >= 2.9 defaults to the dynamo exporter; ask for the classic one explicitly.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    # In eval mode under no_grad, nn.MultiheadAttention takes a fused "fast path"
    # (aten::_native_multi_head_attention) that the TorchScript exporter cannot translate;
    # switch it off so the plain attention ops are traced.
    mha = getattr(getattr(torch, "backends", None), "mha", None)
    if mha is not None and hasattr(mha, "set_fastpath_enabled"):
        mha.set_fastpath_enabled(False)
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), **kwargs)
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        # Opset 18 needs nothing newer than IR 9; newer exporters stamp a higher version.
        model.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def to_fp16(onnx, path: Path) -> None:
    try:
        from onnxconverter_common import float16
    except ImportError:
        die("--fp16 needs the PyPI package onnxconverter-common: pip install onnxconverter-common")
    model = onnx.load(str(path))
    model = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def text_module(model):
    """The module that holds the text tower's state: CLIP keeps it on the model itself,
    CustomTextCLIP in `model.text` (a TextTransformer)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "positional_embedding"):
        return text
    return model


def dynamic_length_support(torch, text, context_length: int) -> str | None:
    """None when cutting the token rows after the longest EOT cannot change the embeddings,
    else the reason why it can."""
    pos = getattr(text, "positional_embedding", None)
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or pos.shape[0] != context_length:
        return "no [context_length, width] positional_embedding"
    mask = getattr(text, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (context_length,
                                                                   context_length):
        return "no [context_length, context_length] causal attn_mask buffer"
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    if not (bool(torch.all(mask[~upper] == 0)) and bool(torch.all(mask[upper] < -1e4))):
        return "attn_mask is not a causal mask"
    if getattr(text, "cls_emb", None) is not None:
        return "the text tower appends a class token (CoCa)"
    pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", None) \
        or "argmax"  # open_clip before text_pool_type pooled at argmax(text)
    if pool not in ("argmax", "eos", "first"):
        return f"text pooling {pool!r} depends on the padded length"
    return None


@contextlib.contextmanager
def sliced_text_state(text, length):
    """While active, text.positional_embedding is its first `length` rows and text.attn_mask
    its top-left length x length block, so the model's own encode_text runs on `length` tokens.

    `length` comes from tokens.shape[1], which the tracer records as a Shape op, so the
    exported graph slices for whatever length it is fed. The entries are swapped in the
    module's _parameters/_buffers dicts (a Parameter cannot be assigned a plain tensor via
    setattr) and restored afterwards.
    """
    saved = []
    try:
        for name, cut in (("positional_embedding", lambda t: t[:length]),
                          ("attn_mask", lambda t: t[:length, :length])):
            store = text._parameters if name in text._parameters else text._buffers
            saved.append((store, name, store[name]))
            store[name] = cut(store[name])
        yield
    finally:
        for store, name, value in reversed(saved):
            store[name] = value


def traceable_attention(torch, text) -> int:
    """Swap the text transformer's nn.MultiheadAttention modules for a plain implementation.

    torch.nn.functional.multi_head_attention_forward reads the sequence length into a Python
    number that the TorchScript tracer records as a constant (the batch axis stays dynamic),
    so an exported text tower would only take the traced length. The replacement computes
    the same self-attention with the module's own weights through ops whose shapes the
    tracer keeps symbolic. Only the export sees it: the torch references are computed before.
    Returns how many modules were swapped.
    """
    import torch.nn.functional as F

    class SelfAttention(torch.nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.mha = mha

        def forward(self, query, key=None, value=None, key_padding_mask=None,
                    need_weights=False, attn_mask=None, **kwargs):
            m = self.mha
            if (key is not None and key is not query) or (value is not None and
                                                          value is not query) \
                    or key_padding_mask is not None or kwargs.get("is_causal"):
                return m(query, key, value, key_padding_mask=key_padding_mask,
                         need_weights=need_weights, attn_mask=attn_mask, **kwargs)
            x = query if m.batch_first else query.transpose(0, 1)  # [B, T, W]
            b, t = x.shape[0], x.shape[1]
            h = m.num_heads
            d = m.embed_dim // h
            qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, t, 3, h, d)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, D]
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # [B, H, T, T]
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn_mask = torch.zeros_like(attn_mask, dtype=att.dtype).masked_fill(
                        attn_mask, float("-inf"))
                att = att + attn_mask.to(att.dtype)
            out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, m.embed_dim)
            out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
            return (out if m.batch_first else out.transpose(0, 1)), None

    n = 0
    for block in getattr(getattr(text, "transformer", None), "resblocks", []):
        m = getattr(block, "attn", None)
        if isinstance(m, torch.nn.MultiheadAttention) and m._qkv_same_embed_dim \
                and m.in_proj_weight is not None and m.bias_k is None \
                and not m.add_zero_attn:
            block.attn = SelfAttention(m)
            n += 1
    return n


def parity(torch, ref, path: Path, input_name: str, x) -> dict | None:
    """Max |d| and min cosine between torch and onnxruntime outputs, or None."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        print("  (onnxruntime not importable: parity check skipped)")
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {input_name: x.numpy()})[0].astype(np.float64)
    want = ref.numpy().astype(np.float64)
    if got.shape != want.shape:
        die(f"{path.name}: onnxruntime output shape {got.shape}, torch {want.shape}")
    max_abs = float(np.max(np.abs(got - want)))
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return {"max_abs": max_abs, "min_cos": float(np.min(cos))}


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Export an OpenCLIP / OpenAI CLIP model to an oodgate model folder.",
        epilog="Examples: --model ViT-B-16 --pretrained laion2b_s34b_b88k (the default, OLE's "
               "backbone); --model ViT-B-32 --pretrained openai (OpenAI CLIP, QuickGELU).")
    ap.add_argument("--model", default="ViT-B-16", help="OpenCLIP architecture name")
    ap.add_argument("--pretrained", default="laion2b_s34b_b88k",
                    help="OpenCLIP pretrained tag (e.g. laion2b_s34b_b88k, openai)")
    ap.add_argument("--random-init", action="store_true",
                    help="build the architecture with random weights (pretrained=None); "
                         "nothing is downloaded and the manifest says weights = \"random\"")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--quick-gelu", action="store_true",
                    help="force QuickGELU (automatic for tags trained with it, e.g. openai)")
    ap.add_argument("--fp16", action="store_true",
                    help="convert the weights to float16 after export (I/O stay float32)")
    ap.add_argument("--batch", type=int, default=2, help="batch size of the parity check")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = ap.parse_args()

    torch, open_clip, onnx = import_torch_stack()
    out: Path = args.out.resolve()
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        die(f"{out} exists; pass --force to replace it")

    pretrained = None if args.random_init else args.pretrained
    model_cfg = open_clip.get_model_config(args.model)
    if model_cfg is None:
        die(f"unknown OpenCLIP model {args.model!r}; see open_clip.list_models()")
    # Recent open_clip builds `ViT-B-32` with exact GELU even for the `openai` tag (and only
    # warns); the OpenAI weights need QuickGELU, which their pretrained config declares.
    quick_gelu = args.quick_gelu or bool(model_cfg.get("quick_gelu", False))
    if pretrained:
        try:
            from open_clip.pretrained import get_pretrained_cfg
            quick_gelu = quick_gelu or bool(get_pretrained_cfg(args.model, pretrained)
                                            .get("quick_gelu", False))
        except (ImportError, AttributeError):
            quick_gelu = quick_gelu or pretrained == "openai"
    print(f"loading OpenCLIP {args.model} (pretrained={pretrained}, "
          f"{'QuickGELU' if quick_gelu else 'GELU'}) ...")
    try:
        model = open_clip.create_model(args.model, pretrained=pretrained, device="cpu",
                                       force_quick_gelu=quick_gelu)
    except Exception as e:  # unknown tag, no network, ...
        die(f"cannot create {args.model} with pretrained={pretrained!r}: {e}")
    model = model.float().eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    from open_clip.tokenizer import SimpleTokenizer
    if not isinstance(tokenizer, SimpleTokenizer):
        die(f"{args.model} does not use the CLIP BPE tokenizer ({type(tokenizer).__name__}); "
            "oodgate's manifest supports tokenizer = \"clip-bpe\" only")
    context_length = int(getattr(tokenizer, "context_length", None)
                         or getattr(model, "context_length", 77))
    pp = preprocess_config(model)
    if pp.get("interpolation", "bicubic") != "bicubic" or \
            pp.get("resize_mode", "shortest") != "shortest":
        print(f"warning: the model's preprocessing is {pp.get('resize_mode')}/"
              f"{pp.get('interpolation')}; oodgate resizes the shortest side, bicubic")

    class ImageTower(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, image):
            return self.clip.encode_image(image, normalize=False)

    text = text_module(model)
    why_fixed = dynamic_length_support(torch, text, context_length)
    dynamic_length = why_fixed is None
    if not dynamic_length:
        print(f"note: dynamic_length = false ({why_fixed})")

    class TextTower(torch.nn.Module):
        """encode_text on a [batch, seq] input, seq <= context_length (see sliced_text_state)."""

        def __init__(self, clip, text, dynamic: bool):
            super().__init__()
            self.clip = clip
            self.text = text
            self.dynamic = dynamic

        def forward(self, tokens):
            if not self.dynamic:
                return self.clip.encode_text(tokens, normalize=False)
            with sliced_text_state(self.text, tokens.shape[1]):
                return self.clip.encode_text(tokens, normalize=False)

    image_tower = ImageTower(model).eval()
    text_tower = TextTower(model, text, dynamic_length).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, pp["size"], pp["size"], generator=gen)
    captions = ["a photo of a cat.", "a diagram", "a blurry photo of a red car.",
                "an origami dog"]
    tokens = tokenizer([captions[i % len(captions)] for i in range(args.batch)]).long()
    # The rows up to and including the longest EOT (the largest id, 49407): what oodgate
    # feeds a dynamic-length tower. The export traces these cut rows, so a length baked in
    # by mistake would fail the full-length check below.
    tokens_cut = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1].contiguous()
    with torch.no_grad():
        ref_image = image_tower(images)
        ref_text = model.encode_text(tokens, normalize=False)  # unwrapped, full 77 tokens
    embed_dim = int(ref_image.shape[-1])
    if ref_text.shape[-1] != embed_dim:
        die(f"image and text embeddings differ in width ({embed_dim} vs {ref_text.shape[-1]})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        print(f"exporting the image tower (opset {args.opset}) ...")
        export_tower(torch, onnx, image_tower, images, tmp / "image.onnx", "image", args.opset)
        print(f"exporting the text tower (opset {args.opset}) ...")
        if dynamic_length:
            traceable_attention(torch, text)
        export_tower(torch, onnx, text_tower, tokens_cut if dynamic_length else tokens,
                     tmp / "text.onnx", "tokens", args.opset, seq_axis=dynamic_length)
        if args.fp16:
            print("converting to float16 (inputs and outputs stay float32) ...")
            to_fp16(onnx, tmp / "image.onnx")
            to_fp16(onnx, tmp / "text.onnx")

        print("checking onnxruntime against torch ...")
        checks = {
            "image": parity(torch, ref_image, tmp / "image.onnx", "image", images),
            "text": parity(torch, ref_text, tmp / "text.onnx", "tokens", tokens),
        }
        if dynamic_length:  # cut rows against the full-length torch reference
            checks["text_cut"] = parity(torch, ref_text, tmp / "text.onnx", "tokens",
                                        tokens_cut)
        for tower, c in checks.items():
            if c is None:
                continue
            print(f"  {tower}: max |d| = {c['max_abs']:.3g}, min cosine = {c['min_cos']:.7f}")
            if c["min_cos"] < (0.999 if args.fp16 else 0.99999):
                print(f"warning: the {tower} tower's onnxruntime output deviates from torch")
        if dynamic_length and checks.get("text_cut") and checks["text"] and \
                checks["text_cut"]["min_cos"] < checks["text"]["min_cos"] - 1e-6:
            die(f"text.onnx on {tokens_cut.shape[1]} tokens disagrees with the full rows "
                f"(min cosine {checks['text_cut']['min_cos']:.7f}); the dynamic-length "
                f"export is broken")

        logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") \
            else None
        source = {
            "generator": GENERATOR,
            "model": args.model,
            "pretrained": pretrained or "none",
            "open_clip_version": getattr(open_clip, "__version__", "unknown"),
            "torch_version": torch.__version__,
            "opset": args.opset,
            "precision": "fp16" if args.fp16 else "fp32",
            "quick_gelu": quick_gelu,
            "text_cut_length_checked": int(tokens_cut.shape[1]) if dynamic_length else 0,
        }
        if logit_scale is not None:
            source["logit_scale"] = logit_scale
        if getattr(model, "logit_bias", None) is not None:
            source["logit_bias"] = float(model.logit_bias.item())
        for k in ("interpolation", "resize_mode"):
            if k in pp:
                source[k] = str(pp[k])
        source["image_sha256"] = sha256_file(tmp / "image.onnx")
        source["text_sha256"] = sha256_file(tmp / "text.onnx")
        for tower, c in checks.items():
            if c is not None:
                source[f"{tower}_parity_max_abs"] = c["max_abs"]
                source[f"{tower}_parity_min_cos"] = c["min_cos"]
        name = f"{args.model}-{pretrained}" if pretrained else f"{args.model}-random"
        if args.fp16:
            name += "-fp16"
        write_manifest(tmp / "model.toml", name, "pretrained" if pretrained else "random",
                       embed_dim, pp, context_length, dynamic_length, source)

        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.rename(out, old / "x")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    for f in ("image.onnx", "text.onnx", "model.toml"):
        print(f"  {out / f}  {(out / f).stat().st_size / 1e6:.1f} MB")
    print(f"done: {name}, embed_dim {embed_dim}, image size {pp['size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
