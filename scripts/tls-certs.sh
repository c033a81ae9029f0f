#!/usr/bin/env bash
# Make a test set of TLS credentials for `snapmv serve --tls ...` and its
# clients, with GnuTLS's certtool and psktool (Debian: gnutls-bin):
#
#   scripts/tls-certs.sh DIR [SERVER_NAME...]
#
# SERVER_NAME: host names and IP addresses the server certificate is
# valid for (default: localhost 127.0.0.1 ::1).
#
# DIR/ca/            ca-cert.pem ca-key.pem     the CA (keep ca-key.pem safe)
# DIR/server/        ca-cert.pem server-cert.pem server-key.pem
#                    -> snapmv serve --tls require --tls-dir DIR/server
# DIR/alice/, bob/   ca-cert.pem client-cert.pem client-key.pem (CN alice/bob)
#                    -> nbds://HOST/EXPORT?tls-certificates=DIR/alice
#                    -> qemu --object tls-creds-x509,id=tls0,dir=DIR/alice,endpoint=client
# DIR/psk/keys.psk   alice:HEX and bob:HEX (nbdkit's psktool format)
#                    -> snapmv serve --tls require --tls-psk DIR/psk/keys.psk
#                    -> nbds://alice@HOST/EXPORT?tls-psk-file=DIR/psk/keys.psk
#                    -> qemu --object tls-creds-psk,id=tls0,dir=DIR/psk,username=alice,endpoint=client
# For tests of refusals, clients a server with DIR/server must turn away:
# DIR/expired/       a certificate from the CA that expired in 2020
# DIR/otherca/       a certificate from another CA (DIR/other-ca/)
# DIR/selfsigned/    a self-signed certificate
# DIR/nocert/        the CA certificate only: no client certificate
#
# Keys are RSA 2048. Certificates are valid for 10 years and allow key
# encipherment besides signing, which qemu insists on for X.509
# credentials (so not ECDSA: certtool drops that usage for EC keys; and
# certtool's EC keys sometimes lack a leading zero byte that rustls's
# ring then refuses). Existing files in DIR are overwritten.
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir=$1
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1 ::1)

for t in certtool psktool; do
    command -v "$t" >/dev/null || {
        echo "tls-certs.sh: $t not found (apt-get install gnutls-bin)" >&2
        exit 1
    }
done

mkdir -p "$dir"
cd "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

key() { certtool --generate-privkey --key-type=rsa --bits=2048 --outfile "$1" 2>/dev/null; }

# A CA: self-signed, allowed to sign certificates.
make_ca() { # dir cn
    mkdir -p "$1"
    key "$1/ca-key.pem"
    cat >"$tmp/ca.info" <<EOF
cn = "$2"
ca
cert_signing_key
expiration_days = 3650
EOF
    certtool --generate-self-signed --load-privkey "$1/ca-key.pem" \
        --template "$tmp/ca.info" --outfile "$1/ca-cert.pem" 2>/dev/null
}

# A client certificate (CN $2) signed by the CA in $3, in directory $1,
# with extra template lines in $4.
make_client() { # dir cn ca_dir extra
    mkdir -p "$1"
    cp ca/ca-cert.pem "$1/ca-cert.pem"
    key "$1/client-key.pem"
    printf 'cn = "%s"\ntls_www_client\nsigning_key\nencryption_key\n%s\n' "$2" "$4" >"$tmp/client.info"
    certtool --generate-certificate --load-privkey "$1/client-key.pem" \
        --load-ca-certificate "$3/ca-cert.pem" --load-ca-privkey "$3/ca-key.pem" \
        --template "$tmp/client.info" --outfile "$1/client-cert.pem" 2>/dev/null
}

make_ca ca "snapmv test CA"
make_ca other-ca "another CA"

# The server: a certificate for its names, signed by the CA.
mkdir -p server
cp ca/ca-cert.pem server/ca-cert.pem
key server/server-key.pem
{
    echo 'organization = "snapmv"'
    echo "cn = \"${names[0]}\""
    for n in "${names[@]}"; do
        if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then
            echo "ip_address = \"$n\""
        else
            echo "dns_name = \"$n\""
        fi
    done
    echo 'tls_www_server'
    echo 'signing_key'
    echo 'encryption_key'
    echo 'expiration_days = 3650'
} >"$tmp/server.info"
certtool --generate-certificate --load-privkey server/server-key.pem \
    --load-ca-certificate ca/ca-cert.pem --load-ca-privkey ca/ca-key.pem \
    --template "$tmp/server.info" --outfile server/server-cert.pem 2>/dev/null

make_client alice alice ca 'expiration_days = 3650'
make_client bob bob ca 'expiration_days = 3650'
make_client expired expired ca \
    "$(printf 'activation_date = "2019-01-01 00:00:00 UTC"\nexpiration_date = "2020-01-01 00:00:00 UTC"')"
make_client otherca mallory other-ca 'expiration_days = 3650'

mkdir -p selfsigned
cp ca/ca-cert.pem selfsigned/ca-cert.pem
key selfsigned/client-key.pem
printf 'cn = "alice"\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 3650\n' >"$tmp/self.info"
certtool --generate-self-signed --load-privkey selfsigned/client-key.pem \
    --template "$tmp/self.info" --outfile selfsigned/client-cert.pem 2>/dev/null

mkdir -p nocert
cp ca/ca-cert.pem nocert/ca-cert.pem

mkdir -p psk
rm -f psk/keys.psk
psktool -u alice -p psk/keys.psk >/dev/null
psktool -u bob -p psk/keys.psk >/dev/null

# Readable by the user running the server and the clients only.
chmod -R go-rwx .
echo "tls-certs.sh: credentials in $(pwd)"
