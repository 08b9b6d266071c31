#!/bin/sh
# Fails when a C/C++ source of the project is not clang-format clean
# (.clang-format at the top). Skipped (77) without clang-format.
# usage: check_format.sh SOURCE_DIR
set -eu
cd "$1"
command -v clang-format >/dev/null 2>&1 || { echo "1..0 # SKIP clang-format not installed"; exit 77; }
files=$(git ls-files '*.c' '*.h' '*.cpp' 2>/dev/null || find include lib tests examples bench -name '*.[ch]' -o -name '*.cpp')
bad=0
n=0
for f in $files; do
  n=$((n + 1))
  if clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
    echo "ok $n - $f"
  else
    echo "not ok $n - $f is not clang-format clean (run clang-format -i $f)"
    bad=1
  fi
done
echo "1..$n"
exit $bad
