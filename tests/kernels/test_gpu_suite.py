"""The GPU suite script itself, at its tiny --smoke sizes on CPU (Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TOL

SUITE = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow  # a subprocess running the whole suite at --smoke sizes (marked kernels by its folder)
def test_gpu_suite_smoke_run_checks_and_writes_json(tmp_path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert results["mixing"]["nnz"] == 8 * 4  # exponential graph on 8 nodes: 3 in-neighbours and self
    assert len(results["curvature"]) == 1 and len(results["chain"]) == 4
    assert all(row["rel_error"] <= TOL[torch.float32].chain for row in results["curvature"] + results["chain"])  # float32 kernels
    assert "best torch / one launch" in done.stdout
