#!/usr/bin/env bash
# Prepares the CLIP model `make run` uses and prints its folder as the LAST line of stdout
# (every other message goes to stderr). The first of these that works wins:
#
#   1. $OODGATE_MODEL, when set (it must be a model folder; an error otherwise)
#   2. a real model already in the model cache: the first folder of models/ (by name) whose
#      manifest says weights = "pretrained" and whose files are there
#   3. the transformers.js export Xenova/clip-vit-base-patch32 (OpenAI CLIP ViT-B/32, about
#      600 MB), downloaded into models/clip-vit-b-32 by deploy/model/fetch_model.py:
#      resumable, validated with onnxruntime, installed atomically. Skipped with
#      OODGATE_OFFLINE=1; an unreachable hub is detected within OODGATE_CONNECT_TIMEOUT s
#   4. deploy/model/export_openclip.py (OLE's backbone, ViT-B-16 laion2b_s34b_b88k) into
#      models/vit-b-16-laion, when a Python with torch, open_clip and onnx is there
#   5. the random-weight ViT-B/32 test model models/vit-b-32-random, with a banner: its
#      scores mean nothing
#
# Environment: OODGATE_MODEL, OODGATE_OFFLINE=1, OODGATE_HF_BASE (hub base URL, for mirrors),
# OODGATE_MODELS_DIR (default: models/ in the project), OODGATE_CONNECT_TIMEOUT (default 5).
# Idempotent: a second run stops at step 1 or 2, or (no real model) retries the download
# after a reachability probe that fails within seconds offline, and reuses step 5's folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
models=$(realpath -m "${OODGATE_MODELS_DIR:-$root/models}")
cd "$root"

say() { echo "prepare_model: $*" >&2; }
chosen() { echo "$1"; exit 0; }  # the one line on stdout

py="$root/.venv/bin/python"
[ -x "$py" ] || bash deploy/setup/venv.sh >&2
fetch_model() { "$py" deploy/model/fetch_model.py "$@"; }

# 1. an explicit choice
if [ -n "${OODGATE_MODEL:-}" ]; then
  dir=$(realpath -m "$OODGATE_MODEL")
  if fetch_model check --quick "$dir"; then
    say "using OODGATE_MODEL=$dir"
    chosen "$dir"
  fi
  say "error: OODGATE_MODEL=$OODGATE_MODEL is not a usable model folder (README, \"Model folder contract\")"
  exit 1
fi

# 2. a real model already in the cache
if dir=$(fetch_model find "$models"); then
  say "using the real model in $dir (set OODGATE_MODEL=DIR to use another)"
  chosen "$dir"
fi

# 3. download a real CLIP
hub_down=0
why_random=""
if [ "${OODGATE_OFFLINE:-0}" = 1 ]; then
  say "OODGATE_OFFLINE=1: not downloading a model"
  hub_down=1
  why_random="OODGATE_OFFLINE=1"
else
  target="$models/clip-vit-b-32"
  say "no real model in $models: downloading Xenova/clip-vit-base-patch32 (about 600 MB) to $target"
  rc=0
  fetch_model download --repo Xenova/clip-vit-base-patch32 \
    --manifest deploy/model/xenova-clip-vit-base-patch32.toml -o "$target" \
    --connect-timeout "${OODGATE_CONNECT_TIMEOUT:-5}" >&2 || rc=$?
  case $rc in
    0) chosen "$target" ;;
    130) say "interrupted; run again to resume the download"; exit 130 ;;
    2) hub_down=1; why_random="the model hub could not be reached" ;;
    *) why_random="the downloaded model was not usable (fetch_model.py exit $rc)" ;;
  esac
  say "$why_random; trying the next option"
fi

# 4. export OLE's backbone with torch + open_clip (needs the weights: online, or in the cache)
for p in "$py" python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import torch, open_clip, onnx' >/dev/null 2>&1; then
    target="$models/vit-b-16-laion"
    say "exporting OpenCLIP ViT-B-16 (laion2b_s34b_b88k) with $p deploy/model/export_openclip.py"
    offline_env=()
    # without the hub, open_clip can still use weights already in the Hugging Face cache
    [ "$hub_down" = 1 ] && offline_env=(HF_HUB_OFFLINE=1)
    if env "${offline_env[@]}" "$p" deploy/model/export_openclip.py -o "$target" >&2; then
      chosen "$target"
    fi
    say "the export failed; trying the next option"
    why_random="$why_random; the OpenCLIP export failed"
    break
  fi
done

# 5. random weights, so that the demo still runs
target="$models/vit-b-32-random"
"$py" deploy/model/make_test_model.py --preset vit-b-32 -o "$target" >&2
cat >&2 <<EOF

=====================================================================================
  WARNING: NO REAL CLIP WEIGHTS - this run uses RANDOM weights
  ($target: the ViT-B/32 architecture, weights = "random";
  reason: ${why_random:-none of the other options worked}).
  Every score, AUROC, FPR, threshold and accept/reject decision is MEANINGLESS:
  this only shows that the pipeline runs.
  To get real weights, one of:
    * run \`make run\` again where the Hugging Face hub is reachable (it downloads
      Xenova/clip-vit-base-patch32; OODGATE_HF_BASE=URL selects a mirror), or
    * on a machine with internet access:
        pip install torch open_clip_torch onnx onnxruntime
        python deploy/model/export_openclip.py -o models/vit-b-16-laion
      then copy that folder into $models/ here, or
    * point oodgate at a model folder you have: OODGATE_MODEL=/path/to/dir make run
=====================================================================================

EOF
chosen "$target"
