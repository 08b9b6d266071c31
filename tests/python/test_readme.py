"""README.md's "From PyTorch" program, extracted exactly as it stands and
run in a temporary directory with this build's package and library."""

import os
import re
import subprocess
import sys

from conftest import SOURCE_ROOT


def snippet():
    text = open(os.path.join(SOURCE_ROOT, "README.md")).read()
    section = re.search(r"^## From PyTorch\n(.*?)(?=^## )", text,
                        re.S | re.M)
    assert section, "README.md has a '## From PyTorch' section"
    code = re.search(r"^```python\n(.*?)^```$", section.group(1),
                     re.S | re.M)
    assert code, "the section has a ```python block"
    return code.group(1)


def test_readme_program_runs(tmp_path):
    path = tmp_path / "snippet.py"
    path.write_text(snippet())
    r = subprocess.run([sys.executable, str(path)], cwd=str(tmp_path),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=600)
    assert r.returncode == 0, r.stderr
    losses = [float(v) for v in re.findall(r"^step \d: loss (\S+)$",
                                           r.stdout, re.M)]
    assert len(losses) == 3, r.stdout
    assert losses[2] < losses[0]  # three AdamW steps on one batch
    assert (tmp_path / "model.imml").stat().st_size > 0


def test_readme_install_line():
    """The section says how to get the package and that the import works
    after the install."""
    text = open(os.path.join(SOURCE_ROOT, "README.md")).read()
    section = re.search(r"^## From PyTorch\n(.*?)(?=^## )", text,
                        re.S | re.M).group(1)
    assert "ninja -C build install" in section
    assert 'python3 -c "import imml"' in section
