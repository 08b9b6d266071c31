#!/bin/sh
# The README's test command: installs what is missing, configures a build
# with warnings as errors and the system packages only, and runs every test.
# usage: sh tests/run.sh [BUILD_DIR (default build-tests)] [extra meson setup options...]
# (The README's install command uses the folder build; the demo build-demo.)
set -eu
cd "$(dirname "$0")/.."
sh .ci/install-deps
build=${1:-build-tests}
[ $# -gt 0 ] && shift
if [ -d "$build" ]; then
  meson setup --reconfigure "$build" --wrap-mode=nofallback -Dwerror=true "$@" >/dev/null
else
  meson setup "$build" --wrap-mode=nofallback -Dwerror=true "$@" >/dev/null
fi
ninja -C "$build"
status=0
meson test -C "$build" --print-errorlogs --num-processes 2 || status=$?
# One plain summary line, counted from meson's own log.
log="$build/meson-logs/testlog.json"
if [ -f "$log" ]; then
  passed=$(grep -c '"result": "OK"' "$log" || true)
  skipped=$(grep -c '"result": "SKIP"' "$log" || true)
  failed=$(grep -c '"result": "\(FAIL\|ERROR\|TIMEOUT\|UNEXPECTEDPASS\)"' "$log" || true)
  echo "tests: $passed passed, $failed failed, $skipped skipped"
fi
exit $status
