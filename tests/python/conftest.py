"""Shared helpers of the 'python' suite.  meson test sets IMML_LIBRARY (the
library just built), PYTHONPATH (python/ of the sources), IMML_TRAIN (the
imml-train just built) and the directories below; run by hand, set at least
IMML_LIBRARY and PYTHONPATH the same way."""

import os
import subprocess
import sys

import numpy as np
import pytest

SOURCE_ROOT = os.environ.get(
    "IMML_SOURCE_ROOT",
    os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..")))
DATA = os.path.join(SOURCE_ROOT, "examples", "data", "mfeat")
EXAMPLES = os.path.join(SOURCE_ROOT, "examples", "python")


def imml_train_path():
    path = os.environ.get("IMML_TRAIN")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("IMML_TRAIN must name the imml-train executable "
                    "(meson test sets it)")
    return path


def run_imml_train(args, **kw):
    """Runs imml-train; returns its stdout, failing the test with its stderr
    on a non-zero exit."""
    r = subprocess.run([imml_train_path()] + [str(a) for a in args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, **kw)
    if r.returncode != 0:
        pytest.fail("imml-train %s: exit %d\n%s" % (" ".join(map(str, args)),
                                                    r.returncode, r.stderr))
    return r.stdout, r.stderr


def test_accuracy_of(stdout):
    """The final test accuracy imml-train prints on stdout."""
    for line in stdout.splitlines():
        if line.startswith("test accuracy "):
            return float(line.split()[2])
    pytest.fail("no 'test accuracy' line in imml-train's output:\n" + stdout)


test_accuracy_of.__test__ = False  # a helper, not a test


def read_csv(path):
    a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64,
                   ndmin=2)
    return a[:, :-1], a[:, -1].astype(np.int64)


def write_stats(path, means, sds):
    """imml-train's FILE.stats (examples/imml-train/README.md)."""
    with open(path, "w") as f:
        f.write("imml-train-stats 1\nmodalities %d\n" % len(means))
        for m, (mu, sd) in enumerate(zip(means, sds)):
            f.write("modality %d %d\nmean" % (m, len(mu)))
            f.write("".join(" %.17g" % v for v in mu))
            f.write("\nstd")
            f.write("".join(" %.17g" % v for v in sd))
            f.write("\n")


def read_stats(path):
    """(means, sds) from imml-train's FILE.stats."""
    toks = open(path).read().split()
    assert toks[:3] == ["imml-train-stats", "1", "modalities"], toks[:3]
    M = int(toks[3])
    i = 4
    means, sds = [], []
    for m in range(M):
        assert toks[i:i + 2] == ["modality", str(m)]
        d = int(toks[i + 2])
        assert toks[i + 3] == "mean"
        means.append(np.array([float(t) for t in toks[i + 4:i + 4 + d]]))
        assert toks[i + 4 + d] == "std"
        sds.append(np.array([float(t) for t in toks[i + 5 + d:i + 5 + 2 * d]]))
        i += 5 + 2 * d
    return means, sds


def standardise(x, mean, sd):
    """imml-train's standardisation, (x - mean) / sd in double, then
    float32."""
    return ((x - mean) / sd).astype(np.float32)


def example_module():
    """examples/python/train_mfeat.py as a module."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import train_mfeat
    return train_mfeat


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
