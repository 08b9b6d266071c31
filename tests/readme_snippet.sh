#!/bin/sh
# Extracts the C program of README.md's "Using the library" section exactly
# as it stands, compiles it against this build's library with warnings as
# errors, and runs it in a temporary directory.
# usage: readme_snippet.sh BUILD_DIR SOURCE_DIR [SANITIZE]
set -eu
build=$1
src=$2
san=""
case ${3:-none} in none | "") ;; *) san="-fsanitize=$3" ;; esac
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imml-readme.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
awk '/^## Using the library/ {sec = 1; next}
     /^## / {sec = 0}
     sec && /^```c$/ {code = 1; next}
     code && /^```$/ {exit}
     code {print}' "$src/README.md" >"$tmp/snippet.c"
[ -s "$tmp/snippet.c" ] || {
  echo "not ok 1 - README.md has a \`\`\`c block under 'Using the library'"
  echo "1..1"
  exit 1
}
echo "ok 1 - extracted $(wc -l <"$tmp/snippet.c") lines from README.md"
# shellcheck disable=SC2086
if ! ${CC:-cc} -std=c11 -Wall -Wextra -Wpedantic -Werror $san \
  -I"$src/include" "$tmp/snippet.c" -L"$build" -limml -o "$tmp/snippet" \
  2>"$tmp/cc.log"; then
  sed 's/^/# /' "$tmp/cc.log"
  echo "not ok 2 - the README program compiles as it stands"
  echo "1..2"
  exit 1
fi
echo "ok 2 - the README program compiles as it stands"
if ! (cd "$tmp" && LD_LIBRARY_PATH="$build" ./snippet >run.log 2>&1); then
  sed 's/^/# /' "$tmp/run.log"
  echo "not ok 3 - the README program runs"
  echo "1..3"
  exit 1
fi
sed 's/^/# /' "$tmp/run.log"
[ -s "$tmp/model.imml" ] || {
  echo "not ok 3 - the README program wrote model.imml"
  echo "1..3"
  exit 1
}
echo "ok 3 - the README program trains 3 steps and saves model.imml"
echo "1..3"
