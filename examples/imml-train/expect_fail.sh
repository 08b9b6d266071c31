#!/bin/sh
# Usage: expect_fail.sh STATUS TEXT PROGRAM [ARG...]
# Runs PROGRAM with its arguments and passes when it exits with STATUS and
# its standard error contains TEXT (a fixed string).
set -u
want=$1
text=$2
shift 2
err=$(mktemp) || exit 1
trap 'rm -f "$err"' EXIT
"$@" >/dev/null 2>"$err"
status=$?
cat "$err" >&2
if [ "$status" -ne "$want" ]; then
  echo "FAIL: exit status $status, expected $want" >&2
  exit 1
fi
if ! grep -F -q -e "$text" "$err"; then
  echo "FAIL: standard error does not contain: $text" >&2
  exit 1
fi
echo "ok: exit status $status, message contains: $text"
