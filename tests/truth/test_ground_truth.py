"""DICE-GT by replay against exact algebra, and DICE-E against DICE-GT."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import dicekern as dk
from dicekern.truth import ground_truth
from conftest import TOL, assert_close, random_mixing, random_run, sgd_round


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(-1) - targets) ** 2


def least_squares_run(lr: float, *, n: int = 5, rounds: int = 4, batch: int = 6, seed: int = 0):
    """Linear regression trained by gossip; the same data and start for every lr."""
    g = torch.Generator().manual_seed(seed)
    rec = dk.Recorder(nn.Linear(4, 1), squared_error)
    obj = rec.objective
    theta = torch.randn(n, obj.layout.dim, generator=g, dtype=torch.float64)
    for t in range(rounds):
        x = torch.randn(n, batch, 4, generator=g, dtype=torch.float64)
        y = torch.randn(n, batch, generator=g, dtype=torch.float64)
        W = random_mixing(n, g, density=0.5)
        rec.record(t, obj.layout.unflatten(theta), x, y, lr=lr, W=W)
        theta = sgd_round(obj, theta, x, y, lr, W)
    rec.record(rounds, obj.layout.unflatten(theta))
    test = (torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64))
    return rec.trajectory(), test


def augmented(x: torch.Tensor) -> torch.Tensor:
    """[x, 1]: the flat layout of nn.Linear(4, 1) is [weight (4), bias (1)]."""
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


def test_least_squares_gap_is_exactly_the_second_order_term() -> None:
    """Linear least squares propagates a removal exactly linearly, so gt - e = -q_k/2 delta^T H_test delta."""
    traj, test = least_squares_run(lr=0.05)
    step, hops, source, samples = 0, 3, 2, [1, 4]
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    rnd = traj[step]
    x = augmented(rnd.inputs[source, samples])
    residual = x @ rnd.params[source] - rnd.targets[source, samples]
    displacement = -(rnd.lr[source] / 6) * (2 * residual[:, None] * x).sum(0)
    x_test = augmented(test[0])
    h_test = 2 * x_test.T @ x_test / len(x_test)
    expected_gap = [torch.zeros(5, dtype=torch.float64)]
    expected_gap[0][source] = -0.5 * q[source] * displacement @ h_test @ displacement
    delta = rnd.W[:, source, None] * displacement
    for s in range(1, hops + 1):
        if s >= 2:
            r = traj[step + s - 1]
            xs = augmented(r.inputs)
            hessians = 2 * xs.transpose(1, 2) @ xs / xs.shape[1]  # (N, 5, 5)
            delta = r.W @ (delta - r.lr[:, None] * torch.einsum("nij,nj->ni", hessians, delta))
        expected_gap.append(-0.5 * q * torch.einsum("ni,ij,nj->n", delta, h_test, delta))
    truth = dk.dice_gt(traj, step, source, test, hops, samples=samples, q=q)
    gap = truth - dk.cascade(traj, step, source, test, hops, samples=samples, q=q)
    # the gap is a difference of two near-equal estimates: its error is chain-sized on their scale
    assert (gap - torch.stack(expected_gap)).abs().max() <= TOL[torch.float64].chain * truth.abs().max()


def test_least_squares_relative_error_shrinks_linearly_with_lr() -> None:
    def relative_error(lr: float) -> float:
        traj, test = least_squares_run(lr)
        e = dk.dice_e(traj, 0, test, 3)
        gt = dk.dice_gt_samples(traj, 0, test, 3)
        return ((e - gt).norm() / gt.norm()).item()

    errors = [relative_error(lr) for lr in (0.04, 0.004, 0.0004)]
    assert errors[0] < 0.1
    for coarse, fine in zip(errors, errors[1:]):
        assert 8 < coarse / fine < 12.5, errors


@pytest.mark.slow  # digits fidelity: per-sample replays of the 16-node digits run
@pytest.mark.parametrize("hops", [0, 1, 2, 3], ids=lambda h: f"hops{h}")
def test_dice_e_tracks_dice_gt_on_digits(digits_run, hops: int) -> None:
    """16 nodes, exponential graph, MLP, lr 0.1, per-sample removal: Pearson >= 0.999."""
    traj = digits_run.trajectory
    e = dk.dice_e(traj, 2, digits_run.test, hops)
    gt = dk.dice_gt_samples(traj, 2, digits_run.test, hops)
    assert e.shape == gt.shape == (16, 8)
    pearson = np.corrcoef(e.flatten().numpy(), gt.flatten().numpy())[0, 1]
    assert pearson >= 0.999


def test_dice_gt_samples_matches_dice_gt() -> None:
    run = random_run(5, rounds=3, seed=21)
    per_sample = dk.dice_gt_samples(run.trajectory, 0, run.test, 2, nodes=[3, 1], q=run.q, per_hop=True, chunk_size=3)
    for column, node in enumerate([3, 1]):
        for b in range(5):
            gt = dk.dice_gt(run.trajectory, 0, node, run.test, 2, samples=[b], q=run.q)
            assert_close(per_sample[:, column, b], gt.sum(-1), TOL[torch.float64].chain)


def test_unreachable_nodes_get_exactly_zero() -> None:
    """On a directed path 0 -> 1 -> ... z reaches node s only after s mixes."""
    n = 6
    W = dk.topology.from_graph(nx.path_graph(n, create_using=nx.DiGraph), "uniform")
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    rec = dk.Recorder(model, lambda o, y: nn.functional.cross_entropy(o, y, reduction="none"))
    obj = rec.objective
    theta = torch.randn(n, obj.layout.dim, generator=g, dtype=torch.float64)
    for t in range(3):
        x, y = torch.randn(n, 4, 3, generator=g, dtype=torch.float64), torch.randint(3, (n, 4), generator=g)
        rec.record(t, obj.layout.unflatten(theta), x, y, lr=0.3, W=W)
        theta = sgd_round(obj, theta, x, y, 0.3, W)
    rec.record(3, obj.layout.unflatten(theta))
    test = (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(3, (5,), generator=g))
    reach = torch.tensor([[k <= s for k in range(n)] for s in range(4)])
    traj = rec.trajectory()
    for scores in (dk.cascade(traj, 0, 0, test, 3), dk.dice_gt(traj, 0, 0, test, 3)):
        assert (scores[~reach] == 0).all()
        assert (scores[reach] != 0).all()
    # the replay itself, before dice_gt zeroes what cannot be reached: the models of unreached nodes
    # are bitwise those of the factual run, and every reached node's differs
    keep = torch.ones(2, n, 4, dtype=torch.float64)
    keep[1, 0, 1] = 0
    losses = ground_truth._replay_test_losses(traj, traj.window(0, 3), test, keep)  # (2, hops+1, N)
    assert torch.equal(losses[0][~reach], losses[1][~reach])
    assert (losses[0][reach] != losses[1][reach]).all()
