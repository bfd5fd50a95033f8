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

ensure_cargo

start_throwaway_etcd 23790 test

# --all-targets does not include doc tests, hence the second run. set -e
# makes the script exit with cargo's status as soon as one fails.
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
