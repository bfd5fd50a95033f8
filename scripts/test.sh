#!/usr/bin/env bash
# The project's test command: installs missing system tools, starts a
# throwaway etcd for this run only, runs every test target and the doc
# tests against it, and always stops that etcd again.
#
#   scripts/test.sh [extra `cargo test` args, e.g. -- --nocapture]
#   ETCD_PORT  client port for the throwaway etcd (default 23790; when not
#              set and 23790 is busy, 23890, 23990, ... are tried)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source scripts/lib/etcd-common.sh

scripts/install-deps.sh

# rustup's installer puts cargo in ~/.cargo/bin, which a non-login shell
# (e.g. CI) may not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-}/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (rustup) first"

port="$(pick_port 23790 "${ETCD_PORT:-}")"
# A state dir unique to this run, so concurrent runs never share one.
state_dir="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-etcd-test.XXXXXX")"

# Always stop our etcd, whether cargo passed, failed or we were interrupted.
cleanup() {
    ETCD_PORT="$port" ETCD_STATE_DIR="$state_dir" scripts/etcd-down.sh || true
    rm -rf -- "$state_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

endpoint="$(ETCD_PORT="$port" ETCD_STATE_DIR="$state_dir" scripts/etcd-up.sh | tail -n 1)"
export PUBSUB_ETCD_ENDPOINTS="$endpoint"
log "PUBSUB_ETCD_ENDPOINTS=$PUBSUB_ETCD_ENDPOINTS"

# --all-targets does not include doc tests, hence the second run. set -e
# makes the script exit with cargo's status as soon as one fails.
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
