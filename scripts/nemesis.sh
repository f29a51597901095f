#!/usr/bin/env bash
# The long fault campaign: runs the nemesis test (tests/tests/nemesis.rs) once
# per seed, each seed on a fresh 3-node cluster for the given length, and
# writes one line per seed to the results file (default
# nemesis-results.txt): the seed, operations checked, faults injected and
# violations, or FAILED with where its cluster logs were kept.
#
#   scripts/nemesis.sh [--seeds N | --seed-list 3,7,9] [--seconds S] [--out FILE]
#
# QUIVER_NEMESIS_TLS=1 runs every seed with TLS on every port (peers mutual).
# A failing seed replays with
#   QUIVER_NEMESIS_SEEDS=<seed> QUIVER_NEMESIS_SECONDS=<S> \
#     cargo test --workspace --test nemesis -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=50
seed_list=""
seconds=120
out=nemesis-results.txt
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --seed-list) seed_list="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$seeds" =~ ^[0-9]+$ && "$seconds" =~ ^[0-9]+$ ]] || {
    echo "--seeds and --seconds take whole numbers" >&2
    exit 2
}
if [[ -z "$seed_list" ]]; then
    seed_list=$(seq -s, 1 "$seeds")
fi

source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
# The campaign runs copies of what was built, so that the sources (and the
# target dir) may change while it runs and every seed still tests one build.
# Each is copied as soon as it is built: another checkout building into the
# same target dir overwrites the same files.
stash=$(mktemp -d /var/tmp/quiver-nemesis-build.XXXXXX)
echo "==> building"
cargo build --workspace --bins
cp "$CARGO_TARGET_DIR/debug/quiverd" "$CARGO_TARGET_DIR/debug/quiverctl" "$stash/"
built=$(cargo test --workspace --test nemesis --no-run 2>&1 | tee /dev/stderr |
    sed -n 's/.*Executable tests\/nemesis.rs (\(.*\))$/\1/p' | tail -1)
[[ -x "$built" ]] || { echo "could not find the nemesis test executable" >&2; exit 1; }
cp "$built" "$stash/nemesis"
# QUIVER_NEMESIS_TLS=1: every node serves TLS only (a CA made for the
# campaign; nodes and quiverctl inherit the settings, the test's clients
# read them: tests/src/tls.rs).
tls_note=""
if [[ "${QUIVER_NEMESIS_TLS:-0}" == 1 ]]; then
    QUIVER_BIN_DIR="$stash" ./scripts/tls-ca.sh "$stash/tls" >/dev/null
    export QUIVER_TLS__CERT_PATH="$stash/tls/node.pem" QUIVER_TLS__KEY_PATH="$stash/tls/node-key.pem"
    export QUIVER_TLS__CA_PATH="$stash/tls/ca.pem" QUIVER_TLS__CLIENT_CA_PATH="$stash/tls/ca.pem"
    export QUIVER_CA="$stash/tls/ca.pem" QUIVER_CERT="$stash/tls/client.pem" QUIVER_KEY="$stash/tls/client-key.pem"
    tls_note=", TLS on every port"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)
echo "==> testing the build of $commit${dirty:+ (with uncommitted changes)}, kept in $stash"

echo "# nemesis campaign on $commit${dirty:+ (with uncommitted changes)}, ${seconds}s per seed$tls_note" > "$out"
failed=0
IFS=, read -r -a list <<< "$seed_list"
for seed in "${list[@]}"; do
    log=$(mktemp)
    echo "==> seed $seed (${seconds}s)"
    # cargo test runs a test from its package's directory; so does this.
    if (cd tests && QUIVER_BIN_DIR="$stash" QUIVER_NEMESIS_SEEDS="$seed" \
        QUIVER_NEMESIS_SECONDS="$seconds" "$stash/nemesis" --nocapture) > "$log" 2>&1; then
        grep '^nemesis seed' "$log" | tee -a "$out" || true
    else
        failed=$((failed + 1))
        kept=$(grep -o 'kept in [^ ]*' "$log" | head -1 || true)
        echo "nemesis seed $seed: FAILED ($kept); output in $log" | tee -a "$out"
        grep -E 'panicked|not linearizable|missing' "$log" | head -5 | tee -a "$out" || true
        continue
    fi
    rm -f "$log"
done
echo "==> ${#list[@]} seeds on $commit, $failed failed; results in $out"
rm -rf "$stash"
[[ $failed -eq 0 ]]
