#!/bin/sh
# Writes the C++ program of README.md's "From LibTorch" section, exactly as
# it stands, to OUTPUT; fails when the section has no ```cpp block.  The
# build compiles it with the project's warnings (as errors with
# -Dwerror=true) and the test 'readme-from-libtorch' runs it.
# usage: extract_snippet.sh README.md OUTPUT
set -eu
awk '/^## From LibTorch/ {sec = 1; next}
     /^## / {sec = 0}
     sec && /^```cpp$/ {code = 1; next}
     code && /^```$/ {exit}
     code {print}' "$1" >"$2.tmp"
if [ ! -s "$2.tmp" ]; then
  rm -f "$2.tmp"
  echo "extract_snippet.sh: $1 has no \`\`\`cpp block under '## From LibTorch'" >&2
  exit 1
fi
mv "$2.tmp" "$2"
