#!/bin/sh
# The API reference (-Ddocs=enabled): every exported function has its
# section 3 man page (`man 3 imml_forward`), and the documentation gate
# holds: Doxygen run with the same Doxyfile on a copy of imml.h that
# declares one undocumented public function must fail and name it.
# usage: check_docs.sh DOXYGEN DOXYFILE DOCS_OUTDIR SYMBOLS_LIST SOURCE_DIR
set -eu
doxygen=$1
doxyfile=$2
out=$3
symbols=$4
src=$5
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imml-docs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
n=0
bad=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
notok() { n=$((n + 1)); echo "not ok $n - $1"; bad=1; }

# 1. a man page per exported function, which sources a page that exists
for fn in $(grep -v '^#' "$symbols" | awk 'NF {print $1}'); do
  page=$out/man3/$fn.3
  if [ ! -f "$page" ]; then
    notok "man3/$fn.3 exists"
    continue
  fi
  target=$(sed -n 's/^\.so //p' "$page")
  if [ -n "$target" ] && [ ! -f "$out/$target" ]; then
    notok "man3/$fn.3 sources $target, which exists"
  elif ! grep -q "$fn" "$out/${target:-man3/$fn.3}"; then
    notok "the page man3/$fn.3 shows documents $fn"
  else
    ok "man 3 $fn"
  fi
done
if [ -f "$out/html/imml_8h.html" ]; then
  ok "html/imml_8h.html"
else
  notok "html/imml_8h.html exists"
fi
stray=""
for page in "$out"/man3/*; do
  case ${page##*/} in imml_* | IMML_* | imml.h.3) ;; *) stray="$stray ${page##*/}" ;; esac
done
if [ -z "$stray" ]; then
  ok "man3 holds only public names"
else
  notok "man3 holds only public names, not:$stray"
fi
# every page that is not a link renders without a roff warning (lintian's
# groff-message check)
if command -v groff >/dev/null 2>&1; then
  for page in $(grep -L '^\.so ' "$out"/man3/*.3); do
    msgs=$(groff -t -man -Tutf8 -ww -z "$page" 2>&1 || true)
    if [ -z "$msgs" ]; then
      ok "man3/${page##*/} renders without roff warnings"
    else
      printf '%s\n' "$msgs" | sed 's/^/# /'
      notok "man3/${page##*/} renders without roff warnings"
    fi
  done
else
  echo "# groff not installed: the roff check of the man pages is skipped"
fi

# 2. the gate: an undocumented public name fails the build
sed '/^#endif \/\* IMML_H \*\/$/i\
IMML_API int imml_undocumented_probe(int x);' "$src/include/imml.h" >"$tmp/imml.h"
grep -q imml_undocumented_probe "$tmp/imml.h" || { notok "the probe header was written"; echo "1..$n"; exit 1; }
mkdir "$tmp/out"
status=0
{
  cat "$doxyfile"
  echo "INPUT = $tmp/imml.h"
  echo "STRIP_FROM_PATH = $tmp"
  echo "OUTPUT_DIRECTORY = $tmp/out"
  echo "GENERATE_HTML = NO"
} | "$doxygen" - >"$tmp/log" 2>&1 || status=$?
if [ $status -ne 0 ] && grep -q "imml_undocumented_probe" "$tmp/log"; then
  ok "an undocumented public function fails the docs build (exit $status)"
else
  sed 's/^/# /' "$tmp/log"
  notok "an undocumented public function fails the docs build (exit $status)"
fi
echo "1..$n"
exit $bad
