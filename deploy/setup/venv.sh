#!/usr/bin/env bash
# Creates (or refreshes) the project's Python venv at .venv with deploy/requirements.txt.
# Idempotent: a venv whose requirements stamp matches is left alone.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/.venv"
req="$root/deploy/requirements.txt"
command -v python3 >/dev/null || { echo "error: python3 is required (install Python 3.10+ and its venv module)" >&2; exit 1; }
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || {
    echo "error: 'python3 -m venv' failed; on Debian/Ubuntu install it with: sudo apt-get install -y python3-venv" >&2
    exit 1
  }
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
echo "python venv ready: $venv"
