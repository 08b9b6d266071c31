#!/bin/sh
# Runs Doxygen for the `docs` target (doc/meson.build) into a clean OUTDIR,
# then keeps in OUTDIR/man3 only the pages of public names (imml_*, IMML_*,
# imml.h): MAN_LINKS also writes a link page per struct field (data.3,
# flags.3, ...), which would clutter section 3; a field is documented on its
# struct's page.  Fixes one escaping slip of Doxygen's man pages.
# usage: doxygen.sh DOXYGEN DOXYFILE OUTDIR
set -eu
doxygen=$1
doxyfile=$2
out=$3
rm -rf "$out/html" "$out/man3"
"$doxygen" "$doxyfile"
# Doxygen 1.9 starts a text line with the quote it turned "..." into ('' or
# 'MAJOR...'), which roff reads as a control line: escape it with \&.
for page in "$out"/man3/*.3; do
  case ${page##*/} in
  imml_* | IMML_* | imml.h.3)
    if grep -q "^'" "$page"; then
      sed "s/^'/\\\\\&'/" "$page" >"$page.tmp" && mv "$page.tmp" "$page"
    fi
    ;;
  *) rm -f "$page" ;;
  esac
done
