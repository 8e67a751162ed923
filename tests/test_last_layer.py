"""Last-layer mode: the chain restricted to the final nn.Linear on each node's own features."""

from __future__ import annotations

import pytest
import torch

import dicekern as dk
from conftest import RTOL, assert_close, random_run


def test_last_layer_equals_the_head_block_of_the_full_model() -> None:
    """hops=2 by hand with autograd on the full model, every vector restricted to the head's parameters."""
    run = random_run(4, rounds=2, seed=13)
    traj, q = run.trajectory, run.q
    obj = traj.objective
    head = slice(obj.layout.dim - (4 * 3 + 3), obj.layout.dim)  # 2.weight (3, 4) and 2.bias (3,)

    def head_grad(theta, x, y):
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(obj.mean_loss(th, x, y), th)[0][head]

    def head_hvp(theta, x, y, v):
        th = theta.clone().requires_grad_(True)
        g = torch.autograd.grad(obj.mean_loss(th, x, y), th, create_graph=True)[0]
        full = torch.zeros_like(theta)
        full[head] = v
        return torch.autograd.grad(g @ full, th)[0][head]

    r0, r1, r2 = traj[0], traj[1], traj[2]
    n, b = r0.inputs.shape[:2]
    expected = torch.empty(n, b, dtype=torch.float64)
    for j in range(n):
        half = r0.params[j].clone()
        half[head] -= r0.lr[j] * head_grad(r0.params[j], r0.inputs[j], r0.targets[j])
        direct = q[j] * head_grad(half, *run.test)
        for i in range(b):
            delta0 = -(r0.lr[j] / b) * head_grad(r0.params[j], r0.inputs[j, i : i + 1], r0.targets[j, i : i + 1])
            delta1 = [r0.W[k, j] * delta0 for k in range(n)]
            damped = [d - r1.lr[k] * head_hvp(r1.params[k], r1.inputs[k], r1.targets[k], d) for k, d in enumerate(delta1)]
            delta2 = [sum(r1.W[k, m] * damped[m] for m in range(n)) for k in range(n)]
            score = direct @ delta0
            score += sum(q[k] * head_grad(r1.params[k], *run.test) @ delta1[k] for k in range(n))
            score += sum(q[k] * head_grad(r2.params[k], *run.test) @ delta2[k] for k in range(n))
            expected[j, i] = score
    head_traj, head_test = dk.last_layer(traj, run.test)
    assert_close(dk.dice_e(head_traj, 0, head_test, 2, q=q), expected, RTOL[torch.float64])
    cascade = dk.cascade(head_traj, 0, 1, head_test, 2, q=q, samples=[3])
    assert_close(cascade.sum(), expected[1, 3], RTOL[torch.float64])


@pytest.mark.kernels
def test_last_layer_runs_on_the_kernels() -> None:
    """A digits MLP becomes a linear head under softmax cross-entropy: the closed-form kernels take it."""
    run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5, hidden=6, test_size=4)
    head_traj, head_test = dk.last_layer(run.trajectory, run.test)
    for query in (
        lambda backend: dk.dice_e(head_traj, 0, head_test, 2, per_test=True, backend=backend),
        lambda backend: dk.dice_e(head_traj, 0, head_test, 2, backend=backend),
        lambda backend: dk.influence_matrix(head_traj, 0, head_test, 2, backend=backend),
        lambda backend: dk.cascade(head_traj, 0, 2, head_test, 2, backend=backend),
    ):
        assert_close(query("triton"), query("torch"), 1e-10)


def test_last_layer_rejects_other_models() -> None:
    run = random_run(3, rounds=1, seed=0)
    rec = dk.Recorder(torch.nn.Linear(3, 3), lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"))
    rec.record(0, {"weight": torch.zeros(3, 3, 3, dtype=torch.float64), "bias": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="nn.Sequential whose last module is nn.Linear"):
        dk.last_layer(rec.trajectory(), run.test)


def test_per_node_test_is_checked() -> None:
    run = random_run(3, rounds=2, seed=2)
    head_traj, head_test = dk.last_layer(run.trajectory, run.test)
    wrong_nodes = dk.PerNodeTest({t: f[:2] for t, f in head_test.features.items()}, head_test.targets)
    with pytest.raises(ValueError, match="must be \\(N, M, F\\) = \\(3, 6, F\\)"):
        dk.dice_e(head_traj, 0, wrong_nodes, 1)
    with pytest.raises(ValueError, match="no features for round\\(s\\) \\[2\\]"):
        dk.dice_e(head_traj, 0, dk.PerNodeTest({0: head_test.features[0], 1: head_test.features[1]}, head_test.targets), 2)
    with pytest.raises(ValueError, match="float32 .* params are torch.float64"):
        dk.dice_e(head_traj, 0, dk.PerNodeTest({t: f.float() for t, f in head_test.features.items()}, head_test.targets), 1)
