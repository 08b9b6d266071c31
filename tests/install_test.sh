#!/bin/sh
# Installs libimml into a temporary DESTDIR, then builds programs against the
# installed copy with nothing but `pkg-config --cflags --libs imml`, exactly
# as a user would: a tiny consumer that prints the version, and (when a C++
# compiler is present) the C++ host example, which is run on the shipped data;
# then the install script lib/ldconfig.sh (when it runs ldconfig).
# With the examples built, the installed imml-train and its --demo data
# (share/imml/mfeat) are checked too.
# usage: install_test.sh BUILD_DIR SOURCE_DIR PREFIX LIBDIR [SANITIZE [DATADIR]]
set -eu
build=$1
src=$2
prefix=$3
libdir=$4
datadir=${6:-share}
case $datadir in /*) ;; *) datadir=$prefix/$datadir ;; esac
# A sanitized library needs its consumers built with the same sanitizers.
san=""
case ${5:-none} in none | "") ;; *) san="-fsanitize=$5" ;; esac
case $libdir in /*) ;; *) libdir=$prefix/$libdir ;; esac

tmp=$(mktemp -d "${TMPDIR:-/tmp}/imml-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
dest=$tmp/dest

n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
fail() { n=$((n + 1)); echo "not ok $n - $1"; echo "1..$n"; exit 1; }

meson install -C "$build" --no-rebuild --destdir "$dest" --quiet >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; fail "meson install into DESTDIR"; }
ok "meson install into DESTDIR"

export PKG_CONFIG_SYSROOT_DIR="$dest"
export PKG_CONFIG_PATH="$dest$libdir/pkgconfig"
flags=$(pkg-config --cflags --libs imml) || fail "pkg-config finds imml.pc"
ok "pkg-config --cflags --libs imml: $flags"
[ "$(pkg-config --modversion imml)" = "$(sed -n 's/^#define IMML_VERSION_STRING "\(.*\)"/\1/p' "$src/include/imml.h")" ] ||
  fail "imml.pc version matches the header"
ok "imml.pc version matches the header"

cat >"$tmp/consumer.c" <<'C'
#include <imml.h>
#include <stdio.h>
int main(void) {
  if (imml_version_number() != IMML_VERSION_NUMBER) {
    fprintf(stderr, "header %d != library %u\n", IMML_VERSION_NUMBER,
            imml_version_number());
    return 1;
  }
  int dims[2] = {3, 2};
  imml_config cfg;
  imml_config_init(&cfg);
  cfg.dims = dims;
  cfg.n_classes = 2;
  imml_model *m = NULL;
  if (imml_model_create(&cfg, NULL, &m) != IMML_OK)
    return 1;
  printf("libimml %s, %d parameter tensors\n", imml_version_string(),
         imml_param_count(m));
  imml_model_free(m);
  return 0;
}
C
cc=${CC:-cc}
# shellcheck disable=SC2086
$cc -std=c11 -Wall -Wextra -Werror $san "$tmp/consumer.c" $flags -o "$tmp/consumer" ||
  fail "a C consumer compiles and links against the installed library"
ok "a C consumer compiles and links against the installed library"
out=$(LD_LIBRARY_PATH="$dest$libdir" "$tmp/consumer") || fail "the consumer runs"
echo "# $out"
case $out in "libimml "*) ok "the consumer runs and prints the version" ;;
*) fail "the consumer prints the version" ;; esac

cxx=${CXX:-c++}
if command -v "$cxx" >/dev/null 2>&1 && [ -f "$src/examples/cpp-host/main.cpp" ]; then
  # shellcheck disable=SC2086
  $cxx -std=c++17 -Wall -Wextra -Wpedantic -Werror -O2 $san "$src/examples/cpp-host/main.cpp" $flags \
    -o "$tmp/cpp-host" || fail "examples/cpp-host builds with pkg-config"
  ok "examples/cpp-host builds with pkg-config against the installed library"
  # its table goes to the TAP stream as comments
  LD_LIBRARY_PATH="$dest$libdir" "$tmp/cpp-host" "$src/examples/data/mfeat" \
    >"$tmp/cpp-host.log" 2>&1 || {
    sed 's/^/# /' "$tmp/cpp-host.log"
    fail "examples/cpp-host trains and checks its result"
  }
  sed 's/^/# /' "$tmp/cpp-host.log"
  ok "examples/cpp-host trains and checks its result"
else
  echo "# no C++ compiler or no examples/cpp-host: skipped"
fi

# The installed trainer and the data of its --demo (installed with its
# README: the data's licence and citation).
if [ -x "$dest$prefix/bin/imml-train" ]; then
  for f in README.md mfeat-fac.csv mfeat-fou.csv mfeat-kar.csv mfeat-mor.csv \
    mfeat-pix.csv mfeat-zer.csv; do
    cmp -s "$src/examples/data/mfeat/$f" "$dest$datadir/imml/mfeat/$f" ||
      fail "the demo data is installed: $datadir/imml/mfeat/$f"
  done
  ok "the demo data and its README are installed in $datadir/imml/mfeat"
  LD_LIBRARY_PATH="$dest$libdir" "$dest$prefix/bin/imml-train" --help \
    >"$tmp/help.txt" 2>&1 || fail "the installed imml-train --help"
  grep -q "$datadir/imml/mfeat)" "$tmp/help.txt" ||
    fail "imml-train --help names $datadir/imml/mfeat as the installed data"
  ok "imml-train --help names $datadir/imml/mfeat as the installed data"
  LD_LIBRARY_PATH="$dest$libdir" "$dest$prefix/bin/imml-train" --demo \
    --data-dir "$dest$datadir/imml/mfeat" --compare 1 --epochs 2 --quiet \
    >"$tmp/demo.txt" 2>&1 || {
    sed 's/^/# /' "$tmp/demo.txt"
    fail "the installed imml-train --demo runs on the installed data"
  }
  grep -q "^IMML conditional " "$tmp/demo.txt" ||
    fail "the installed imml-train --demo prints its table"
  ok "the installed imml-train --demo runs on the installed data"
else
  echo "# imml-train not built (-Dexamples=false): its install not checked"
fi

# lib/ldconfig.sh, the install script, with a stand-in ldconfig that
# records its calls: it runs ldconfig only for a system prefix without
# DESTDIR, and never fails an install.
mkdir "$tmp/bin" "$tmp/lib"
{
  echo '#!/bin/sh'
  echo "echo \"ldconfig \$*\" >>'$tmp/ldconfig.calls'"
  echo "[ \"\${1:-}\" != -p ] || printf '\\tlibimml.so.1 (libc6,x86-64) => %s\\n' '$tmp/lib/libimml.so.1'"
} >"$tmp/bin/ldconfig"
chmod +x "$tmp/bin/ldconfig"
ldc() { # PREFIX [DESTDIR]: runs the script, prints what it said
  rm -f "$tmp/ldconfig.calls"
  env PATH="$tmp/bin:$PATH" MESON_INSTALL_PREFIX="$1" DESTDIR="${2:-}" \
    sh "$src/lib/ldconfig.sh" "$tmp/lib" 2>&1 || echo "exit status $?"
}
out=$(ldc /opt/imml)
if [ -f "$tmp/ldconfig.calls" ]; then
  fail "--prefix=/opt/imml: ldconfig is not run"
fi
case $out in
*"exit status"*) fail "--prefix=/opt/imml: the script succeeds" ;;
*"LD_LIBRARY_PATH=$tmp/lib"*"PKG_CONFIG_PATH=$tmp/lib/pkgconfig"*) ;;
*) fail "--prefix=/opt/imml: says to set LD_LIBRARY_PATH and PKG_CONFIG_PATH" ;;
esac
ok "--prefix=/opt/imml: no ldconfig; says to set LD_LIBRARY_PATH and PKG_CONFIG_PATH"
out=$(ldc /usr/local "$tmp/dest")
if [ -f "$tmp/ldconfig.calls" ] || [ -n "$out" ]; then
  fail "DESTDIR set: no ldconfig, nothing said"
fi
ok "DESTDIR set: no ldconfig, nothing said"
out=$(ldc /usr/local)
if [ "$(id -u)" -eq 0 ]; then
  calls=$(cat "$tmp/ldconfig.calls" 2>/dev/null || true)
  [ "$calls" = "$(printf 'ldconfig \nldconfig -p')" ] ||
    fail "--prefix=/usr/local as root: runs ldconfig (calls: $calls)"
  case $out in
  *"in the loader's cache"*) ;;
  *) fail "--prefix=/usr/local as root: checks libimml.so.1 is in the cache" ;;
  esac
  ok "--prefix=/usr/local as root: runs ldconfig, finds libimml.so.1 in the cache"
else
  [ ! -f "$tmp/ldconfig.calls" ] || fail "--prefix=/usr/local, not root: no ldconfig"
  case $out in
  *"run 'ldconfig' as root"*) ;;
  *) fail "--prefix=/usr/local, not root: says to run ldconfig as root" ;;
  esac
  ok "--prefix=/usr/local, not root: says to run ldconfig as root"
fi
echo "1..$n"
