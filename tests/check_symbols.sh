#!/bin/sh
# Compares the dynamic symbols libimml exports with the committed list, so
# nothing internal leaks and nothing public disappears silently.
# usage: check_symbols.sh LIBRARY EXPECTED_LIST
set -eu
lib=$1
expected=$2
actual=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' |
  sed 's/@.*//' | grep -v '^IMML_0$' | sort -u)
want=$(grep -v '^#' "$expected" | sed '/^$/d' | sort -u)
if [ "$actual" != "$want" ]; then
  echo "exported symbols differ from $expected:"
  printf '%s\n' "$want" >"${TMPDIR:-/tmp}/imml-sym-want.$$"
  printf '%s\n' "$actual" | diff -u "${TMPDIR:-/tmp}/imml-sym-want.$$" - || true
  rm -f "${TMPDIR:-/tmp}/imml-sym-want.$$"
  echo "not ok 1 - exported symbols match $expected"
  exit 1
fi
# every exported symbol carries the IMML_0 version node
if nm -D --defined-only "$lib" | awk '$2 == "T" {print $3}' | grep -v '@@IMML_0$' | grep -q .; then
  echo "not ok 1 - every exported function is versioned IMML_0"
  exit 1
fi
echo "ok 1 - $(printf '%s\n' "$actual" | wc -l) exported symbols match $expected"
echo "1..1"
