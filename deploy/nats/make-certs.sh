#!/usr/bin/env bash
# Generates the TLS files deploy/nats/nats-server.conf expects, into deploy/nats/tls/ (git-
# ignored; never commit keys): a private CA, a server certificate for the names the shipped
# deployments use, and a client certificate for mutual TLS.
#
#   deploy/nats/make-certs.sh [OUT_DIR] [EXTRA_NAME...]
#
# The server certificate covers nats, nats-1, nats-2, nats-3 (docker-compose.yml), the in-cluster
# service name nats.nats.svc.cluster.local, localhost and 127.0.0.1, plus any EXTRA_NAME (a DNS
# name or an IP address). Existing files are kept: delete the folder to issue new ones. For
# production use your organisation's CA (or cert-manager) and mount its files at the same paths.
set -euo pipefail
out="${1:-$(cd "$(dirname "$0")" && pwd)/tls}"
shift || true
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
if [[ -s ca.pem && -s server.pem && -s server-key.pem ]]; then
  echo "TLS files already in $out (delete them to issue new ones)"
  exit 0
fi
umask 077
days=825
names=(nats nats-1 nats-2 nats-3 nats.nats.svc.cluster.local localhost 127.0.0.1 "$@")
san=""
for n in "${names[@]}"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san="${san%,}"

# The CA: signs the server and client certificates; ca.pem is what clients trust (nats.tls_ca).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=oodgate NATS CA" -keyout ca-key.pem -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # issue NAME CN EXTENSIONS
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
    -out "$1.pem" -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$1.csr"
}
issue server "nats" "subjectAltName=$san
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
# For mutual TLS (verify: true in nats-server.conf): oodgate's nats.tls_cert / nats.tls_key.
issue client "oodgate-worker" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
rm -f ca.srl
# Readable by the server and worker containers, which do not run as this user.
chmod 644 ./*.pem
chmod 600 ca-key.pem
echo "wrote $out: ca.pem, server.pem, server-key.pem, client.pem, client-key.pem (server names: ${names[*]})"
