"""Every bad input raises a ValueError or TypeError that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import cross_entropy, random_run


@pytest.fixture
def run():
    return random_run(4, rounds=3, seed=1)


@pytest.fixture
def recorder():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return dk.Recorder(model, cross_entropy)


def params_for(recorder: dk.Recorder, n: int = 4) -> dict[str, torch.Tensor]:
    return recorder.objective.layout.unflatten(torch.randn(n, recorder.objective.layout.dim, dtype=torch.float64))


def batch(n: int = 4, b: int = 5):
    return torch.randn(n, b, 3, dtype=torch.float64), torch.randint(3, (n, b))


W_CASES = [
    pytest.param(torch.full((4, 3), 1 / 3), "square", id="not-square"),
    pytest.param(torch.full((5, 5), 0.2), "N=4", id="wrong-N"),
    pytest.param(torch.tensor([[1.5, -0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "negative", id="negative"),
    pytest.param(torch.full((4, 4), 0.3), "row-stochastic", id="rows-not-1"),
    pytest.param(torch.full((4, 4), float("nan")), "NaN", id="nan"),
]


@pytest.mark.parametrize("W, message", W_CASES)
def test_record_rejects_bad_mixing(recorder, W, message) -> None:
    with pytest.raises(ValueError, match=message):
        recorder.record(0, params_for(recorder), *batch(), lr=0.1, W=W)


def test_record_rejects_bad_params(recorder) -> None:
    good = params_for(recorder)
    with pytest.raises(ValueError, match="unknown: \\['extra'\\]"):
        recorder.record(0, {**good, "extra": torch.zeros(4, 1)})
    with pytest.raises(ValueError, match="missing: \\['2.bias'\\]"):
        recorder.record(0, {k: v for k, v in good.items() if k != "2.bias"})
    with pytest.raises(ValueError, match="node count"):
        recorder.record(0, {**good, "2.bias": torch.zeros(5, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="expected \\(N, \\*\\(3,\\)\\)"):
        recorder.record(0, {**good, "2.bias": torch.zeros(4, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="NaN"):
        recorder.record(0, {**good, "2.bias": torch.full((4, 3), float("inf"), dtype=torch.float64)})
    with pytest.raises(TypeError, match="mapping"):
        recorder.record(0, [torch.zeros(4)])
    recorder.record(0, good)
    with pytest.raises(ValueError, match="N=3 nodes, earlier rounds hold N=4"):
        recorder.record(1, params_for(recorder, n=3))
    with pytest.raises(ValueError, match="already recorded"):
        recorder.record(0, good)


def test_record_rejects_bad_batches(recorder) -> None:
    p, W = params_for(recorder), dk.topology.ring(4)
    x, y = batch()
    with pytest.raises(ValueError, match="NaN"):
        recorder.record(0, p, x.masked_fill(x > 1, float("nan")), y, lr=0.1, W=W)
    with pytest.raises(ValueError, match="N=4"):
        recorder.record(0, p, *batch(n=3), lr=0.1, W=W)
    with pytest.raises(ValueError, match="missing \\['lr', 'W'\\]"):
        recorder.record(0, p, x, y)
    with pytest.raises(ValueError, match="lr must be non-negative and finite"):
        recorder.record(0, p, x, y, lr=-1.0, W=W)
    with pytest.raises(ValueError, match="loss_fn must return per-sample losses"):
        bad = dk.Recorder(recorder.objective.model, lambda o, t: cross_entropy(o, t).mean())
        bad.record(0, p, x, y, lr=0.1, W=W)
    with pytest.raises(TypeError, match="step must be an int"):
        recorder.record(0.5, p)


def test_queries_reject_bad_arguments(run) -> None:
    traj, test = run.trajectory, run.test
    with pytest.raises(ValueError, match="hops must be >= 0"):
        dk.dice_e(traj, 0, test, -1)
    with pytest.raises(ValueError, match="round 4 is missing.*rounds 1..4"):
        dk.dice_e(traj, 1, test, 3)
    with pytest.raises(ValueError, match="round 3 was recorded with params only"):
        dk.cascade(traj, 3, 0, test, 0)
    with pytest.raises(ValueError, match="samples out of range"):
        dk.cascade(traj, 0, 0, test, 1, samples=[0, 5])
    with pytest.raises(ValueError, match="repeated"):
        dk.dice_gt(traj, 0, 0, test, 1, samples=[1, 1])
    with pytest.raises(ValueError, match="source must be a node index in \\[0, 4\\)"):
        dk.dice_gt(traj, 0, 4, test, 1)
    with pytest.raises(ValueError, match="test inputs contains"):
        dk.dice_e(traj, 0, (torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long)), 1)
    with pytest.raises(TypeError, match="test must be a pair"):
        dk.dice_e(traj, 0, test[0], 1)
    with pytest.raises(ValueError, match="q must have shape"):
        dk.dice_e(traj, 0, test, 1, q=torch.ones(3))
    with pytest.raises(ValueError, match="curvature must be one of"):
        dk.dice_e(traj, 0, test, 1, curvature="fisher")
    with pytest.raises(ValueError, match="curvature_at must be one of"):
        dk.cascade(traj, 0, 0, test, 1, curvature_at="both")
    with pytest.raises(ValueError, match="direct must be one of"):
        dk.reference.dice_e_walks(traj, 0, 0, test, 1, direct="theta_t")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.dice_e(traj, 0, test, 1, backend="cuda")
    with pytest.raises(ValueError, match="round 9 is not in the trajectory"):
        traj[9]
