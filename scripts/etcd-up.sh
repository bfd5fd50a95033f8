#!/usr/bin/env bash
# Start a throwaway single-member etcd on 127.0.0.1 as a plain background
# process whose PID is recorded, so etcd-down.sh can stop exactly it.
#
#   ETCD_PORT         client port (default 2379)
#   ETCD_PEER_PORT    peer port (default ETCD_PORT+1)
#   ETCD_QUOTA_BYTES  optional --quota-backend-bytes
#   ETCD_STATE_DIR    where pid/datadir/log go
#                     (default ${TMPDIR:-/tmp}/pubsub-etcd-$ETCD_PORT)
#
# Prints the client endpoint 127.0.0.1:PORT as the last line of stdout.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/etcd-common.sh"

port="${ETCD_PORT:-2379}"
peer_port="${ETCD_PEER_PORT:-$((port + 1))}"
quota="${ETCD_QUOTA_BYTES:-}"
state_dir="${ETCD_STATE_DIR:-${TMPDIR:-/tmp}/pubsub-etcd-$port}"
endpoint="127.0.0.1:$port"

command -v etcd >/dev/null 2>&1 || die "etcd not found; run scripts/install-deps.sh"
command -v etcdctl >/dev/null 2>&1 || die "etcdctl not found; run scripts/install-deps.sh"

# Refuse to clobber a running instance: two etcds on one state dir would
# leave one of them unstoppable by etcd-down.sh.
if [[ -f "$state_dir/pid" ]]; then
    old_pid="$(cat "$state_dir/pid")"
    if pid_alive "$old_pid"; then
        die "etcd already running (PID $old_pid, state dir $state_dir); run scripts/etcd-down.sh first"
    fi
    # Stale state from a crashed run: drop its data dir before reusing.
    if [[ -f "$state_dir/datadir" ]]; then
        rm -rf -- "$(cat "$state_dir/datadir")"
    fi
    rm -f -- "$state_dir/pid" "$state_dir/datadir"
fi
for p in "$port" "$peer_port"; do
    if port_listening "$p"; then
        die "port 127.0.0.1:$p is already in use; pick another ETCD_PORT"
    fi
done

mkdir -p -- "$state_dir"
data_dir="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-etcd-data-$port.XXXXXX")"
log_file="$state_dir/log"
printf '%s\n' "$data_dir" >"$state_dir/datadir"
: >"$log_file"

etcd_common_flags "$quota"
args=(
    --name=default
    --data-dir="$data_dir"
    --listen-client-urls="http://127.0.0.1:$port"
    --advertise-client-urls="http://127.0.0.1:$port"
    --listen-peer-urls="http://127.0.0.1:$peer_port"
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port"
    --initial-cluster="default=http://127.0.0.1:$peer_port"
    --initial-cluster-state=new
    --initial-cluster-token="$(unique_token "pubsub-etcd-$port")"
    "${common_flags[@]}"
)

# stdin/stdout/stderr are detached from the caller so that `$(etcd-up.sh)`
# returns as soon as this script exits instead of waiting on etcd's pipes.
"${CLEAN_ENV[@]}" etcd "${args[@]}" </dev/null >>"$log_file" 2>&1 &
pid=$!
printf '%s\n' "$pid" >"$state_dir/pid"

if ! wait_healthy "$endpoint" "$pid"; then
    show_log_tail "$log_file"
    stop_etcd "$pid" "$data_dir" || true
    rm -rf -- "$data_dir"
    rm -f -- "$state_dir/pid" "$state_dir/datadir"
    die "etcd failed to start on $endpoint (log kept at $log_file)"
fi

log "etcd PID $pid healthy on $endpoint (state dir $state_dir)"
printf '%s\n' "$endpoint"
