#!/usr/bin/env bash
# Stop the etcd started by etcd-up.sh (same ETCD_PORT / ETCD_STATE_DIR
# defaults) and delete its data and state dirs. Signals only the PID recorded
# in the state dir, and only if it is still that etcd. Idempotent.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/etcd-common.sh"

port="${ETCD_PORT:-2379}"
state_dir="${ETCD_STATE_DIR:-${TMPDIR:-/tmp}/pubsub-etcd-$port}"

# Nothing recorded: nothing of ours to stop.
[[ -f "$state_dir/pid" ]] || exit 0

pid="$(cat "$state_dir/pid")"
data_dir=""
if [[ -f "$state_dir/datadir" ]]; then
    data_dir="$(cat "$state_dir/datadir")"
fi

stop_etcd "$pid" "$data_dir"

if [[ -n "$data_dir" ]]; then
    rm -rf -- "$data_dir"
fi
rm -rf -- "$state_dir"
