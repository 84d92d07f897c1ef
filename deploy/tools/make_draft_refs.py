#!/usr/bin/env python3
"""Reference tensors for oodgate's fast JPEG path (`preprocess.jpeg_draft`).

Pillow's `Image.draft("RGB", (224, 224))` makes libjpeg decode a JPEG at 1/s scale in the DCT
domain, s the largest of 8, 4, 2, 1 with s <= min(width // 224, height // 224). CLIP pipelines
that call it then resize and crop exactly as without it (docs/method.md §2). This script:

  1. writes web-sized JPEGs into tests/fixtures/draft/ (only with --make-images: they are
     committed), upscaled from the CC0 / public-domain fixtures in tests/fixtures/images/, so
     that every draft scale (2, 4, 8), 4:2:0 and 4:4:4 chroma, progressive, greyscale and odd
     sizes occur (the fixtures there are too small for any draft scale);
  2. for every JPEG in tests/fixtures/draft/ writes the uint8 HWC [224, 224, 3] crop before
     normalisation, `<name>.draft.npy`, plus README.md with the Pillow version and each
     image's draft scale. (The exact path is checked against Pillow on tests/fixtures/images/;
     how far draft is from exact is measured by oodgate itself.)

Usage: .venv/bin/python deploy/tools/make_draft_refs.py [--make-images] [--check]
"""
import argparse
import pathlib
import sys

import numpy as np
import PIL
from PIL import Image

# The exact path's resize rule, from the script beside this one.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_preprocess_refs import resized_size  # noqa: E402

SIZE = 224
ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ROOT / "tests" / "fixtures" / "images"
OUT = ROOT / "tests" / "fixtures" / "draft"

# name, source, size, mode, encoder options
IMAGES = [
    ("coffee-1024x683.jpg", "coffee.jpg", (1024, 683), "RGB", {"quality": 85, "subsampling": "4:2:0"}),
    ("chelsea-1600x1064.jpg", "chelsea.jpg", (1600, 1064), "RGB", {"quality": 80, "subsampling": "4:2:0"}),
    ("astronaut-gray-1800.jpg", "astronaut.png", (1800, 1800), "L", {"quality": 80}),
    ("coffee-900x600-progressive-444.jpg", "coffee.jpg", (900, 600), "RGB",
     {"quality": 85, "subsampling": "4:4:4", "progressive": True}),
    ("camera-1001x999.jpg", "camera-gray.png", (1001, 999), "RGB", {"quality": 85, "subsampling": "4:2:0"}),
]


def crop(path: pathlib.Path, draft: bool) -> tuple[np.ndarray, int]:
    with Image.open(path) as im:
        w0 = im.size[0]
        if draft:
            im.draft("RGB", (SIZE, SIZE))
        scale = round(w0 / im.size[0]) if im.size[0] else 1
        rgb = im.convert("RGB")
    w, h = rgb.size
    nw, nh = resized_size(w, h)
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - SIZE) / 2.0))
    top = int(round((nh - SIZE) / 2.0))
    arr = np.asarray(rgb.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)
    assert arr.shape == (SIZE, SIZE, 3), (path, arr.shape)
    return arr, scale


def make_images() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, source, size, mode, opts in IMAGES:
        with Image.open(SOURCES / source) as im:
            img = im.convert(mode).resize(size, Image.LANCZOS)
        img.save(OUT / name, "JPEG", **opts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-images", action="store_true", help="(re)write the JPEG fixtures first")
    ap.add_argument("--check", action="store_true", help="compare with stored refs, write nothing")
    args = ap.parse_args()
    if args.make_images:
        make_images()
    images = sorted(OUT.glob("*.jpg"))
    if not images:
        print(f"no JPEGs in {OUT} (run with --make-images)", file=sys.stderr)
        return 1
    rows, bad = [], 0
    for p in images:
        for kind in ("draft",):
            arr, scale = crop(p, kind == "draft")
            target = OUT / f"{p.name}.{kind}.npy"
            if args.check:
                ok = target.exists() and np.array_equal(np.load(target), arr)
                bad += not ok
                print(f"{'ok  ' if ok else 'DIFF'} {target.name}")
            else:
                np.save(target, arr)
            if kind == "draft":
                with Image.open(p) as im:
                    rows.append((p.name, im.mode, im.size, scale, p.stat().st_size))
    if args.check:
        return 1 if bad else 0
    lines = [
        "# Fast JPEG path fixtures",
        "",
        "Made by `deploy/tools/make_draft_refs.py` (do not edit by hand). The JPEGs are upscaled",
        "(Lanczos) from the CC0 / public-domain fixtures in `../images/` (see its README for the",
        "sources) and re-encoded by Pillow. For each JPEG: `<name>.draft.npy` is Pillow's",
        "`Image.draft(\"RGB\", (224, 224))` then `convert(\"RGB\")`, bicubic resize of the short side",
        "to 224 and centre crop, uint8 HWC [224, 224, 3], before normalisation.",
        "",
        f"Made with Pillow {PIL.__version__} and numpy {np.__version__}.",
        "",
        "| image | mode | w x h | draft scale | bytes |",
        "|---|---|---|---|---|",
    ]
    for name, mode, (w, h), scale, size in rows:
        lines.append(f"| {name} | {mode} | {w} x {h} | 1/{scale} | {size} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} reference crops to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
