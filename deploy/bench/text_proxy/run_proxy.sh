#!/usr/bin/env bash
# Text-proxy benchmark, end to end: make the data (make_proxy.py), build the banks, evaluate
# them, tabulate. See README.md beside this file. Every score and metric comes from the oodgate
# binary (bank build --id-embeddings/--outlier-embeddings, calibrate, eval); Python only makes
# the data and formats the table.
#
# Environment:
#   OODGATE_BIN  oodgate binary (default target/release/oodgate)
#   PYTHON       a Python with requirements.txt installed (default python3)
#   DATA         proxy data folder (default .cache/text-proxy)
#   OUT          banks, results.json, table.md (default $DATA/run)
#   WORDNET      WordNet dictionary folder, the one holding data.noun and index.noun
#   DATA_SEED    make_proxy.py --seed (default 0)
#   SKIP_MAKE=1  use $DATA as it is
#   KEEP_BANKS=1 reuse banks already in $OUT
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
cd "$ROOT"

OODGATE="${OODGATE_BIN:-target/release/oodgate}"
PYTHON="${PYTHON:-python3}"
DATA="${DATA:-.cache/text-proxy}"
OUT="${OUT:-$DATA/run}"
# The dictionary folder itself, not the unpacked package root .assets/wordnet-base: the Rust
# reader (WordNet::open) joins data.noun onto the path it is given.
WORDNET="${WORDNET:-.assets/wordnet-base/usr/share/wordnet}"
DATA_SEED="${DATA_SEED:-0}"

[[ -x "$OODGATE" ]] || { echo "no oodgate binary at $OODGATE (cargo build --release, or set OODGATE_BIN)" >&2; exit 1; }
mkdir -p "$OUT"

if [[ "${SKIP_MAKE:-0}" != 1 ]]; then
    "$PYTHON" "$HERE/make_proxy.py" --out "$DATA" --wordnet "$WORDNET" --seed "$DATA_SEED"
fi

# The bank records the encoder's fingerprint; eval then accepts .npy inputs without a model.
FINGERPRINT="$("$PYTHON" -c 'import json, sys; m = json.load(open(sys.argv[1])); assert m["complete"]; print(m["model_fingerprint"])' "$DATA/manifest.json")"

COMMON=(
    --id "$DATA/id_labels.txt" --id-embeddings "$DATA/id_labels.npy"
    --outliers "$DATA/outliers.txt" --outlier-embeddings "$DATA/outliers.npy"
    --model-fingerprint "$FINGERPRINT" --wordnet "$WORDNET"
)

build() { # build NAME ARGS...: one bank, its build summary kept as JSON beside it
    local name="$1"; shift
    if [[ "${KEEP_BANKS:-0}" == 1 && -s "$OUT/$name.oodb" ]]; then return; fi
    echo "bank $name" >&2
    "$OODGATE" bank build "${COMMON[@]}" "$@" --json -o "$OUT/$name.oodb" > "$OUT/$name.build.json"
}

# The first bank is the reference of table.py's Δ columns: the full method.
build kmeans-s42    --prototypes kmeans --k 500 --quantile 0.1 --hard-prototypes 150 --seed 42
# Seed variance of k-means++ (and HOPG's draws, if they follow --seed).
build kmeans-s43    --prototypes kmeans --k 500 --quantile 0.1 --hard-prototypes 150 --seed 43
build kmeans-s44    --prototypes kmeans --k 500 --quantile 0.1 --hard-prototypes 150 --seed 44
# Ablations: no HOPG; outlier words instead of prototypes; every outlier row, unrefined.
build kmeans-nohopg --prototypes kmeans --k 500 --quantile 0.1 --hard-prototypes 0 --seed 42
build words         --prototypes words --quantile 0.1 --hard-prototypes 0 --seed 42
build none          --prototypes none --hard-prototypes 0 --seed 42
# NegLabel mines its negatives from the same outlier rows. Caveat: its paper embeds labels with
# "the nice {}", while these rows use the proxy's templates (manifest.json params).
build neglabel      --neglabel --adjectives none --seed 42

BANKS=()
for b in kmeans-s42 kmeans-s43 kmeans-s44 kmeans-nohopg words none neglabel; do
    BANKS+=(--bank "$OUT/$b.oodb")
done

# Held-out ID calibration: every third ID caption calibrates the thresholds (and the adaptive
# detector's admission threshold and largest penalty); the rest are the ID test inputs.
"$PYTHON" - "$DATA/id.npy" "$OUT/id_calib.npy" "$OUT/id_test.npy" <<'PY'
import sys, numpy as np
x = np.load(sys.argv[1])
calib = np.arange(len(x)) % 3 == 0
np.save(sys.argv[2], x[calib]); np.save(sys.argv[3], x[~calib])
PY
for b in kmeans-s42 kmeans-s43 kmeans-s44 kmeans-nohopg words none neglabel; do
    "$OODGATE" calibrate --bank "$OUT/$b.oodb" --method ole,mcm,energy,neglabel \
        --id "$OUT/id_calib.npy" --write --json > "$OUT/$b.calibrate.json"
done

# One table: every bank × method, static and adaptive (each OOD set streamed with the ID test
# inputs in a seeded order, the memory empty at the start of each set; default knobs, not
# tuned on these sets). The first row, the paper's pipeline with OLE, is the reference of the
# bootstrap differences.
"$OODGATE" eval "${BANKS[@]}" \
    --method ole,mcm,energy,neglabel \
    --id "$OUT/id_test.npy" \
    --ood near="$DATA/ood_near.npy" --ood mid="$DATA/ood_mid.npy" --ood far="$DATA/ood_far.npy" \
    --adaptive --order-seed 0 \
    --bootstrap 1000 \
    --json > "$OUT/results.json"

"$PYTHON" "$HERE/table.py" "$OUT/results.json" "$DATA/manifest.json" > "$OUT/table.md"
cat "$OUT/table.md"
