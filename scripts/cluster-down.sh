#!/usr/bin/env bash
# Stop the three-member cluster started by cluster-up.sh (same
# CLUSTER_BASE_PORT / CLUSTER_STATE_DIR defaults) and delete its data and
# state dirs. Signals only the recorded PIDs, and only while each is still
# that member's etcd. Idempotent.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/etcd-common.sh"

base="${CLUSTER_BASE_PORT:-23800}"
state_dir="${CLUSTER_STATE_DIR:-${TMPDIR:-/tmp}/pubsub-etcd-cluster-$base}"

[[ -d "$state_dir" ]] || exit 0

# One member at a time; stop_etcd waits until each is really gone.
for m in m0 m1 m2; do
    [[ -f "$state_dir/$m.pid" ]] || continue
    data_dir=""
    if [[ -f "$state_dir/$m.datadir" ]]; then
        data_dir="$(cat "$state_dir/$m.datadir")"
    fi
    stop_etcd "$(cat "$state_dir/$m.pid")" "$data_dir"
    if [[ -n "$data_dir" ]]; then
        rm -rf -- "$data_dir"
    fi
done
rm -rf -- "$state_dir"
