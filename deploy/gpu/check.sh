#!/usr/bin/env bash
# GPU check: `oodgate bench` with device = "cuda" on the vit-b-32 model and its fp16 variant
# (deploy/model/optimize.py, checked against fp32 by `oodgate model check`) at batch
# 32/128/256, writing the table into OUT_DIR. For a CUDA machine without internet access: the CUDA 13
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

# The fp16 variant of the same model (deploy/model/optimize.py), checked against fp32 on the
# same images at the bank's threshold: the agreement goes into the table.
fp16="$out/vit-b-32-fp16"
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
if "$py" -c "import onnx, onnxruntime, sympy" 2>/dev/null; then
  "$py" deploy/model/optimize.py --reference "$model" --out "$fp16" --precision fp16 --force 2>&1 | tail -2
  "$bin" calibrate --bank "$bank" --model "$model" --device cuda --id "$images" --write 2>&1 | tail -2
  "$bin" model check --reference "$model" --model "$fp16" --bank "$bank" --device cuda \
    --min-images 10 --json "$images" > "$out/check-fp16.json" || echo "fp16 variant NOT compatible (see $out/check-fp16.json)"
else
  echo "warning: no Python with onnx, onnxruntime and sympy: the fp16 variant is skipped"
fi

{
  echo "| model | batch | encoder-only img/s | end-to-end img/s | ratio | preprocess img/s (all cores) | score µs/img | serve-shaped peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$out/table.md"
# fp32 and fp16 with I/O binding (model.io_binding, the default), then fp32 without it at
# batch 128: what page-locked transfers buy.
for variant in fp32 fp16 fp32-unbound; do
  m="$model"; [ "$variant" = fp16 ] && m="$fp16"
  binding=true; sizes="32 128 256"
  [ "$variant" = fp32-unbound ] && { binding=false; sizes=128; }
  [ -f "$m/model.toml" ] || continue
  for b in $sizes; do
    "$bin" bench --model "$m" --bank "$bank" --images "$images" --device cuda --batch "$b" \
      --io-binding "$binding" --messages $((b * 8)) --json > "$out/bench-$variant-$b.json" || continue
    python3 - "$out/bench-$variant-$b.json" "$variant" >> "$out/table.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss = r.get("serve_peak_rss_mib") or r.get("peak_rss_mib") or 0
print(f"| {sys.argv[2]} | {r['batch']} | {r['encoder_images_per_s']:.0f} | {r['end_to_end_images_per_s']:.0f} | {r['ratio_end_to_end_over_encoder']:.2f} | "
      f"{r['preprocess_images_per_s_total']:.0f} | {r['score_us_per_image']:.1f} | {rss:.0f} |")
PY
  done
done
cat "$out/table.md"
[ -f "$out/check-fp16.json" ] && python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("fp16 vs fp32: cosine min %.6f, decision agreement %.2f%% on %d images" % (r["cosine_min"], 100*r["agreement"], r["images"]))' "$out/check-fp16.json"
echo "provider: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["provider"])' "$out/bench-fp32-32.json")"
echo "done in $(( $(date +%s) - start )) s"
