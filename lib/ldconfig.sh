#!/bin/sh
# meson install script (meson.build): after `meson install` into the system
# prefix (/usr or /usr/local), refresh the dynamic loader's cache so that
# programs find libimml.so.1 at once, as a Debian package's ldconfig trigger
# would.  meson skips it when DESTDIR is set (packaging, staging); for any
# other prefix it only says what to set, and it never fails an install.
# usage: ldconfig.sh LIBDIR [MESON_VERSION]   (LIBDIR absolute: prefix / libdir)
set -u
libdir=$1
prefix=${MESON_INSTALL_PREFIX:-}
# meson 0.57 to 1.0 (Debian 12 has 1.0.1) swallow an install script's
# output unless it fails: there the messages go to the terminal, if any.
exec 3>&1
case ${2:-} in
0.* | 1.0.*) if (: >/dev/tty) 2>/dev/null; then exec 3>/dev/tty; fi ;;
esac
say() { [ -n "${MESON_INSTALL_QUIET:-}" ] || echo "libimml: $*" >&3; }

[ -z "${DESTDIR:-}" ] || exit 0
case $prefix in
/usr | /usr/ | /usr/local | /usr/local/) ;;
*)
  say "installed into $libdir, outside the system prefix: programs need"
  say "  LD_LIBRARY_PATH=$libdir (or an rpath), and pkg-config needs"
  say "  PKG_CONFIG_PATH=$libdir/pkgconfig"
  exit 0
  ;;
esac
[ "$(uname -s)" = Linux ] || exit 0
ldconfig=$(command -v ldconfig || true)
[ -n "$ldconfig" ] || [ ! -x /sbin/ldconfig ] || ldconfig=/sbin/ldconfig
if [ -z "$ldconfig" ]; then
  say "no ldconfig found: run it yourself if programs do not find libimml.so.1"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "not root: run 'ldconfig' as root so that programs find libimml.so.1"
  exit 0
fi
if ! "$ldconfig"; then
  say "ldconfig failed: run it yourself so that programs find libimml.so.1"
  exit 0
fi
# The loader now knows the library unless LIBDIR is not in its search path
# (/etc/ld.so.conf), which a distribution may leave out for /usr/local.
want=$(readlink -f "$libdir/libimml.so.1" 2>/dev/null || echo "$libdir/libimml.so.1")
found=no
for f in $("$ldconfig" -p | sed -n 's/^[[:space:]]*libimml\.so\.1 .*=> //p'); do
  [ "$(readlink -f "$f" 2>/dev/null || echo "$f")" != "$want" ] || found=yes
done
if [ $found = yes ]; then
  say "ran ldconfig: $libdir/libimml.so.1 is in the loader's cache"
else
  say "ran ldconfig, but $libdir is not in the loader's search path"
  say "  (/etc/ld.so.conf): add it there, or set LD_LIBRARY_PATH=$libdir"
fi
exit 0
