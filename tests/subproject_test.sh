#!/bin/sh
# libimml as a meson subproject of a tiny host project, in the two forms the
# README shows: a wrap file whose [provide] makes dependency('imml') find it,
# and dependency('imml', fallback : ['imml', 'imml_dep']).  The source tree
# is linked into the host's subprojects/ as a downloaded wrap would be.  In
# both forms the host must register none of libimml's tests and install
# only its own program, libimml, imml.h and imml.pc (no imml-train,
# mpi-train, man pages); the wrap form is also built, and the host program
# run, against the subproject's library.
# usage: subproject_test.sh SOURCE_DIR [MESON]
set -eu
src=$(cd "$1" && pwd)
meson=${2:-meson}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imml-sub.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
fail() {
  n=$((n + 1))
  echo "not ok $n - $1"
  [ ! -f "$tmp/log" ] || sed 's/^/# /' "$tmp/log"
  echo "1..$n"
  exit 1
}

host=$tmp/host
mkdir -p "$host/subprojects"
ln -s "$src" "$host/subprojects/imml"
cat >"$host/subprojects/imml.wrap" <<'WRAP'
[wrap-git]
url = https://example.invalid/libimml.git
revision = v1.0.0
depth = 1

[provide]
dependency_names = imml
WRAP
cat >"$host/meson_options.txt" <<'OPT'
option('form', type : 'combo', choices : ['wrap', 'fallback'], value : 'wrap')
OPT
cat >"$host/meson.build" <<'MESON'
project('host', 'c', version : '0.1', default_options : ['c_std=c11'])
if get_option('form') == 'wrap'
  imml_dep = dependency('imml', version : '>= 1.0')
else
  imml_dep = dependency('imml', version : '>= 1.0',
                        fallback : ['imml', 'imml_dep'])
endif
exe = executable('host-prog', 'host.c', dependencies : imml_dep,
                 install : true)
test('host-prog', exe)
MESON
cat >"$host/host.c" <<'C'
#include <imml.h>
#include <stdio.h>
int main(void) {
  int dims[2] = {3, 2};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.dims = dims;
  cfg.n_classes = 2;
  imml_model *m = NULL;
  imml_status st = imml_model_create(&cfg, NULL, &m);
  if (st != IMML_OK)
    fprintf(stderr, "%s\n", imml_model_errmsg(m));
  imml_model_free(m);
  printf("host: libimml %s\n", imml_version_string());
  return st == IMML_OK && imml_version_number() == IMML_VERSION_NUMBER ? 0 : 1;
}
C

# What the host registers and installs (meson introspect), in one line each.
tests_of() {
  "$meson" introspect --tests "$1" |
    python3 -c 'import json, sys; print(" ".join(sorted(t["name"] for t in json.load(sys.stdin))))'
}
installed_of() {
  "$meson" introspect --installed "$1" |
    python3 -c 'import json, sys; print(" ".join(sorted(v.split("/")[-1] for v in json.load(sys.stdin).values())))'
}
want_installed="host-prog imml.h imml.pc libimml.so libimml.so.1 libimml.so.1.0.0"

for form in wrap fallback; do
  b=$tmp/build-$form
  # nodownload: the tree is already in subprojects/; force-fallback-for: an
  # installed libimml (a Debian package) must not be taken instead
  "$meson" setup "$b" "$host" -Dform=$form --wrap-mode=nodownload \
    --force-fallback-for=imml --buildtype=debug >"$tmp/log" 2>&1 ||
    fail "$form form: the host project configures with libimml as a subproject"
  grep -q "Subproject imml finished" "$tmp/log" ||
    fail "$form form: libimml was configured as a subproject"
  ok "$form form: the host project configures with libimml as a subproject"
  rm -f "$tmp/log"
  t=$(tests_of "$b")
  [ "$t" = "host-prog" ] || fail "$form form: only the host's own test is registered, not: $t"
  ok "$form form: no libimml test is registered in the host"
  i=$(installed_of "$b")
  [ "$i" = "$want_installed" ] || fail "$form form: installs $want_installed, not: $i"
  ok "$form form: the host installs its program, libimml, imml.h and imml.pc only"
done

"$meson" compile -C "$tmp/build-wrap" >"$tmp/log" 2>&1 || fail "the host builds libimml and links its program"
ok "the host builds libimml and links its program"
"$tmp/build-wrap/host-prog" >"$tmp/log" 2>&1 || fail "the host program runs against the subproject's libimml"
echo "# $(cat "$tmp/log")"
ok "the host program runs against the subproject's libimml"
echo "1..$n"
