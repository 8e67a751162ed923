"""Every bad input raises a ValueError or TypeError that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk
import dicekern.distributed as dkd
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
        dk.dice_e(traj, 0, test, 1, q=torch.ones(3, dtype=torch.float64) / 3)
    with pytest.raises(ValueError, match="curvature must be one of"):
        dk.dice_e(traj, 0, test, 1, curvature="fisher")
    with pytest.raises(ValueError, match="curvature_at must be one of"):
        dk.cascade(traj, 0, 0, test, 1, curvature_at="both")
    with pytest.raises(ValueError, match="direct must be one of"):
        dk.walks.dice_e_walks(traj, 0, 0, test, 1, direct="theta_t")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.dice_e(traj, 0, test, 1, backend="cuda")
    with pytest.raises(ValueError, match="round 9 is not in the trajectory"):
        traj[9]


@pytest.mark.parametrize("q, error, match", [
    (torch.full((4,), 0.5, dtype=torch.float64), ValueError, "q must sum to 1 .* got 2"),
    (torch.zeros(4, dtype=torch.float64), ValueError, "q must sum to 1 .* got 0"),
    (torch.tensor([1, 0, 0, 0]), TypeError, "q must hold floating-point weights"),
    (torch.tensor([True, False, False, False]), TypeError, "q must hold floating-point weights"),
    (torch.tensor([1.5, -0.5, 0.0, 0.0], dtype=torch.float64), ValueError, "q must be non-negative"),
], ids=["sums-to-2", "zeros", "int", "bool", "negative"])
def test_q_is_a_distribution_over_nodes(run, q, error, match) -> None:
    with pytest.raises(error, match=match):
        dk.dice_e(run.trajectory, 0, run.test, 1, q=q)
    with pytest.raises(error, match=match):
        dk.OnlineDICE(run.trajectory.objective.model, cross_entropy, run.test, 1, q=q)


def test_every_batch_and_test_set_is_checked_against_the_first(recorder) -> None:
    """Later rounds and test sets that the model or loss could not take are refused by name, at record()."""
    p, W = params_for(recorder), dk.topology.ring(4)
    recorder.record(0, p, *batch(), lr=0.1, W=W)
    x, y = batch()
    with pytest.raises(ValueError, match="round 1 inputs hold samples of shape \\(4,\\) .* first batch has \\(3,\\)"):
        recorder.record(1, p, torch.randn(4, 5, 4, dtype=torch.float64), y, lr=0.1, W=W)
    with pytest.raises(ValueError, match="round 1 inputs .* dtype torch.int64; the run's first batch has .* torch.float64"):
        recorder.record(1, p, x.long(), y, lr=0.1, W=W)
    with pytest.raises(ValueError, match="round 1 targets .* dtype torch.float64"):
        recorder.record(1, p, x, y.double(), lr=0.1, W=W)
    head = dk.Recorder(nn.Linear(3, 3), dk.losses.softmax_cross_entropy, replay_check="off")
    weights = {"weight": torch.zeros(4, 3, 3, dtype=torch.float64), "bias": torch.zeros(4, 3, dtype=torch.float64)}
    head.record(0, weights, x, y, lr=0.1, W=W)
    with pytest.raises(ValueError, match="round 1 targets must be class indices in \\[0, 3\\) .* 0..7"):
        head.record(1, weights, x, y.clamp(0, 2).index_fill(1, torch.tensor([2]), 7), lr=0.1, W=W)
    head.record(1, weights)
    traj = head.trajectory()
    with pytest.raises(ValueError, match="test inputs hold samples of shape \\(5,\\)"):
        dk.dice_e(traj, 0, (torch.randn(6, 5, dtype=torch.float64), torch.zeros(6, dtype=torch.long)), 1)
    with pytest.raises(ValueError, match="test targets must be class indices in \\[0, 3\\)"):
        dk.dice_e(traj, 0, (torch.randn(6, 3, dtype=torch.float64), torch.full((6,), 3)), 1)
    with pytest.raises(ValueError, match="the model cannot take inputs of shape \\(7,\\)"):
        dk.Recorder(nn.Linear(3, 3), cross_entropy).record(0, weights, torch.randn(4, 5, 7, dtype=torch.float64), y, lr=0.1, W=W)


def test_the_smaller_cases(run, tmp_path) -> None:
    traj, test = run.trajectory, run.test
    by_list = dk.cascade(traj, 0, 1, test, 1, samples=[1, 3])
    assert torch.equal(dk.cascade(traj, 0, 1, test, 1, samples=torch.tensor([1, 3], dtype=torch.uint8)), by_list)
    with pytest.raises(ValueError, match="anomalous node must be a node index in \\[0, 4\\), got 7"):
        dk.analysis.detection_auc(torch.randn(4), [7])
    with pytest.raises(ValueError, match="anomalous node must be a node index in \\[0, 4\\), got -1"):
        dk.analysis.detection_auc(torch.randn(4), [-1])
    with pytest.raises(TypeError, match="dtype must be a floating-point torch dtype"):
        dk.topology.ring(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="not row-stochastic: row .* sums to 0.999.*float16 cannot hold these weights"):
        dk.Recorder(traj.objective.model, cross_entropy).record(0, traj.params(0), traj[0].inputs, traj[0].targets, lr=0.1,
                                                                  W=dk.topology.ring(4, dtype=torch.float64).half())
    with pytest.raises(TypeError, match="per_hop must be a bool, got 'no'"):
        dk.dice_e(traj, 0, test, 1, per_hop="no")
    with pytest.raises(ValueError, match="nodes must name at least one node, each once"):
        dk.dice_gt_samples(traj, 0, test, 1, nodes=[1, 1])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            dk.dice_gt_samples(traj, 0, test, 1, chunk_size=bad)
    with pytest.raises(ValueError, match="rank must be in \\[0, 4\\), got 4"):
        dkd.node_block(8, 4, 4)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        dkd.node_block(8, -1, 4)
    with pytest.raises(ValueError, match="rtol must be a positive number"):
        traj.verify(rtol=-1)
    with pytest.raises(ValueError, match="round 4 is missing .* needs rounds 1..10000001"):
        dk.dice_e(traj, 1, test, 10**7)
    huge = dk.Recorder(traj.objective.model, cross_entropy, replay_check="off")
    for t in range(3):
        r = traj[t]
        huge.record(t, traj.params(t), r.inputs, r.targets, lr=1e308, W=r.W)
    huge.record(3, traj.params(3))
    with pytest.raises(ValueError, match="DICE-E is not finite .* overflow"):
        dk.dice_e(huge.trajectory(), 0, test, 2)
