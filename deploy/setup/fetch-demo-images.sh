#!/usr/bin/env bash
# Fetches a small demo set of real images (about 140) into the git-ignored
#   <project>/.assets/demo/id/   in-distribution-like for ImageNet-1K ID labels
#   <project>/.assets/demo/ood/  out-of-distribution (textures, scientific images, icons, shapes, flags)
# with a manifest (.assets/demo/MANIFEST.tsv: file, split, source, licence). Never commit them.
# Sources, all fetched at run time through the ordinary package clients:
#   - the PyPI package scikit-image 0.26.0 (skimage/data/): CC0 / public domain, except the
#     Middlebury 2014 motorcycle stereo image, whose licence scikit-image does not state;
#   - the Debian package openclipart-png (public domain clip art): animals, vehicles, boats and
#     food -> id; computer icons, shapes and flags -> ood.
# Every image is written as JPEG (quality 92), at most 1024 px on its long side; images with alpha
# are composited onto white first.
# The split is a rough sanity/ordering aid (clip art is style-shifted), not a benchmark.
# Idempotent: a finished set (stamp file .assets/demo/.complete) is left alone; --force rebuilds.
# Needs: python with Pillow (the project's .venv, see deploy/setup/venv.sh), pip, apt-get, dpkg-deb, tar.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
assets=${OODGATE_ASSETS:-$root/.assets}
demo="$assets/demo"
stamp="$demo/.complete"
version="demo-v1 scikit-image==0.26.0 openclipart-png"
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ]; then
  echo "demo images present: $demo ($(find "$demo/id" -type f | wc -l) id, $(find "$demo/ood" -type f | wc -l) ood)"
  exit 0
fi

py="$root/.venv/bin/python"
if [ ! -x "$py" ]; then py=$(command -v python3 || true); fi
[ -n "$py" ] && "$py" -c 'import PIL' 2>/dev/null || {
  echo "error: a Python with Pillow is required; create the project venv with deploy/setup/venv.sh" >&2; exit 1; }
for tool in apt-get dpkg-deb tar; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is required to fetch the Debian package openclipart-png (Debian/Ubuntu only)" >&2; exit 1; }
done

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
chmod 1777 "$tmp"   # apt-get download writes as the _apt user when run as root

# 1. scikit-image wheel (its data files do not depend on the platform tag; pin one that exists).
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  -d "$tmp/whl" scikit-image==0.26.0 >&2

# 2. openclipart-png .deb (about 130 MB); unpack only the categories used.
download() { (cd "$tmp" && apt-get download -q openclipart-png) >&2; }
if ! download; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "apt-get download failed; refreshing the package lists (apt-get update) and retrying" >&2
    apt-get update -qq >&2
    download
  else
    echo "error: 'apt-get download openclipart-png' failed; run 'sudo apt-get update' and retry" >&2
    exit 1
  fi
fi
deb=$(ls "$tmp"/openclipart-png_*.deb)
mkdir -p "$tmp/oc"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/oc" --wildcards \
  './usr/share/openclipart/png/animals/*' './usr/share/openclipart/png/transportation/*' \
  './usr/share/openclipart/png/food/*' './usr/share/openclipart/png/computer/icons/*' \
  './usr/share/openclipart/png/shapes/*' './usr/share/openclipart/png/signs_and_symbols/flags/*' \
  './usr/share/doc/openclipart-png/copyright'

rm -rf "$demo"
mkdir -p "$demo/id" "$demo/ood"
"$py" - "$tmp/whl" "$tmp/oc/usr/share/openclipart/png" "$demo" "$(basename "$deb")" <<'PY'
import hashlib, io, pathlib, sys, zipfile
from PIL import Image

whl_dir, oc, demo, debname = (
    pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4])
rows, seen = [], set()
MAX_SIDE = 1024            # larger images are downscaled (some clip art is rendered at 16000 px)
MAX_SOURCE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = None   # trusted package files; size is checked below instead

def save(im: Image.Image, split: str, name: str, source: str, licence: str) -> bool:
    im.load()
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
    digest = hashlib.sha256(im.tobytes()).hexdigest()
    if digest in seen:          # openclipart ships some files twice
        return False
    seen.add(digest)
    out = demo / split / f"{name}.jpg"
    im.save(out, quality=92)
    rows.append((f"{split}/{out.name}", split, source, licence))
    return True

# scikit-image sample data
SK_ID = ["chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "clock_motion.png", "motorcycle_left.png"]
SK_OOD = ["brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
          "cell.png", "moon.png", "page.png", "text.png", "coins.png", "horse.png",
          "microaneurysms.png", "phantom.png", "chessboard_RGB.png", "logo.png", "color.png"]
whl = next(whl_dir.glob("scikit_image-0.26.0-*.whl"))
with zipfile.ZipFile(whl) as z:
    for split, names in (("id", SK_ID), ("ood", SK_OOD)):
        for n in names:
            data = z.read(f"skimage/data/{n}")
            lic = ("licence not stated by scikit-image (Middlebury 2014 stereo dataset)"
                   if n.startswith("motorcycle") else "CC0 / public domain (see skimage/data/_fetchers.py)")
            save(Image.open(io.BytesIO(data)), split, "skimage-" + n.rsplit(".", 1)[0], f"PyPI scikit-image 0.26.0 skimage/data/{n}", lic)

# openclipart: (split, folder, recursive, how many)
PICKS = [
    ("id", "animals/mammals", True, 14), ("id", "animals/birds", True, 7), ("id", "animals/fish", True, 5),
    ("id", "animals/bugs", True, 5), ("id", "transportation/vehicles", True, 8),
    ("id", "transportation/boating", True, 4), ("id", "transportation", False, 4),
    ("id", "food/fruit", True, 7), ("id", "food/vegetables", True, 3), ("id", "food/desserts", True, 4),
    ("id", "food/beverages", True, 3),
    ("ood", "computer/icons", True, 22), ("ood", "shapes/stars", True, 10), ("ood", "shapes/arrows", True, 5),
    ("ood", "shapes/jigsaw", True, 3), ("ood", "shapes/flowchart", True, 3),
    ("ood", "signs_and_symbols/flags", True, 15),
]
for split, folder, recursive, n in PICKS:
    base = oc / folder
    files = sorted(base.rglob("*.png") if recursive else base.glob("*.png"))
    ok = []
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except Exception:
            continue
        if min(w, h) >= 48 and max(w, h) >= 128 and w * h <= MAX_SOURCE_PIXELS:
            ok.append(f)
    if not ok:
        continue
    step = max(1, len(ok) // n)
    taken = 0
    for f in ok[::step] + ok:          # evenly spaced, then fill up past duplicates
        if taken >= n:
            break
        rel = f.relative_to(oc)
        name = "openclipart-" + "-".join(rel.with_suffix("").parts).replace(" ", "_")
        if (demo / split / f"{name}.jpg").exists():
            continue
        if save(Image.open(f), split, name, f"Debian {debname} /usr/share/openclipart/png/{rel}",
                "public domain (openclipart)"):
            taken += 1

with open(demo / "MANIFEST.tsv", "w", encoding="utf-8") as fh:
    fh.write("# file\tsplit\tsource\tlicence\n")
    for r in rows:
        fh.write("\t".join(r) + "\n")
print(f"{sum(r[1] == 'id' for r in rows)} id, {sum(r[1] == 'ood' for r in rows)} ood images")
PY
cp "$tmp/oc/usr/share/doc/openclipart-png/copyright" "$demo/COPYRIGHT-openclipart"
echo "$version" > "$stamp"
echo "demo images fetched into $demo"
