"""`meson install` puts the package into Python's site-packages and the
installed package finds the library installed with it: installed into a
temporary DESTDIR, `import imml` runs from there with nothing pointing at
the build tree (no IMML_LIBRARY, no PYTHONPATH but the DESTDIR's
site-packages)."""

import os
import subprocess
import sys

import pytest

BUILD = os.environ.get("IMML_BUILD_ROOT")
PREFIX = os.environ.get("IMML_PREFIX")
PYDIR = os.environ.get("IMML_PYTHON_DIR")
LIBDIR = os.environ.get("IMML_LIBDIR")


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    if not (BUILD and PREFIX and PYDIR and LIBDIR):
        pytest.fail("IMML_BUILD_ROOT, IMML_PREFIX, IMML_PYTHON_DIR and "
                    "IMML_LIBDIR must be set (meson test sets them)")
    d = str(tmp_path_factory.mktemp("dest"))
    r = subprocess.run(["meson", "install", "-C", BUILD, "--no-rebuild",
                        "--destdir", d, "--quiet"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    assert r.returncode == 0, r.stdout
    return d


def site(dest):
    pydir = PYDIR if os.path.isabs(PYDIR) else os.path.join(PREFIX, PYDIR)
    return dest + pydir


def run_installed(dest, code):
    env = {k: v for k, v in os.environ.items()
           if k not in ("IMML_LIBRARY", "PYTHONPATH", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = site(dest)
    return subprocess.run([sys.executable, "-c", code], env=env,
                          cwd=dest, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)


def test_package_files_installed(dest):
    pkg = os.path.join(site(dest), "imml")
    for f in ("__init__.py", "_lib.py", "_model.py", "torch.py",
              "_config.py"):
        assert os.path.isfile(os.path.join(pkg, f)), f
    config = open(os.path.join(pkg, "_config.py")).read()
    assert repr(LIBDIR if os.path.isabs(LIBDIR) else
                os.path.join(PREFIX, LIBDIR))[1:-1] in config


def test_import_finds_the_installed_library(dest):
    r = run_installed(dest, "import imml, imml.torch; "
                            "print(imml.library_path()); "
                            "print(imml.version()); "
                            "m = imml.Model(dims=[3, 2], n_classes=2); "
                            "print(len(m.params()))")
    assert r.returncode == 0, r.stderr
    path, version, n = r.stdout.split()
    libdir = LIBDIR if os.path.isabs(LIBDIR) else os.path.join(PREFIX, LIBDIR)
    assert os.path.realpath(path) == os.path.realpath(
        os.path.join(dest + libdir, "libimml.so.1"))
    assert version.startswith("1.") and int(n) == 16


def test_install_dir_is_a_site_directory():
    """Without DESTDIR the package lands in one of this python3's site
    directories (which site.py puts on sys.path as soon as it exists), so
    `python3 -c "import imml"` works after `ninja -C build install`."""
    import site
    sites = [p.rstrip("/") for p in site.getsitepackages()]
    if not any(p.startswith(PREFIX.rstrip("/") + "/lib/") for p in sites):
        pytest.skip("python3 has no site-packages under the prefix %s: the "
                    "package needs PYTHONPATH there" % PREFIX)
    assert PYDIR.rstrip("/") in sites, (PYDIR, sites)


def test_a_wrong_imml_library_is_an_error(dest):
    r = run_installed(dest, "import os; os.environ['IMML_LIBRARY'] = "
                            "'/nonexistent/libimml.so.1'; import imml")
    assert r.returncode != 0
    assert "cannot load libimml" in r.stderr
    assert "/nonexistent/libimml.so.1" in r.stderr
