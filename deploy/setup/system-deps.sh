#!/usr/bin/env bash
# Checks the prerequisites (Rust, Python) and installs the Debian/Ubuntu packages oodgate needs
# to build and test: a C toolchain, cmake + nasm (libjpeg-turbo is built from source),
# python3-venv, unzip, nats-server and openssl (deploy/nats/make-certs.sh, which the tests run).
# Uses sudo when not root; installs only what is missing.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 1; }
command -v cargo >/dev/null || fail "Rust is required (cargo not found): install it with rustup, https://rustup.rs, Rust >= 1.92"
command -v python3 >/dev/null || fail "Python 3 is required (python3 not found): sudo apt-get install -y python3 python3-venv"
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
[ "${rustc_minor:-0}" -ge 92 ] || fail "Rust >= 1.92 is required (found $(rustc --version)); run: rustup update"

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in build-essential cmake nasm pkg-config python3-venv unzip nats-server curl openssl; do
  have "$p" || need+=("$p")
done
# python3-venv may be provided without the Debian package (e.g. pyenv builds).
if [[ " ${need[*]-} " == *" python3-venv "* ]] && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  need=("${need[@]/python3-venv}")
fi
if [[ " ${need[*]-} " == *" nats-server "* ]] && command -v nats-server >/dev/null; then
  need=("${need[@]/nats-server}")
fi
mapfile -t need < <(printf '%s\n' "${need[@]-}" | sed '/^$/d')
[ ${#need[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || fail "apt-get not found; install these packages with your package manager: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || fail "these packages are missing and installing them needs root: ${need[*]} (run as root or install sudo)"
  SUDO="sudo"
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null
}
