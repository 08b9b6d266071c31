#!/bin/sh
# Compares the dynamic symbols libimml exports, with their version nodes,
# with the committed list, so nothing internal leaks, nothing public
# disappears silently, and no stable function slips into the experimental
# node (or back).
# usage: check_symbols.sh LIBRARY EXPECTED_LIST
set -eu
lib=$1
expected=$2
# "name NODE" per exported function or object; the version nodes' own
# absolute symbols are left out.
actual=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' |
  sed -n 's/^\([^@]*\)@@\(.*\)$/\1 \2/p' | sort -u)
unversioned=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' |
  grep -v '@@' || true)
want=$(grep -v '^#' "$expected" | sed '/^$/d' | sort -u)
if [ -n "$unversioned" ]; then
  echo "exported symbols without a version node: $unversioned"
  echo "not ok 1 - every exported symbol is versioned (lib/libimml.map)"
  exit 1
fi
if [ "$actual" != "$want" ]; then
  echo "# exported symbols differ from $expected:"
  printf '%s\n' "$want" >"${TMPDIR:-/tmp}/imml-sym-want.$$"
  printf '%s\n' "$actual" | diff -u "${TMPDIR:-/tmp}/imml-sym-want.$$" - | sed 's/^/# /' || true
  rm -f "${TMPDIR:-/tmp}/imml-sym-want.$$"
  echo "not ok 1 - exported symbols and version nodes match $expected"
  exit 1
fi
echo "ok 1 - $(printf '%s\n' "$actual" | wc -l) exported symbols and their version nodes match $expected"
echo "1..1"
