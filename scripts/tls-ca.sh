#!/usr/bin/env bash
# A local certificate authority for a Quiver cluster (demo, tests, or a
# cluster without a company CA), made with `quiverctl tls`:
#
#   scripts/tls-ca.sh DIR [HOST...]
#
# writes DIR/ca.pem and DIR/ca-key.pem (once; kept if present), a node
# certificate DIR/node.pem + node-key.pem valid for 127.0.0.1, localhost and
# every HOST given (every node's client and peer address host must be among
# them), and a client certificate DIR/client.pem + client-key.pem (client
# use only: it cannot pass for a node's). Then:
#
#   QUIVER_TLS__CERT_PATH=DIR/node.pem QUIVER_TLS__KEY_PATH=DIR/node-key.pem
#   QUIVER_TLS__CA_PATH=DIR/ca.pem [QUIVER_TLS__CLIENT_CA_PATH=DIR/ca.pem] quiverd ...
#   quiverctl --ca DIR/ca.pem --cert DIR/client.pem --key DIR/client-key.pem ...
#
# Re-running issues new node and client certificates from the same CA (send
# the nodes SIGHUP to load them).
set -euo pipefail
DIR="${1:?usage: $0 DIR [HOST...]}"
shift
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${QUIVER_PROFILE:-dev}"
BIN="${QUIVER_BIN_DIR:-$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")}"
if [ ! -x "$BIN/quiverctl" ]; then
    source ./scripts/ensure-deps.sh
    cargo build --profile "$PROFILE" --bin quiverctl --quiet
fi
hosts=(--host 127.0.0.1 --host localhost)
for host in "$@"; do hosts+=(--host "$host"); done
if [ ! -s "$DIR/ca.pem" ]; then
    "$BIN/quiverctl" tls ca --dir "$DIR" >/dev/null
fi
"$BIN/quiverctl" tls cert --dir "$DIR" --name node "${hosts[@]}" >/dev/null
"$BIN/quiverctl" tls cert --dir "$DIR" --name client --client >/dev/null
echo "CA and certificates in $DIR: ca.pem, node.pem (${hosts[*]//--host /}), client.pem"
