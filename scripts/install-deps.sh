#!/usr/bin/env bash
# Install the system tools the build and tests need (etcd, etcdctl, protoc)
# from Debian packages, only those that are missing. Quiet no-op when all
# are present, so every other script can call it unconditionally.
# `--browser` also installs Debian's chromium and chromium-driver, which only
# the console's browser test (scripts/test-browser.sh) needs.
set -euo pipefail

browser=0
for arg in "$@"; do
    case "$arg" in
        --browser) browser=1 ;;
        *) echo "install-deps.sh: unknown option $arg (only --browser)" >&2; exit 2 ;;
    esac
done

# command -> Debian package that provides it
declare -A PKG_FOR=(
    [etcd]=etcd-server
    [etcdctl]=etcd-client
    [protoc]=protobuf-compiler
    [chromium]=chromium
    [chromedriver]=chromium-driver
)
commands=(etcd etcdctl protoc)
((browser)) && commands+=(chromium chromedriver)

missing=()
for cmd in "${commands[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG_FOR[$cmd]}")
done
((${#missing[@]} == 0)) && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps.sh: missing ${missing[*]} and apt-get is not available; install them by hand" >&2
    exit 1
fi

# Root needs no sudo; otherwise use it if we can.
SUDO=()
if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-deps.sh: need root (or sudo) to install ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install-deps.sh: installing ${missing[*]}" >&2

# etcd-server's postinst runs `invoke-rc.d etcd start`, which would leave a
# system etcd listening on 127.0.0.1:2379. We only want etcds whose PIDs we
# record, so, if no policy is in place, forbid service starts during the
# install (exit 101 = "action forbidden") and remove the policy afterwards.
POLICY=/usr/sbin/policy-rc.d
added_policy=0
cleanup() {
    if ((added_policy)); then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    added_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists are only refreshed when we actually install something
# (a fresh image has none, and stale ones give 404s).
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq "${missing[@]}" >/dev/null

for cmd in "${commands[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || {
        echo "install-deps.sh: $cmd still missing after installing ${missing[*]}" >&2
        exit 1
    }
done
