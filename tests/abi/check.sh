#!/bin/sh
# Compares the public ABI of a built libimml.so with the committed baseline
# tests/abi/libimml.abi (libabigail's abidw/abidiff, Debian: abigail-tools).
# Any difference fails, additions included: a commit that changes the public
# ABI updates the baseline in the same commit (doc/ABI.md).
# usage: sh tests/abi/check.sh BUILD_DIR            compare
#        sh tests/abi/check.sh BUILD_DIR --update   rewrite the baseline
# The baseline is made from a gcc build with debug information (meson's
# default buildtype, debugoptimized), as the README's test command builds.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:?usage: check.sh BUILD_DIR [--update]}
lib=$build/libimml.so
baseline=$root/tests/abi/libimml.abi
for tool in abidw abidiff; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "abi: $tool not found (Debian: apt-get install abigail-tools)" >&2
    exit 2
  }
done
[ -f "$lib" ] || { echo "abi: no $lib (build first)" >&2; exit 2; }
tmp=$(mktemp "${TMPDIR:-/tmp}/imml-abi.XXXXXX")
trap 'rm -f "$tmp"' EXIT INT TERM
abidw --no-show-locs --no-corpus-path --drop-private-types \
  --headers-dir "$root/include" --out-file "$tmp" "$lib"
if [ "${2:-}" = "--update" ]; then
  cp "$tmp" "$baseline"
  echo "abi: baseline $baseline updated from $lib"
  exit 0
fi
status=0
abidiff "$baseline" "$tmp" || status=$?
if [ "$status" -ne 0 ]; then
  echo "abi: the public ABI of $lib differs from tests/abi/libimml.abi" \
    "(abidiff exit status $status; 4: changed, 8/12: incompatible)." >&2
  echo "abi: if the change is intended, run" \
    "'sh tests/abi/check.sh $build --update' and commit the new baseline" \
    "with the change (and follow doc/ABI.md for incompatible ones)." >&2
  exit 1
fi
echo "abi: $lib matches tests/abi/libimml.abi"
