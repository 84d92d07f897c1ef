#!/usr/bin/env bash
# Ensures the WordNet 3.0 database files (index.noun, data.noun, index.adj, ...) exist and prints
# the folder that holds them. Idempotent.
#   - if the Debian package wordnet-base is installed (/usr/share/wordnet/index.noun), use it;
#   - otherwise download that package with apt-get (no install, no root needed unless the package
#     lists must be refreshed) and unpack it with dpkg-deb into the git-ignored
#     <project>/.assets/wordnet-base/, leaving the files in .assets/wordnet-base/usr/share/wordnet/.
# Licence: WordNet 3.0 licence (BSD-like), copy at <dict>/../doc/wordnet-base/copyright.
# Usage: deploy/setup/fetch-wordnet.sh        -> prints e.g. /usr/share/wordnet
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
system_dict=/usr/share/wordnet
if [ -f "$system_dict/index.noun" ]; then
  echo "$system_dict"
  exit 0
fi
dest="$root/.assets/wordnet-base"
dict="$dest/usr/share/wordnet"
if [ -f "$dict/index.noun" ] && [ -f "$dict/data.noun" ]; then
  echo "$dict"
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is required to fetch the Debian package wordnet-base (Debian/Ubuntu only);" \
         "alternatively install WordNet 3.0 so that $system_dict/index.noun exists" >&2
    exit 1
  }
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
chmod 1777 "$tmp"   # apt-get download writes as the _apt user when run as root
download() { (cd "$tmp" && apt-get download -q wordnet-base) >&2; }
if ! download; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "apt-get download failed; refreshing the package lists (apt-get update) and retrying" >&2
    apt-get update -qq >&2
    download
  else
    echo "error: 'apt-get download wordnet-base' failed; run 'sudo apt-get update' and retry" >&2
    exit 1
  fi
fi
deb=$(ls "$tmp"/wordnet-base_*.deb)
mkdir -p "$dest"
dpkg-deb -x "$deb" "$dest"
[ -f "$dict/index.noun" ] || { echo "error: $deb did not contain usr/share/wordnet/index.noun" >&2; exit 1; }
basename "$deb" > "$dest/PACKAGE"   # records the version fetched (e.g. wordnet-base_1%3a3.0-37_all.deb)
echo "$dict"
