"""Side-by-side timings (pytest-benchmark): ``make bench``.

The issue's setting: digits MLP 64-32-10, 16 nodes, exponential graph, lr 0.1, batch 16, hops 3.
Each group times a fast path against its baseline in one run; the table's parenthesised
numbers are the ratios. Results are checked before anything is timed.
"""

from __future__ import annotations

import pytest
import torch

import dicekern as dk

HOPS, STEP = 3, 5


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def run(request):
    return dk.examples.digits_run(num_nodes=16, rounds=STEP + HOPS, batch_size=16, dtype=request.param)


@pytest.fixture(scope="module", params=[16, 200], ids=lambda m: f"test{m}")
def test_set(request, run):
    x, y = run.test
    return x[: request.param], y[: request.param]


def _name(request) -> str:
    return request.node.callspec.id


@pytest.mark.parametrize("engine", ["cascade", "walks"])
def test_one_source_batch(benchmark, request, run, test_set, engine) -> None:
    """cascade (one chain over the network) vs the paper's walk-by-walk reference."""
    benchmark.group = f"cascade-vs-walks {_name(request).split('-', 1)[1]}"
    traj = run.trajectory
    fast = lambda: dk.cascade(traj, STEP, 3, test_set, HOPS)
    slow = lambda: dk.reference.dice_e_walks(traj, STEP, 3, test_set, HOPS)
    expected = slow()
    rtol = 1e-9 if traj.dtype == torch.float64 else 1e-4
    assert (fast() - expected).abs().max() <= rtol * expected.abs().max()
    benchmark(fast if engine == "cascade" else slow)


@pytest.mark.parametrize("job", ["dice_e", "training_round"])
def test_all_samples_vs_training_round(benchmark, request, run, test_set, job) -> None:
    """dice_e for every sample of a round vs one vectorised gossip SGD round of the same nodes."""
    benchmark.group = f"dice_e-vs-round {_name(request).split('-', 1)[1]}"
    traj = run.trajectory
    rnd, objective = traj[STEP], traj.objective
    scores = dk.dice_e(traj, STEP, test_set, HOPS)
    whole = torch.stack([dk.cascade(traj, STEP, j, test_set, HOPS).sum() for j in range(16)])
    assert torch.allclose(scores.sum(1), whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    if job == "dice_e":
        benchmark(dk.dice_e, traj, STEP, test_set, HOPS)
    else:
        benchmark(objective.gossip_round, rnd.params, rnd.inputs, rnd.targets, rnd.lr, rnd.W)
