#!/bin/sh
# flower-certs.sh -- TEST/TRIAL credentials for a local Flower (flwr 1.42) deployment.
#
#   Usage: sh scripts/flower-certs.sh DIR [N]
#
# FOR TESTS AND TRIALS ONLY.  Everything here is self-signed, unencrypted and
# throw-away.  A production deployment uses certificates issued by a real CA
# and SuperNode keys generated and kept on the SuperNode machines.
#
# Writes into DIR (created if missing; existing files are overwritten):
#
#   ca.crt          test CA certificate (PEM).  Clients trust it:
#                     flower-supernode --root-certificates DIR/ca.crt
#                     flwr CLI config: root-certificates = "DIR/ca.crt"
#                   and the SuperLink gets it via --ssl-ca-certfile.
#   ca.key          test CA private key (PEM, unencrypted).
#   server.pem      SuperLink TLS server certificate (PEM), signed by ca.crt,
#                   subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1.
#                     flower-superlink --ssl-certfile DIR/server.pem
#   server.key      its private key (PEM, unencrypted).
#                     flower-superlink --ssl-keyfile DIR/server.key
#   node_I          (I = 0 .. N-1, N defaults to 0) SuperNode authentication
#                   private key: EC P-384 in *OpenSSH* format, which is what
#                   flwr 1.42 loads (cryptography.load_ssh_private_key):
#                     flower-supernode --auth-supernode-private-key DIR/node_I
#   node_I.pub      matching public key, one line "ecdsa-sha2-nistp384 AAAA... node_I";
#                   registered on the SuperLink (with --enable-supernode-auth) by
#                     flwr supernode register DIR/node_I.pub <connection>
#
# Tools: openssl makes every key and certificate.  OpenSSL cannot write the
# OpenSSH private-key container that flwr requires for node keys, so the
# openssl-made P-384 keys are re-encoded with ssh-keygen (openssh-client); if
# ssh-keygen is missing, python3 (or $PYTHON) with the `cryptography` package
# (a dependency of flwr) does the re-encoding instead.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: sh $0 DIR [N]" >&2
    exit 2
fi
DIR=$1
N=${2:-0}
case $N in
    ''|*[!0-9]*) echo "N must be a non-negative integer, got '$N'" >&2; exit 2 ;;
esac

mkdir -p "$DIR"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/flower-certs.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM

# --- test CA ---------------------------------------------------------------
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -sha256 -days 30 -subj "/CN=fedmutual test CA (not for production)" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null

# --- SuperLink server certificate for localhost / 127.0.0.1 ----------------
cat >"$TMP/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
EOF
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=localhost" -keyout "$DIR/server.key" -out "$TMP/server.csr" 2>/dev/null
openssl x509 -req -in "$TMP/server.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
    -CAcreateserial -CAserial "$TMP/ca.srl" -days 30 -sha256 \
    -extfile "$TMP/server.ext" -out "$DIR/server.pem" 2>/dev/null
chmod 600 "$DIR/ca.key" "$DIR/server.key"

# --- SuperNode authentication key pairs (EC P-384, OpenSSH format) --------
to_openssh() {  # $1 = PEM private key (input), $2 = name (output prefix)
    rm -f "$DIR/$2" "$DIR/$2.pub"
    if command -v ssh-keygen >/dev/null 2>&1; then
        cp "$1" "$DIR/$2"
        chmod 600 "$DIR/$2"
        # Rewrite in place in the OpenSSH container (no passphrase) ...
        ssh-keygen -q -p -N "" -P "" -C "$2" -f "$DIR/$2" >/dev/null
        # ... and derive the one-line public key.
        # shellcheck disable=SC2046  # split "type base64 [comment]" on purpose
        set -- "$2" $(ssh-keygen -y -f "$DIR/$2")
        printf '%s %s %s\n' "$2" "$3" "$1" >"$DIR/$1.pub"
    else
        "${PYTHON:-python3}" - "$1" "$DIR/$2" "$2" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
key = s.load_pem_private_key(open(sys.argv[1], "rb").read(), None)
open(sys.argv[2], "wb").write(key.private_bytes(
    s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
pub = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
open(sys.argv[2] + ".pub", "w").write(pub.decode() + " " + sys.argv[3] + "\n")
EOF
        chmod 600 "$DIR/$2"
    fi
}

i=0
while [ "$i" -lt "$N" ]; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 \
        -out "$TMP/node_$i.pem" 2>/dev/null
    to_openssh "$TMP/node_$i.pem" "node_$i"
    i=$((i + 1))
done

echo "wrote test CA, SuperLink certificate and $N SuperNode key pair(s) to $DIR"
