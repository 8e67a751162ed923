"""Proximal influence and reciprocity against their definitions written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

import dicekern as dk
from conftest import RTOL, assert_close, random_run


def test_proximal_influence_is_definition_4() -> None:
    run = random_run(5, rounds=2, seed=23)
    traj, q = run.trajectory, run.q
    obj, r0, r1 = traj.objective, traj[0], traj[1]

    def grad(theta, x, y):
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(obj.mean_loss(th, x, y), th)[0]

    expected = torch.zeros(5, 5, dtype=torch.float64)
    for j in range(5):
        local = grad(r0.params[j], r0.inputs[j], r0.targets[j])
        for k in range(5):
            if r0.W[k, j] != 0:
                expected[j, k] = -r0.lr * r0.W[k, j] * q[k] * local @ grad(r1.params[k], *run.test)
    assert_close(dk.analysis.proximal_influence(traj, 0, run.test, q=q), expected, RTOL[torch.float64])


def test_reciprocity_by_hand() -> None:
    influence = torch.tensor([[5.0, 2.0, 0.0], [-1.0, 7.0, 3.0], [4.0, 6.0, 9.0]], dtype=torch.float64)
    r = dk.analysis.reciprocity(influence)
    assert r.edge[0, 1] == -2.0 and r.edge[1, 0] == -0.5 and r.edge[1, 2] == 0.5
    assert math.isnan(r.edge[0, 2]) and math.isnan(r.edge[0, 0])
    torch.testing.assert_close(r.given, torch.tensor([2.0, 2.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(r.received, torch.tensor([3.0, 8.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(r.node, torch.tensor([2 / 3, 0.25, 10 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        dk.analysis.reciprocity(torch.zeros(2, 3))
