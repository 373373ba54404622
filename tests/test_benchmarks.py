"""Every documented benchmark command runs: a smoke run at tiny sizes (seconds), so a command that
docs/ gives cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent / "benchmarks"


def run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "machine: " in done.stdout, "every benchmark says which CPU its figures come from"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_clt_quick_measures_our_step_against_the_matmuls_and_the_dense_step():
    result = run("bench_clt.py", "--quick")
    assert result["step_seconds"] > 0 and result["dense_over_step"] > 0 and result["dead_per_layer"] > 0
