#!/usr/bin/env bash
# Start a throwaway three-member etcd cluster (m0 m1 m2) on 127.0.0.1, each
# member a plain background process whose PID is recorded, so
# cluster-down.sh can stop exactly those processes.
#
#   CLUSTER_BASE_PORT  member i listens for clients on BASE+2i and for
#                      peers on BASE+2i+1 (default 23800)
#   ETCD_QUOTA_BYTES   optional --quota-backend-bytes
#   CLUSTER_STATE_DIR  where mI.pid / mI.datadir / mI.log go
#                      (default ${TMPDIR:-/tmp}/pubsub-etcd-cluster-$BASE)
#
# Prints the comma-separated client endpoints as the last line of stdout.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/etcd-common.sh"

base="${CLUSTER_BASE_PORT:-23800}"
quota="${ETCD_QUOTA_BYTES:-}"
state_dir="${CLUSTER_STATE_DIR:-${TMPDIR:-/tmp}/pubsub-etcd-cluster-$base}"
members=(m0 m1 m2)

command -v etcd >/dev/null 2>&1 || die "etcd not found; run scripts/install-deps.sh"
command -v etcdctl >/dev/null 2>&1 || die "etcdctl not found; run scripts/install-deps.sh"

client_port() { echo $((base + 2 * $1)); }
peer_port() { echo $((base + 2 * $1 + 1)); }

# Refuse to start over a running cluster or on busy ports.
for i in "${!members[@]}"; do
    m="${members[$i]}"
    if [[ -f "$state_dir/$m.pid" ]] && pid_alive "$(cat "$state_dir/$m.pid")"; then
        die "cluster member $m already running (PID $(cat "$state_dir/$m.pid"), state dir $state_dir); run scripts/cluster-down.sh first"
    fi
    for p in "$(client_port "$i")" "$(peer_port "$i")"; do
        if port_listening "$p"; then
            die "port 127.0.0.1:$p is already in use; pick another CLUSTER_BASE_PORT"
        fi
    done
done
# Stale state from a crashed run: drop its data dirs before reusing.
for m in "${members[@]}"; do
    if [[ -f "$state_dir/$m.datadir" ]]; then
        rm -rf -- "$(cat "$state_dir/$m.datadir")"
    fi
    rm -f -- "$state_dir/$m.pid" "$state_dir/$m.datadir"
done
mkdir -p -- "$state_dir"

initial_cluster=""
endpoints=""
for i in "${!members[@]}"; do
    initial_cluster+="${initial_cluster:+,}${members[$i]}=http://127.0.0.1:$(peer_port "$i")"
    endpoints+="${endpoints:+,}127.0.0.1:$(client_port "$i")"
done
# A fresh token per start, so a member can never join a previous cluster.
token="$(unique_token "pubsub-etcd-cluster-$base")"

pids=()
data_dirs=()
# On failure: show every member's log tail and stop what we started.
fail() {
    local j
    for j in "${!members[@]}"; do
        show_log_tail "$state_dir/${members[$j]}.log" 20
    done
    for j in "${!pids[@]}"; do
        stop_etcd "${pids[$j]}" "${data_dirs[$j]}" || true
        rm -rf -- "${data_dirs[$j]}"
        rm -f -- "$state_dir/${members[$j]}.pid" "$state_dir/${members[$j]}.datadir"
    done
    die "$1"
}

for i in "${!members[@]}"; do
    m="${members[$i]}"
    cport="$(client_port "$i")"
    pport="$(peer_port "$i")"
    data_dir="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-etcd-data-$base-$m.XXXXXX")"
    printf '%s\n' "$data_dir" >"$state_dir/$m.datadir"
    : >"$state_dir/$m.log"
    etcd_common_flags "$quota"
    args=(
        --name="$m"
        --data-dir="$data_dir"
        --listen-client-urls="http://127.0.0.1:$cport"
        --advertise-client-urls="http://127.0.0.1:$cport"
        --listen-peer-urls="http://127.0.0.1:$pport"
        --initial-advertise-peer-urls="http://127.0.0.1:$pport"
        --initial-cluster="$initial_cluster"
        --initial-cluster-state=new
        --initial-cluster-token="$token"
        "${common_flags[@]}"
    )
    # Detached stdio, so `$(cluster-up.sh)` does not wait on etcd's pipes.
    "${CLEAN_ENV[@]}" etcd "${args[@]}" </dev/null >>"$state_dir/$m.log" 2>&1 &
    pids+=("$!")
    data_dirs+=("$data_dir")
    printf '%s\n' "$!" >"$state_dir/$m.pid"
done

# `endpoint health` with all three endpoints fails unless each is healthy.
wait_healthy "$endpoints" "${pids[@]}" || fail "cluster failed to start on $endpoints (logs kept in $state_dir)"

log "cluster healthy on $endpoints (PIDs ${pids[*]}, state dir $state_dir)"
printf '%s\n' "$endpoints"
