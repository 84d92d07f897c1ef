#!/usr/bin/env bash
# `make run`: the oodgate demo on one machine. Prepares a model and a bank (ImageNet-1k ID
# classes, WordNet outlier labels), starts a local nats-server with JetStream (data in .nats/),
# starts `oodgate serve`, publishes a demo set of real images, prints a routing summary and the
# metrics URL, then keeps serving until Ctrl-C and shuts everything down cleanly.
# A second run reuses the model, the bank, the label-embedding cache and the images.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bin="$root/target/release/oodgate"
[ -x "$bin" ] || { echo "error: $bin missing; run 'make run' (it builds first)" >&2; exit 1; }
NATS_PORT=${OODGATE_DEMO_NATS_PORT:-4222}
HTTP_PORT=${OODGATE_DEMO_HTTP_PORT:-9464}
TEMPLATES=${OODGATE_DEMO_TEMPLATES:-mcm}
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

say "model"
model=$(bash deploy/model/prepare_model.sh | tail -n 1)
[ -f "$model/model.toml" ] || { echo "error: no usable model folder ($model)" >&2; exit 1; }
echo "    $model" >&2

say "demo images"
bash deploy/setup/fetch-demo-images.sh >&2
demo="$root/.assets/demo"

bank="$model/demo-imagenet1k-wordnet-$TEMPLATES.oodb"
if [ ! -f "$bank" ]; then
  say "bank: ImageNet-1k ID classes, WordNet nouns as outlier labels (templates: $TEMPLATES; first run only)"
  "$bin" bank build --model "$model" --id imagenet1k --outliers wordnet --templates "$TEMPLATES" -o "$bank.tmp"
  # Threshold: keep 95% of the demo's ID-like images (a real deployment calibrates on held-out ID data).
  # The bank is finished under a temporary name (an interrupted first run never leaves a bank
  # without a threshold); report it under the name it is about to get.
  "$bin" calibrate --bank "$bank.tmp" --model "$model" --method ole --id "$demo/id" --tpr 0.95 --write \
    | sed "s|$bank.tmp|$bank|" >&2
  mv "$bank.tmp" "$bank"
else
  say "bank: reusing $bank"
fi

# Each demo run starts from empty streams (the routing summary counts this run only);
# the model, bank, label cache and images are what is reused.
rm -rf "$root/.nats/jetstream"
mkdir -p "$root/.nats"
pids=()
cleanup() {
  say "shutting down"
  # The worker first (it drains and acks while NATS is still up), then the server.
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 0' INT TERM

if (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then
  echo "error: port $NATS_PORT is in use; set OODGATE_DEMO_NATS_PORT to a free port" >&2; exit 1
fi
say "nats-server with JetStream on 127.0.0.1:$NATS_PORT (data in .nats/)"
# The Debian package installs into /usr/sbin, which a normal user's PATH often lacks.
nats_server=${NATS_SERVER:-$(command -v nats-server || true)}
for c in /usr/sbin/nats-server /usr/local/bin/nats-server "$root/.venv/bin/nats-server"; do
  [ -n "$nats_server" ] && break
  [ -x "$c" ] && nats_server=$c
done
[ -n "$nats_server" ] || { echo "error: nats-server not found; run deploy/setup/system-deps.sh (Debian package nats-server) or set NATS_SERVER" >&2; exit 1; }
"$nats_server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$root/.nats" >"$root/.nats/server.log" 2>&1 &
pids+=($!)
nats_up=0
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && { nats_up=1; break; }; sleep 0.1; done
if [ "$nats_up" != 1 ]; then
  echo "error: nats-server did not start on 127.0.0.1:$NATS_PORT; its log (.nats/server.log):" >&2
  cat "$root/.nats/server.log" >&2
  exit 1
fi

say "oodgate serve"
export OODGATE__NATS__SERVERS="nats://127.0.0.1:$NATS_PORT"
export OODGATE__MODEL__DIR="$model"
export OODGATE__DETECTOR__BANK="$bank"
export OODGATE__HTTP__LISTEN="127.0.0.1:$HTTP_PORT"
"$bin" serve --config config/default.toml 2>"$root/.nats/oodgate.log" &
pids+=($!)
for _ in $(seq 600); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "${pids[1]}" 2>/dev/null || { echo "error: oodgate serve exited; see .nats/oodgate.log" >&2; tail -20 "$root/.nats/oodgate.log" >&2; exit 1; }
  sleep 0.2
done

say "publishing $(find "$demo" -name '*.jpg' | wc -l) demo images"
"$bin" publish --nats "nats://127.0.0.1:$NATS_PORT" --subject images.in "$demo"
total=$(find "$demo" -name '*.jpg' | wc -l)
for _ in $(seq 1200); do
  routed=$("$bin" summary --nats "nats://127.0.0.1:$NATS_PORT" --json 2>/dev/null | python3 -c 'import json,sys; print(sum(json.load(sys.stdin)["counts"].values()))' 2>/dev/null || echo 0)
  [ "${routed:-0}" -ge "$total" ] && break
  sleep 0.5
done
say "routing summary"
"$bin" summary --nats "nats://127.0.0.1:$NATS_PORT" --examples 3
echo
echo "metrics: http://127.0.0.1:$HTTP_PORT/metrics   info: http://127.0.0.1:$HTTP_PORT/info   logs: .nats/oodgate.log"
echo "publish more:  $bin publish --nats nats://127.0.0.1:$NATS_PORT --subject images.in DIR"
echo "serving; press Ctrl-C to stop"
wait "${pids[1]}"
