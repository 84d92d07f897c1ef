#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library from the PyPI package onnxruntime (CPU) or
# onnxruntime-gpu (--gpu) into the project's git-ignored .ort/ folder, where oodgate finds it
# without any setting. Idempotent.
#   deploy/setup/fetch-ort.sh          -> .ort/lib/libonnxruntime.so.1.31.1
#   deploy/setup/fetch-ort.sh --gpu    -> .ort/gpu/lib/ (also the CUDA provider libraries)
set -euo pipefail
ORT_VERSION=${ORT_VERSION:-1.31.1}
root=$(cd "$(dirname "$0")/../.." && pwd)
pkg=onnxruntime; dest="$root/.ort/lib"
if [ "${1:-}" = "--gpu" ]; then pkg=onnxruntime-gpu; dest="$root/.ort/gpu/lib"; fi
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [ -f "$lib" ]; then echo "ONNX Runtime present: $lib"; exit 0; fi
command -v python3 >/dev/null || { echo "error: python3 (with pip) is required to fetch ONNX Runtime" >&2; exit 1; }
command -v unzip >/dev/null || { echo "error: unzip is required (sudo apt-get install -y unzip)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The wheel's shared library does not depend on the Python version, so pin one tag that exists.
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  -d "$tmp" "$pkg==$ORT_VERSION"
mkdir -p "$dest"
unzip -q -o -j "$tmp"/*.whl 'onnxruntime/capi/libonnxruntime*.so*' -d "$dest"
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
ls -l "$dest"
echo "ONNX Runtime $ORT_VERSION fetched into $dest"
