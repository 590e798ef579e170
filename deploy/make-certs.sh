#!/bin/sh
# Create a throwaway CA and a server certificate signed by it, to try the fleet
# of deploy/docker-compose.yml over TLS. Runs once: existing files are kept.
# For production, mount a real certificate instead (same file names).
#
#   make-certs.sh [DIR]            (default /certs)
#
# Writes into DIR:
#   ca.crt        the CA to trust in clients (SSL_CERT_FILE=deploy/certs/ca.crt)
#   server.crt    server certificate (for nginx)
#   server.key    its private key    (for nginx)
#   haproxy.pem   server.crt + server.key in one file (for HAProxy)
# The CA's private key is thrown away: nothing else can ever be signed with it.
#
# Environment: CERT_NAMES (subjectAltName, default DNS:localhost,IP:127.0.0.1),
# CERT_DAYS (default 825), CERT_OWNER (uid:gid to own the private keys, e.g.
# 99:99 for the haproxy image, which does not run as root).
set -eu

dir="${1:-/certs}"
names="${CERT_NAMES:-DNS:localhost,IP:127.0.0.1}"
days="${CERT_DAYS:-825}"

if [ -s "$dir/ca.crt" ] && [ -s "$dir/server.crt" ] && [ -s "$dir/server.key" ] \
    && [ -s "$dir/haproxy.pem" ]; then
    echo "make-certs: $dir already holds a certificate; keeping it"
    exit 0
fi
if ! command -v openssl >/dev/null 2>&1; then
    apk add --no-cache openssl >/dev/null   # the alpine image of docker-compose.yml
fi

mkdir -p "$dir"
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days "$days" -subj "/CN=wsbroker throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
cat > "$work/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$names
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
EXT
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/server.ext" \
    -out "$work/server.crt" 2>/dev/null

cat "$work/server.crt" "$work/server.key" > "$work/haproxy.pem"
chmod 644 "$work/ca.crt" "$work/server.crt"
chmod 600 "$work/server.key" "$work/haproxy.pem"
if [ -n "${CERT_OWNER:-}" ]; then
    chown "$CERT_OWNER" "$work/server.key" "$work/haproxy.pem"
fi
# The usable files appear last, all at once, so a half-made set is never kept.
for name in server.key server.crt haproxy.pem ca.crt; do
    mv "$work/$name" "$dir/$name"
done
echo "make-certs: wrote $dir/ca.crt, server.crt, server.key, haproxy.pem ($names)"
