#!/usr/bin/env python3
"""Make web-sized benchmark JPEGs from the CC0 / public-domain photos the project has.

    make_bench_images.py -o DIR [--n 200] [--seed 0] [--force]

Sources: the scikit-image photos committed as test fixtures (tests/fixtures/images/
chelsea.jpg, coffee.jpg, astronaut.png, rocket.jpg) plus, when the demo assets are present
(.assets/demo/, see its MANIFEST.tsv), the other scikit-image photographs and micrographs
there (camera, clock_motion, motorcycle_left, brick, grass, gravel, hubble_deep_field,
coins, moon, retina, ihc, cell). Drawings, text pages and synthetic patterns are left out.
Colour sources are drawn three times as often as grey-scale ones (about 3 in 4 images are
in colour, as on the web).

Each image i draws from numpy.random.default_rng([seed, i]):
  * a size: long side uniform in 640..1600 px, aspect 4:3 (50 %), 3:2 (30 %) or 16:9 (20 %),
    short side clamped to 480..1200; landscape (65 %) or portrait (35 %);
  * a random crop of a source photo with that aspect, covering 35..100 % of the largest such
    crop, a horizontal flip (50 %), Lanczos resampling to the size (mostly an upscale: the
    sources are 400..1024 px);
  * mild colour jitter: brightness and contrast x0.85..1.15, saturation x0.8..1.2;
  * mild Gaussian grain (sigma 1.5..4 of 255), so the upscaled crops carry the JPEG entropy
    of real camera photos instead of compressing like smooth gradients;
  * JPEG quality 80..92, 4:2:0 chroma subsampling, baseline (not progressive), no EXIF.

Writes DIR/bench-NNNN.jpg and DIR/manifest.json (last). Idempotent: when DIR/manifest.json
names the same n, seed and generator version and all its files are there, it does nothing.
Deterministic for a given seed and Pillow/numpy build (Pillow's JPEG encoder and resampler).
Needs the PyPI packages numpy and pillow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = "deploy/bench/make_bench_images.py"
VERSION = 2
FIXTURES = ["chelsea.jpg", "coffee.jpg", "astronaut.png", "rocket.jpg"]
DEMO_PHOTOS = ["id/skimage-camera.jpg", "id/skimage-clock_motion.jpg",
               "id/skimage-motorcycle_left.jpg", "ood/skimage-brick.jpg",
               "ood/skimage-grass.jpg", "ood/skimage-gravel.jpg",
               "ood/skimage-hubble_deep_field.jpg", "ood/skimage-coins.jpg",
               "ood/skimage-moon.jpg", "ood/skimage-retina.jpg", "ood/skimage-ihc.jpg",
               "ood/skimage-cell.jpg"]
ASPECTS = [(4 / 3, 0.5), (3 / 2, 0.3), (16 / 9, 0.2)]


def sources() -> list[Path]:
    out = [ROOT / "tests/fixtures/images" / f for f in FIXTURES]
    missing = [p for p in out if not p.is_file()]
    if missing:
        sys.exit(f"error: missing fixture images: {', '.join(map(str, missing))}")
    demo = ROOT / ".assets/demo"
    out += [demo / f for f in DEMO_PHOTOS if (demo / f).is_file()]
    return out


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(640, 1601))
    aspect = ASPECTS[int(rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS]))][0]
    short_side = int(np.clip(round(long_side / aspect), 480, 1200))
    if rng.random() < 0.65:
        return long_side, short_side  # landscape (width, height)
    return short_side, long_side


def make_one(src: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    w, h = draw_size(rng)
    sw, sh = src.size
    aspect = w / h
    # largest crop of this aspect, then 35..100 % of its area at a random place
    cw, ch = (sw, sw / aspect) if sw / sh < aspect else (sh * aspect, sh)
    f = float(np.sqrt(rng.uniform(0.35, 1.0)))
    cw, ch = max(16.0, cw * f), max(16.0, ch * f)
    x0 = rng.uniform(0, sw - cw)
    y0 = rng.uniform(0, sh - ch)
    img = src.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    flip = bool(rng.random() < 0.5)
    if flip:
        img = ImageOps.mirror(img)
    a = np.asarray(img, dtype=np.float32)
    bright, contrast, sat = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15), \
        rng.uniform(0.8, 1.2)
    grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
    a = grey[..., None] + (a - grey[..., None]) * np.float32(sat)  # saturation
    a = (a - a.mean()) * np.float32(contrast) + a.mean()  # contrast about the mean
    a *= np.float32(bright)
    sigma = rng.uniform(1.5, 4.0)
    a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(sigma)
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    quality = int(rng.integers(80, 93))
    info = {"width": w, "height": h, "quality": quality, "flip": flip,
            "crop": [round(x0, 1), round(y0, 1), round(cw, 1), round(ch, 1)],
            "brightness": round(float(bright), 3), "contrast": round(float(contrast), 3),
            "saturation": round(float(sat), 3), "grain_sigma": round(float(sigma), 2)}
    return img, info


def up_to_date(out: Path, n: int, seed: int) -> bool:
    try:
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (man.get("generator"), man.get("version"), man.get("n"), man.get("seed")) != \
            (GENERATOR, VERSION, n, seed):
        return False
    files = man.get("images", [])
    return len(files) == n and all((out / e["file"]).is_file() and
                                   (out / e["file"]).stat().st_size == e["bytes"]
                                   for e in files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    ap.add_argument("--n", type=int, default=200, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args()
    if args.n < 1 or args.seed < 0:
        ap.error("--n must be >= 1 and --seed >= 0")
    out: Path = args.out.resolve()
    if not args.force and up_to_date(out, args.n, args.seed):
        print(f"{out}: already present ({args.n} images, seed {args.seed})")
        return 0

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: marks a complete set
    for old in out.glob("bench-*.jpg"):
        old.unlink()
    paths = sources()
    imgs = []
    for p in paths:
        with Image.open(p) as im:
            imgs.append(im.convert("RGB"))
    # colour photos 3x as likely as grey ones (all channels equal up to JPEG noise)
    grey = [int(np.max(np.ptp(np.asarray(im, np.int16), axis=2))) <= 12 for im in imgs]
    weights = np.array([1.0 if g else 3.0 for g in grey])
    weights /= weights.sum()
    entries = []
    total = 0
    for i in range(args.n):
        rng = np.random.default_rng([args.seed, i])
        k = int(rng.choice(len(imgs), p=weights))
        img, info = make_one(imgs[k], rng)
        name = f"bench-{i:04d}.jpg"
        img.save(out / name, "JPEG", quality=info["quality"], subsampling=2,
                 optimize=False, progressive=False)
        data = (out / name).read_bytes()
        total += len(data)
        entries.append({"file": name, "source": str(paths[k].relative_to(ROOT)),
                        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        **info})
    pixels = sum(e["width"] * e["height"] for e in entries)
    man = {"generator": GENERATOR, "version": VERSION, "n": args.n, "seed": args.seed,
           "sources": [str(p.relative_to(ROOT)) for p in paths],
           "total_bytes": total, "mean_megapixels": round(pixels / args.n / 1e6, 3),
           "bits_per_pixel": round(8 * total / pixels, 3), "images": entries}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(man, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "manifest.json")
    print(f"{out}: {args.n} JPEGs from {len(paths)} source photos, "
          f"{total / 1e6:.1f} MB, mean {pixels / args.n / 1e6:.2f} MP, "
          f"{8 * total / pixels:.2f} bits/pixel, in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
