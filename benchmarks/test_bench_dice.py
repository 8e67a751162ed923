"""Side-by-side timings (pytest-benchmark): ``make bench``.

The issue's setting: digits MLP 64-32-10, 16 nodes, exponential graph, lr 0.1, batch 16, hops 3
(and 4, to show how the walk count grows), test objectives of M = 16 and 200 digits.
Each group times a fast path against its baseline in one run; the table's parenthesised
numbers are the ratios. Results are checked before anything is timed.
"""

from __future__ import annotations

import pytest
import torch

import dicekern as dk
from dicekern.curvature.round import gossip_round

HOPS, STEP = 3, 5  # rounds STEP..STEP+HOPS+1 are recorded


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def run(request):
    return dk.examples.digits_run(num_nodes=16, rounds=STEP + HOPS + 1, batch_size=16, dtype=request.param)


@pytest.fixture(scope="module", params=[16, 200], ids=lambda m: f"test{m}")
def test_set(request, run):
    x, y = run.test
    return x[: request.param], y[: request.param]


def _setting(run, test_set) -> str:
    return f"{str(run.trajectory.dtype).removeprefix('torch.')} M={len(test_set[0])}"


@pytest.mark.parametrize("engine", ["closed_form", "torch", "walks"])
@pytest.mark.parametrize("hops", [HOPS, HOPS + 1], ids=lambda h: f"hops{h}")
def test_one_source_batch(benchmark, run, test_set, hops, engine) -> None:
    """cascade (one chain over the network) on both torch engines vs the paper's walk-by-walk reference."""
    benchmark.group = f"cascade-vs-walks {_setting(run, test_set)} hops={hops}"
    traj = run.trajectory
    walks = lambda: dk.walks.dice_e_walks(traj, STEP, 3, test_set, hops)
    fast = {backend: (lambda b=backend: dk.cascade(traj, STEP, 3, test_set, hops, backend=b)) for backend in ("closed_form", "torch")}
    expected = walks()
    rtol = 1e-9 if traj.dtype == torch.float64 else 1e-4
    for query in fast.values():
        assert (query() - expected).abs().max() <= rtol * expected.abs().max()
    benchmark(walks if engine == "walks" else fast[engine])


@pytest.mark.parametrize("job", ["closed_form", "torch", "training_round"])
def test_all_samples_vs_training_round(benchmark, run, test_set, job) -> None:
    """dice_e for every sample of a round, on both torch engines, vs one vectorised gossip SGD round of the same nodes."""
    benchmark.group = f"dice_e-vs-round {_setting(run, test_set)} hops={HOPS}"
    traj = run.trajectory
    rnd, objective = traj[STEP], traj.objective
    whole = torch.stack([dk.cascade(traj, STEP, j, test_set, HOPS, backend="torch").sum() for j in range(16)])
    for backend in ("closed_form", "torch"):
        scores = dk.dice_e(traj, STEP, test_set, HOPS, backend=backend)
        assert torch.allclose(scores.sum(1), whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    if job == "training_round":
        benchmark(gossip_round, objective, traj.optimizer, rnd.params, rnd.state, rnd.inputs, rnd.targets, rnd.lr, rnd.W)
    else:
        benchmark(dk.dice_e, traj, STEP, test_set, HOPS, backend=job)


_OPTIMIZER_RUNS: dict = {}


def _optimizer_run(run, optimizer: str):
    """The benchmark's run (same data, W and seed) trained by another optimizer at its preset lr."""
    key = (run.trajectory.dtype, optimizer)
    if key not in _OPTIMIZER_RUNS:
        _OPTIMIZER_RUNS[key] = dk.examples.digits_run(
            num_nodes=16, rounds=STEP + HOPS + 1, batch_size=16, dtype=run.trajectory.dtype, optimizer=optimizer
        )
    return _OPTIMIZER_RUNS[key]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_dice_e_by_optimizer(benchmark, run, test_set, optimizer) -> None:
    """dice_e for every sample of a round under momentum SGD and Adam, next to plain SGD."""
    benchmark.group = f"dice_e-by-optimizer {_setting(run, test_set)} hops={HOPS}"
    traj = _optimizer_run(run, optimizer).trajectory
    scores = dk.dice_e(traj, STEP, test_set, HOPS)
    whole = torch.stack([dk.cascade(traj, STEP, j, test_set, HOPS).sum() for j in range(16)])
    assert torch.allclose(scores.sum(1), whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    benchmark(dk.dice_e, traj, STEP, test_set, HOPS)


@pytest.mark.parametrize("check", ["off", "sampled", "every"])
def test_recording_with_replay_checks(benchmark, check) -> None:
    """A vectorised gossip SGD trainer recording 100 rounds of 16 nodes (the fastest trainer we know,
    so the worst case for the checks' share), with the recorder's replay checks off, sampled or on
    every round."""
    benchmark.group = "record-100-rounds replay_check"
    run = dk.examples.digits_run(num_nodes=16, rounds=1, batch_size=16)
    objective, spec, first = run.trajectory.objective, run.trajectory.optimizer, run.trajectory[0]
    batches = [(first.inputs.roll(t, 0), first.targets.roll(t, 0)) for t in range(100)]

    def train() -> None:
        rec = dk.Recorder(run.model, run.loss_fn, replay_check=check, window=4)
        theta = first.params
        for t, (x, y) in enumerate(batches):
            rec.record(t, objective.layout.unflatten(theta), x, y, lr=first.lr, W=first.W)
            theta = gossip_round(objective, spec, theta, {}, x, y, first.lr, first.W)[1]

    benchmark(train)
