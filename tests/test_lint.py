"""ruff (pyflakes, import order, pycodestyle, line length 110; configured in pyproject.toml) finds
nothing, and the code is as `ruff format` writes it."""

import shutil
import subprocess

import pytest

from tests.conftest import REPO

CODE = ["src", "stages", "tests", "scripts"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return subprocess.run([ruff, *args, *CODE], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = _ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted_by_ruff_format():
    result = _ruff("format", "--check")
    assert result.returncode == 0, "run `ruff format`:\n" + result.stdout + result.stderr
