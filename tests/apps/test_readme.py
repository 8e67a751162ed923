"""The README's API example runs as written and gives consistent results."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import dicekern as dk
from conftest import ROOT, TOL, assert_close

README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(index: int) -> dict:
    scope: dict = {}
    exec(compile(python_blocks()[index], str(README), "exec"), scope)
    return scope


def test_readme_has_its_four_examples() -> None:
    assert len(python_blocks()) == 4


def test_readme_example_runs() -> None:
    scope = run_block(0)
    assert scope["scores"].shape == (6, 8)
    assert_close(scope["per_hop"].sum(0), scope["scores"], TOL[torch.float64].same)
    assert scope["flow"].shape == scope["truth"].shape == (4, 6)
    # the estimate reaches exactly the nodes the replay reaches, with the same signs
    assert torch.equal(torch.sign(scope["flow"]), torch.sign(scope["truth"]))


def test_readme_optimizers_example_runs() -> None:
    """Per-node torch.optim AdamW: the recorder checked the spec, and DICE-E tracks the exact replay."""
    scope = run_block(1)
    traj, scores, truth = scope["traj"], scope["scores"], scope["truth"]
    assert traj.optimizer == dk.optim.AdamW(weight_decay=0.01)
    assert scores.shape == (3, 6, 8) and truth.shape == (3, 1, 8)
    for s in range(3):
        assert dk.analysis.pearson(scores[s, 0], truth[s, 0]) > 0.99


@pytest.mark.slow  # trains a digits run and runs the README's commands in subprocesses
def test_readme_final_models_section_runs() -> None:
    """The whole-run block: shapes as its comments say, order 1 the sum of final_influence, shares of order 2."""
    scope = run_block(2)
    assert scope["final"].shape == (5, 6, 4) and scope["order_1"].shape == scope["order_2"].shape == scope["truth"].shape == (6,)
    assert_close(scope["order_1"], scope["final"].sum((0, 2)), TOL[torch.float64].op)
    assert_close(scope["shares"].benefit, -scope["order_2"], 0.0)


def test_readme_your_own_run_section_runs(tmp_path, monkeypatch) -> None:
    """The python block saves a described run, and the sh block's commands score it; every score equals dk.dice_e."""
    monkeypatch.chdir(tmp_path)
    scope = run_block(3)
    loaded = dk.Trajectory.load("out/my_run")
    assert loaded.description.model == "dicekern.apps.examples:mlp" and loaded.description.metadata["data"] == "sklearn digits"
    torch.testing.assert_close(scope["scores"], dk.dice_e(scope["run"].trajectory, 2, scope["run"].test, 2), rtol=0, atol=0)
    commands = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert len(commands) == 1
    for line in commands[0].strip().splitlines():
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "dicekern"]
        done = subprocess.run([sys.executable, *argv[1:], "--no-progress"], capture_output=True, text=True, timeout=600, env=dict(os.environ))
        assert done.returncode == 0, done.stderr
    with open("out/my_scores/scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows}) == [2, 3, 4, 5]
    for step in (2, 5):
        expected = dk.dice_e(loaded, step, scope["run"].test, 2)
        written = torch.tensor([float(r["score"]) for r in rows if int(r["step"]) == step], dtype=torch.float64).reshape(expected.shape)
        assert_close(written, expected, TOL[torch.float64].same)
    assert all((tmp_path / "out" / folder / "results.json").is_file() for folder in ("my_scores", "my_cascade", "my_validate"))
