#!/usr/bin/env bash
# GPU check: `oodgate bench` with device = "cuda" on the vit-b-32 model at batch 32/128/256,
# writing the table into OUT_DIR. For a CUDA machine without internet access: the CUDA 13
# runtime and cuDNN 9 must be installed there; the onnxruntime-gpu library (.ort/gpu/lib, from
# `deploy/setup/fetch-ort.sh --gpu` on a connected machine), the model (models/vit-b-32-random)
# and either a Rust toolchain or a prebuilt target/release/oodgate travel with the source tree.
# Budget: under 8 minutes including the build.
#   deploy/gpu/check.sh OUT_DIR
set -euo pipefail
out=${1:?usage: deploy/gpu/check.sh OUT_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mkdir -p "$out"
exec > >(tee "$out/check.log") 2>&1
start=$(date +%s)
lib="$root/.ort/gpu/lib/libonnxruntime.so.1.31.1"
[ -f "$lib" ] || { echo "error: $lib missing: run deploy/setup/fetch-ort.sh --gpu on a connected machine and copy .ort/gpu"; exit 1; }
export ORT_DYLIB_PATH="$lib"
export LD_LIBRARY_PATH="$root/.ort/gpu/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "warning: nvidia-smi not available"

bin="$root/target/release/oodgate"
if command -v cargo >/dev/null; then
  cargo build --release --locked 2>&1 | tail -3
fi
[ -x "$bin" ] || { echo "error: no binary at $bin and no cargo to build it"; exit 1; }
"$bin" info --device cuda --model models/vit-b-32-random | tee "$out/info.txt"

model="$root/models/vit-b-32-random"
[ -f "$model/model.toml" ] || .venv/bin/python deploy/model/make_test_model.py --preset vit-b-32 -o "$model"
bank="$out/vit-b-32-bench.oodb"
# A small bank (CIFAR-100 ID names, the OLE reference words as outliers) built on the GPU.
"$bin" bank build --model "$model" --device cuda --id cifar100 --outliers config/labels/ole-nonus.txt \
  --templates mcm --k 200 -o "$bank" --no-cache 2>&1 | tail -8

images="$root/.cache/bench-images"
[ -d "$images" ] || images="$root/tests/fixtures/images"
{
  echo "| batch | encoder-only img/s | end-to-end img/s | ratio | preprocess img/s (all cores) | score µs/img | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|"
} > "$out/table.md"
for b in 32 128 256; do
  "$bin" bench --model "$model" --bank "$bank" --images "$images" --device cuda --batch "$b" \
    --messages $((b * 8)) --json > "$out/bench-$b.json"
  python3 - "$out/bench-$b.json" >> "$out/table.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {r['batch']} | {r['encoder_images_per_s']:.0f} | {r['end_to_end_images_per_s']:.0f} | {r['ratio_end_to_end_over_encoder']:.2f} | "
      f"{r['preprocess_images_per_s_total']:.0f} | {r['score_us_per_image']:.1f} | {r['peak_rss_mib']:.0f} |")
PY
done
cat "$out/table.md"
echo "provider: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["provider"])' "$out/bench-32.json")"
echo "done in $(( $(date +%s) - start )) s"
