#!/bin/sh
# peer-certs.sh -- TEST/TRIAL credentials for fedmutual's peer-to-peer runtime (mutual TLS).
#
#   Usage: sh scripts/peer-certs.sh DIR N [HOST ...]
#
# FOR TESTS AND TRIALS ONLY: a self-signed CA and unencrypted keys.  A real
# federation uses certificates from a CA its members trust, with each peer's key
# made and kept on that peer's machine.
#
# Writes into DIR (created if missing; existing files are overwritten):
#
#   ca.crt, ca.key       the test CA; every peer trusts ca.crt (peers.toml: ca = ...)
#   peerI.crt, peerI.key (I = 0 .. N-1) peer I's certificate and key, for both ends of
#                        a connection: as a server it proves it is peer I to its callers,
#                        as a client it proves it to the peer it calls.  The certificate's
#                        common name is "peerI"; its subjectAltName holds DNS:peerI (the
#                        name callers check), DNS:localhost, IP:127.0.0.1 and every HOST
#                        given (a name, or an IPv4/IPv6 address).
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: sh $0 DIR N [HOST ...]" >&2
    exit 2
fi
DIR=$1
N=$2
shift 2
case $N in
    ''|*[!0-9]*|0) echo "N must be a positive integer, got '$N'" >&2; exit 2 ;;
esac
EXTRA=""
for h in "$@"; do
    case $h in
        *[!0-9.]*) case $h in *:*) EXTRA="$EXTRA, IP:$h" ;; *) EXTRA="$EXTRA, DNS:$h" ;; esac ;;
        *) EXTRA="$EXTRA, IP:$h" ;;
    esac
done

mkdir -p "$DIR"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peer-certs.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -sha256 -days 30 -subj "/CN=fedmutual peers test CA (not for production)" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null

i=0
while [ "$i" -lt "$N" ]; do
    cat >"$TMP/peer$i.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:peer$i, DNS:localhost, IP:127.0.0.1$EXTRA
EXT
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -subj "/CN=peer$i" -keyout "$DIR/peer$i.key" -out "$TMP/peer$i.csr" 2>/dev/null
    openssl x509 -req -in "$TMP/peer$i.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
        -CAcreateserial -CAserial "$TMP/ca.srl" -days 30 -sha256 \
        -extfile "$TMP/peer$i.ext" -out "$DIR/peer$i.crt" 2>/dev/null
    chmod 600 "$DIR/peer$i.key"
    i=$((i + 1))
done
chmod 600 "$DIR/ca.key"
echo "wrote a test CA and $N peer certificates to $DIR"
