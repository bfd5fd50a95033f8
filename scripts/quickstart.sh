#!/usr/bin/env bash
# First thing to run: installs missing system tools, starts a throwaway
# etcd, runs the Rust quickstart example and a command-line round trip
# against it, and stops that etcd again.
#
#   ETCD_PORT  client port for the throwaway etcd (default 23791; when not
#              set and 23791 is busy, 23891, 23991, ... are tried)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source scripts/lib/etcd-common.sh

scripts/install-deps.sh

ensure_cargo

# Compile before starting etcd, so a slow first build does not keep an idle
# etcd around and a build error needs no cleanup.
# Two builds: with `--example`, cargo builds only example targets, so the
# CLI's binary would be missing on a fresh clone. The dev profile is enough
# for a few messages, builds in about half the time of a release build, and
# is what the test suite already built, so CI compiles nothing twice.
cargo build -p pubsub-etcd --example quickstart
cargo build -p pubsub-etcd-cli

start_throwaway_etcd 23791 quickstart

cargo run -p pubsub-etcd --example quickstart

# The same walk-through with the command-line tool.
cli="${CARGO_TARGET_DIR:-target}/debug/pubsub-etcd"
export PUBSUB_ETCD_NAMESPACE="quickstart-cli-$$"
log "command line: create a topic, produce three lines, consume them as group 'demo'"
"$cli" topic create greetings --partitions 2
printf 'k1:hello\nk2:darkness\nk1:my old friend\n' |
    "$cli" produce greetings --key-separator : --format json
"$cli" consume greetings --group demo --exit-at-end --format json
"$cli" group describe demo
"$cli" topic describe greetings
"$cli" group delete demo
"$cli" topic delete greetings
