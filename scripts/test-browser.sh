#!/usr/bin/env bash
# The console's browser test: installs Chromium and its WebDriver when
# missing, starts a throwaway etcd for this run only, and runs the ignored
# browser test of tests/console.rs, which drives headless Chromium through
# chromedriver. The default test command (scripts/test.sh) skips it.
#
#   scripts/test-browser.sh [extra test harness args, e.g. --nocapture]
#   ETCD_PORT            client port for the throwaway etcd (default 24790,
#                        stepping by 100 when busy)
#   CONSOLE_SCREENSHOTS  folder the test saves its screenshots to (default
#                        a temporary one); `CONSOLE_SCREENSHOTS=docs`
#                        from the repository refreshes the README's
set -euo pipefail

# The test runs in the crate's folder; a relative folder means this one.
if [[ -n "${CONSOLE_SCREENSHOTS:-}" ]]; then
    CONSOLE_SCREENSHOTS="$(realpath -m -- "$CONSOLE_SCREENSHOTS")"
    export CONSOLE_SCREENSHOTS
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR source=lib/etcd-common.sh
source scripts/lib/etcd-common.sh

scripts/install-deps.sh --browser
ensure_cargo

start_throwaway_etcd 24790 browser

cargo test -p pubsub-etcd-cli --test console -- --ignored --exact console_in_a_browser "$@"
