"""Shared fixtures: small random gossip runs that are not powers of two, and one tolerance table."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen before
# triton is first imported (torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch import nn

import dicekern as dk

# relative tolerance of engine-vs-reference comparisons, by dtype
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise |a - e| <= rtol * max|e|: relative to the result's scale, so exact zeros compare too."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale.item())


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def random_mixing(n: int, generator: torch.Generator, density: float = 0.4) -> torch.Tensor:
    """Directed random graph with self-loops and random positive row-stochastic weights."""
    pattern = (torch.rand(n, n, generator=generator) < density) | torch.eye(n, dtype=torch.bool)
    weights = torch.rand(n, n, generator=generator, dtype=torch.float64) + 0.1
    W = torch.where(pattern, weights, torch.zeros_like(weights))
    return W / W.sum(dim=1, keepdim=True)


def recast(traj: dk.Trajectory, test: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
    """The same recorded values in another floating dtype: (trajectory, test)."""
    rec = dk.Recorder(traj.objective.model, traj.objective.loss_fn)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    for t in traj.steps:
        rnd = traj[t]
        params = {k: v.to(dtype) for k, v in traj.params(t).items()}
        if rnd.has_batch:
            rec.record(t, params, cast(rnd.inputs), cast(rnd.targets), lr=rnd.lr, W=rnd.W.to(dtype))
        else:
            rec.record(t, params)
    return rec.trajectory(), (cast(test[0]), cast(test[1]))


@dataclass
class RandomRun:
    trajectory: dk.Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    q: torch.Tensor


def random_run(
    n: int, rounds: int, *, seed: int, batch: int = 5, dtype: torch.dtype = torch.float64, model: nn.Module | None = None
) -> RandomRun:
    """A recorded run on random data with a small tanh MLP and a fresh directed W every round.

    Params follow plain SGD + gossip from random (different) per-node starting points.
    """
    g = torch.Generator().manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    rec = dk.Recorder(model, cross_entropy)
    obj = rec.objective
    theta = torch.randn(n, obj.layout.dim, generator=g, dtype=dtype)
    for t in range(rounds):
        x = torch.randn(n, batch, 3, generator=g, dtype=dtype)
        y = torch.randint(3, (n, batch), generator=g)
        W = random_mixing(n, g).to(dtype)
        lr = 0.2 + 0.3 * torch.rand(1, generator=g).item()
        rec.record(t, obj.layout.unflatten(theta), x, y, lr=lr, W=W)
        _, theta = obj.gossip_round(theta, x, y, lr, W)
    rec.record(rounds, obj.layout.unflatten(theta))
    test = (torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(3, (6,), generator=g))
    q = torch.rand(n, generator=g, dtype=dtype) + 0.2
    return RandomRun(rec.trajectory(), test, q / q.sum())


@pytest.fixture(scope="session")
def digits_run() -> dk.examples.DigitsRun:
    """The issue's setting: 16 nodes, exponential graph, tanh MLP, lr 0.1, float64."""
    return dk.examples.digits_run(num_nodes=16, rounds=6, batch_size=8, lr=0.1, graph="exponential")
