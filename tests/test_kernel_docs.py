"""docs/kernels.md's worked example of a user kernel works as the page says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_module(tmp_path_factory):
    """docs/kernels.md's `my_kernels.py`, written out as a user would save it."""
    page = (ROOT / "docs" / "kernels.md").read_text()
    block = re.search(r"```python\n# my_kernels\.py\n(.*?)```", page, re.S)
    assert block, "docs/kernels.md lost its worked kernel example"
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "my_kernels.py").write_text(block.group(1))
    return folder


@pytest.mark.parametrize("how", [["my_kernels:q_sample"], ["my_q_sample", "--plugin", "my_kernels"]])
def test_the_documented_kernel_example_passes_the_conformance_check(example_module, how):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_module), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "kernels.check", "q_sample", *how], cwd=example_module,
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "conforms" in result.stdout and "FAIL" not in result.stdout
