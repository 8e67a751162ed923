"""Dependencies by need: the engine imports none of the optional packages, and a feature whose
package is missing says which extra installs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import dicekern as dk
from dicekern.core.extras import MissingExtra

OPTIONAL = ("networkx", "sklearn", "scipy", "matplotlib", "triton")


def test_importing_dicekern_and_scoring_a_run_import_no_optional_package() -> None:
    code = (
        "import sys, torch, dicekern as dk\n"
        "from torch import nn\n"
        "rec = dk.Recorder(nn.Linear(3, 2), dk.losses.softmax_cross_entropy, replay_check='off')\n"
        "W = torch.full((2, 2), 0.5, dtype=torch.float64)\n"
        "params = {'weight': torch.zeros(2, 2, 3, dtype=torch.float64), 'bias': torch.zeros(2, 2, dtype=torch.float64)}\n"
        "rec.record(0, params, torch.randn(2, 4, 3, dtype=torch.float64), torch.randint(2, (2, 4)), lr=0.1, W=W)\n"
        "rec.record(1, params)\n"
        "dk.dice_e(rec.trajectory(), 0, (torch.randn(5, 3, dtype=torch.float64), torch.randint(2, (5,))), 1)\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_missing_package_names_the_extra_that_installs_it(monkeypatch) -> None:
    run = dk.examples.digits_run(num_nodes=3, rounds=2, batch_size=4)
    monkeypatch.setitem(sys.modules, "networkx", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"dk.topology needs networkx: pip install 'dicekern\[apps\]'"):
        dk.topology.ring(4)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(MissingExtra, match=r"a progress bar needs tqdm: pip install 'dicekern\[apps\]'"):
        dk.dice_gt_samples(run.trajectory, 0, run.test, 1, progress=True)
    assert dk.dice_gt_samples(run.trajectory, 0, run.test, 1).shape == (3, 4)  # no bar, no tqdm
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "triton" else real(name, *args))
    with pytest.raises(MissingExtra, match=r"backend 'triton' needs triton: pip install 'dicekern\[triton\]'"):
        dk.dice_e(run.trajectory, 0, run.test, 1, backend="triton")


def test_the_command_line_reports_a_missing_package_without_a_traceback(tmp_path, monkeypatch, capsys) -> None:
    from dicekern.apps import cli

    monkeypatch.setitem(sys.modules, "sklearn", None)  # the bundled digits need scikit-learn
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    status = cli.main(["cascade", "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert "dicekern cascade: error: the bundled digits needs sklearn: pip install 'dicekern[apps]'" in err
    assert "Traceback" not in err
