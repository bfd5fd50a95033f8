# shellcheck shell=bash
# Helpers shared by the etcd-*.sh / cluster-*.sh / test.sh / quickstart.sh
# scripts. Sourced, never executed. Uses only bash builtins, coreutils and
# /proc, so it works on a bare Debian 12 (no procps, no iproute2).

# Messages go to stderr: stdout is reserved for the endpoint line(s) that
# callers capture with $(...).
log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    log "$*"
    exit 1
}

# Seconds we wait for etcd to report healthy before giving up.
ETCD_HEALTH_TIMEOUT="${ETCD_HEALTH_TIMEOUT:-30}"

# True if something accepts TCP connections on 127.0.0.1:$1. Uses bash's
# /dev/tcp (no ss/netstat needed); timeout guards against a hung connect.
port_listening() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# True if $1 is a live (non-zombie) process. An orphaned etcd is reparented
# to PID 1, which may reap it late, so `kill -0` alone would report a dead
# etcd as alive for a while.
pid_alive() {
    local pid="$1" stat
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    # Field 3 (state) follows the ")" that closes the command name.
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

# True if process $1 is an etcd whose command line names data dir $2: guards
# against a recycled PID, so we only ever signal the etcd we started.
pid_is_our_etcd() {
    local pid="$1" datadir="$2" cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *etcd* && "$cmdline" == *"--data-dir=$datadir "* ]]
}

# stop_etcd PID DATADIR: SIGTERM, then SIGKILL after 10 s, then wait until
# the process is really gone. Never touches a PID that is not our etcd.
stop_etcd() {
    local pid="$1" datadir="$2" i
    pid_alive "$pid" || return 0
    if ! pid_is_our_etcd "$pid" "$datadir"; then
        log "PID $pid is not the etcd for $datadir any more; not signalling it"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    log "etcd PID $pid ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    die "etcd PID $pid still alive after SIGKILL"
}

# etcd reads ETCD_<FLAG> variables as configuration (and etcdctl reads
# ETCDCTL_*), and etcd warns about unknown ones such as our ETCD_PORT. So
# both run under `"${CLEAN_ENV[@]}" cmd ...`, which drops all of them: only
# the flags we pass count. An array rather than a function so that
# `"${CLEAN_ENV[@]}" etcd ... &` makes $! the PID of etcd itself (env execs).
CLEAN_ENV=(env)
while IFS= read -r _name; do
    CLEAN_ENV+=(-u "$_name")
done < <(compgen -e | grep -E '^ETCD(CTL)?_' || true)
unset _name

# wait_healthy ENDPOINTS PID...: poll `etcdctl endpoint health` (which fails
# unless every listed endpoint is healthy) until it succeeds, a PID dies, or
# the timeout passes. Returns non-zero on failure.
wait_healthy() {
    local endpoints="$1" deadline pid
    shift
    deadline=$((SECONDS + ETCD_HEALTH_TIMEOUT))
    while ((SECONDS < deadline)); do
        for pid in "$@"; do
            if ! pid_alive "$pid"; then
                log "etcd PID $pid exited during startup"
                return 1
            fi
        done
        if "${CLEAN_ENV[@]}" etcdctl --endpoints="$endpoints" \
            --dial-timeout=1s --command-timeout=1s endpoint health >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    log "etcd at $endpoints not healthy after ${ETCD_HEALTH_TIMEOUT}s"
    return 1
}

# Print the last lines of a log file to stderr, for failure diagnostics.
show_log_tail() {
    [[ -f "$1" ]] || return 0
    printf -- '--- last lines of %s ---\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2 || true
}

# A token unique to this start, so members of an old cluster can never join.
unique_token() {
    printf '%s-%s-%s' "$1" "$$" "$(date +%s%N)"
}

# pick_port DEFAULT EXPLICIT: prints the client port to use. If the caller
# set it explicitly (EXPLICIT non-empty) use it as is, so etcd-up.sh gives a
# clear error when it is busy; otherwise take DEFAULT or, if it or its peer
# port is busy (e.g. another developer's etcd), DEFAULT+100, +200, ...
# (steps of 100 stay clear of the cluster scripts' 23800..23805).
pick_port() {
    local default="$1" explicit="$2" p i
    if [[ -n "$explicit" ]]; then
        printf '%s\n' "$explicit"
        return 0
    fi
    for ((i = 0; i < 10; i++)); do
        p=$((default + 100 * i))
        if ! port_listening "$p" && ! port_listening $((p + 1)); then
            printf '%s\n' "$p"
            return 0
        fi
    done
    die "no free port pair found from $default"
}

# Puts cargo on PATH: rustup's installer puts it in ~/.cargo/bin, which a
# non-login shell (e.g. CI) may not have.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-}/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        source "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (rustup) first"
}

# Starts a throwaway etcd for this run on port $ETCD_PORT (or the first free
# one from $1, stepping by 100), exports PUBSUB_ETCD_ENDPOINTS, and stops
# exactly that etcd when the calling script exits, whether it passed,
# failed or was interrupted. $2 names the run in its state dir.
start_throwaway_etcd() {
    throwaway_port="$(pick_port "$1" "${ETCD_PORT:-}")"
    # A state dir unique to this run, so concurrent runs never share one.
    throwaway_state="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-etcd-$2.XXXXXX")"
    trap stop_throwaway_etcd EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    PUBSUB_ETCD_ENDPOINTS="$(ETCD_PORT="$throwaway_port" ETCD_STATE_DIR="$throwaway_state" \
        scripts/etcd-up.sh | tail -n 1)"
    export PUBSUB_ETCD_ENDPOINTS
    log "PUBSUB_ETCD_ENDPOINTS=$PUBSUB_ETCD_ENDPOINTS"
}

stop_throwaway_etcd() {
    ETCD_PORT="$throwaway_port" ETCD_STATE_DIR="$throwaway_state" scripts/etcd-down.sh || true
    rm -rf -- "$throwaway_state"
}

# Sets `common_flags` to the flags every etcd the scripts start gets (one
# per line in scripts/lib/etcd-flags, which the test harness reads too),
# plus --quota-backend-bytes when $1 is set.
etcd_common_flags() {
    mapfile -t common_flags < <(grep -v -e '^#' -e '^$' "$(dirname "${BASH_SOURCE[0]}")/etcd-flags")
    if [[ -n "${1:-}" ]]; then
        common_flags+=(--quota-backend-bytes="$1")
    fi
}
