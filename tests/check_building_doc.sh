#!/bin/sh
# Every option of meson_options.txt has its row in doc/BUILDING.md's table
# of build options (| `name` | default | what |), with the default that
# meson_options.txt gives it.
# usage: check_building_doc.sh SOURCE_DIR
set -eu
src=$1
n=0
bad=0
for opt in $(sed -n "s/^option('\([^']*\)'.*/\1/p" "$src/meson_options.txt"); do
  n=$((n + 1))
  # the option's value: on its own line or the next ones, up to description
  value=$(awk -v o="option('$opt'" 'index($0, o) == 1 {on = 1}
    on && match($0, /value : [^,)]*/) {v = substr($0, RSTART + 8, RLENGTH - 8); gsub(/\047/, "", v); print v; exit}
    on && /description/ && !/value/ {exit}' "$src/meson_options.txt")
  row=$(grep "^| \`$opt\` |" "$src/doc/BUILDING.md" || true)
  if [ -z "$row" ]; then
    echo "not ok $n - option '$opt' has a row in doc/BUILDING.md's options table"
    bad=1
  elif [ -n "$value" ] && ! printf '%s\n' "$row" | grep -q "^| \`$opt\` | \`$value\` |"; then
    echo "not ok $n - doc/BUILDING.md gives option '$opt' its default \`$value\`"
    bad=1
  else
    echo "ok $n - option '$opt' (default $value) is documented in doc/BUILDING.md"
  fi
done
echo "1..$n"
exit $bad
