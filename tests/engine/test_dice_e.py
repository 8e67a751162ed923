"""dice_e and cascade against the walk-by-walk reference, and against hand-written formulas."""

from __future__ import annotations

import pytest
import torch

import dicekern as dk
from conftest import TOL, assert_close, random_run, recast

CASES = [
    pytest.param(n, hops, at, direct, id=f"N{n}-hops{hops}-{at}-{direct}")
    for hops in range(5)
    for n in [(3, 5, 7)[hops % 3]]
    for at in ("sender", "receiver")
    for direct in ("half_step", "paper")
]


@pytest.mark.parametrize("n, hops, curvature_at, direct", CASES)
def test_cascade_and_dice_e_match_walks(n: int, hops: int, curvature_at: str, direct: str) -> None:
    run = random_run(n, rounds=hops + 2, seed=100 * n + hops)
    traj, step = run.trajectory, 1
    opts = dict(q=run.q, curvature_at=curvature_at, direct=direct)
    source, samples = n - 2, [0, 3]
    walks = dk.walks.dice_e_walks(traj, step, source, run.test, hops, samples=samples, **opts)
    assert walks[1:].abs().sum() > 0 or hops == 0
    assert_close(dk.cascade(traj, step, source, run.test, hops, samples=samples, **opts), walks, TOL[torch.float64].chain)

    per_hop = dk.dice_e(traj, step, run.test, hops, per_hop=True, **opts)
    assert per_hop.shape == (hops + 1, n, 5)
    one = dk.walks.dice_e_walks(traj, step, source, run.test, hops, samples=[2], **opts)
    assert_close(per_hop[:, source, 2], one.sum(-1), TOL[torch.float64].chain)
    total = dk.dice_e(traj, step, run.test, hops, **opts)
    assert_close(total, per_hop.sum(0), TOL[torch.float64].chain)
    # linearity: a node's samples together are its whole batch, summed over receivers
    whole = torch.stack([dk.cascade(traj, step, j, run.test, hops, **opts).sum() for j in range(n)])
    assert_close(total.sum(-1), whole, TOL[torch.float64].chain)


@pytest.mark.parametrize("curvature", ["ggn", "none"])
@pytest.mark.parametrize("curvature_at", ["sender", "receiver"])
def test_other_curvatures_match_walks(curvature: str, curvature_at: str) -> None:
    run = random_run(5, rounds=4, seed=7)
    opts = dict(q=run.q, curvature=curvature, curvature_at=curvature_at)
    walks = dk.walks.dice_e_walks(run.trajectory, 0, 1, run.test, 3, **opts)
    assert_close(dk.cascade(run.trajectory, 0, 1, run.test, 3, **opts), walks, TOL[torch.float64].chain)
    per_hop = dk.dice_e(run.trajectory, 0, run.test, 3, per_hop=True, **opts)
    assert_close(per_hop[:, 1].sum(-1), walks.sum(-1), TOL[torch.float64].chain)


def _per_sample_grads(traj: dk.Trajectory, step: int) -> torch.Tensor:
    """(N, B, D) gradients of every sample's loss at theta^t, one autograd call each."""
    rnd, obj = traj[step], traj.objective
    n, b = rnd.inputs.shape[:2]
    out = torch.empty(n, b, obj.layout.dim, dtype=rnd.params.dtype)
    for j in range(n):
        for i in range(b):
            th = rnd.params[j].clone().requires_grad_(True)
            loss = obj.per_sample_losses(th, rnd.inputs[j, i : i + 1], rnd.targets[j, i : i + 1])[0]
            out[j, i] = torch.autograd.grad(loss, th)[0]
    return out


def _test_grad(traj: dk.Trajectory, theta: torch.Tensor, test) -> torch.Tensor:
    th = theta.clone().requires_grad_(True)
    return torch.autograd.grad(traj.objective.mean_loss(th, *test), th)[0]


def test_dice_e_one_hop_is_proposition_1() -> None:
    """e = -eta/B [q_j grad L(theta_j^{t+1/2}; z')^T g_jb + sum_k q_k W[k,j] grad L(theta_k^{t+1}; z')^T g_jb]."""
    run = random_run(6, rounds=2, seed=3)
    traj, step = run.trajectory, 0
    rnd, nxt = traj[step], traj[step + 1]
    n, b = rnd.inputs.shape[:2]
    per_sample = _per_sample_grads(traj, step)
    half = rnd.params - rnd.lr[:, None] * per_sample.mean(1)
    expected = torch.empty(n, b, dtype=torch.float64)
    for j in range(n):
        direct = run.q[j] * _test_grad(traj, half[j], run.test)
        spread = sum(run.q[k] * rnd.W[k, j] * _test_grad(traj, nxt.params[k], run.test) for k in range(n))
        expected[j] = -(rnd.lr[j] / b) * per_sample[j] @ (direct + spread)
    assert_close(dk.dice_e(traj, step, run.test, 1, q=run.q), expected, TOL[torch.float64].chain)


def test_dice_e_without_curvature_is_first_order_sum() -> None:
    """curvature="none": delta^{(s)} = W^{t+s-1} ... W^t e_j Delta, no (I - eta H) factors."""
    run = random_run(5, rounds=4, seed=11)
    traj, step, hops = run.trajectory, 1, 3
    rnd = traj[step]
    n, b = rnd.inputs.shape[:2]
    displacements = -(rnd.lr[:, None, None] / b) * _per_sample_grads(traj, step)  # (N, B, D)
    half = rnd.params - rnd.lr[:, None] * _per_sample_grads(traj, step).mean(1)
    test_grads = [torch.stack([_test_grad(traj, half[k], run.test) for k in range(n)])]
    test_grads += [torch.stack([_test_grad(traj, traj[step + s].params[k], run.test) for k in range(n)]) for s in range(1, hops + 1)]
    expected = torch.einsum("j,jd,jbd->jb", run.q, test_grads[0], displacements)
    product = torch.eye(n, dtype=torch.float64)
    for s in range(1, hops + 1):
        product = traj[step + s - 1].W @ product  # product[k, j]: summed walk weights j -> k
        expected += torch.einsum("k,kj,kd,jbd->jb", run.q, product, test_grads[s], displacements)
    actual = dk.dice_e(traj, step, run.test, hops, q=run.q, curvature="none")
    assert_close(actual, expected, TOL[torch.float64].chain)


def test_outputs_follow_params_dtype() -> None:
    run = random_run(4, rounds=3, seed=5)
    traj64 = run.trajectory
    traj32, test32 = recast(traj64, run.test, torch.float32)
    e64 = dk.dice_e(traj64, 0, run.test, 2, q=run.q)
    e32 = dk.dice_e(traj32, 0, test32, 2, q=run.q.float())
    assert e64.dtype == torch.float64 and e32.dtype == torch.float32
    assert dk.cascade(traj32, 0, 1, test32, 2).dtype == torch.float32
    assert dk.dice_gt(traj32, 0, 1, test32, 2).dtype == torch.float32
    assert_close(e32.double(), e64, TOL[torch.float32].chain)


@pytest.mark.parametrize("hops", [0, 1, 3], ids=lambda h: f"hops{h}")
def test_dice_e_per_test_point(hops: int) -> None:
    """Each test point's own objective: their mean is the objective of the whole test set."""
    run = random_run(5, rounds=hops + 1, seed=31)
    opts = dict(q=run.q, curvature_at="receiver")
    per_test = dk.dice_e(run.trajectory, 0, run.test, hops, per_test=True, **opts)
    assert per_test.shape == (6, 5, 5)
    assert_close(per_test.mean(0), dk.dice_e(run.trajectory, 0, run.test, hops, **opts), TOL[torch.float64].chain)
    both = dk.dice_e(run.trajectory, 0, run.test, hops, per_test=True, per_hop=True, **opts)
    assert both.shape == (hops + 1, 6, 5, 5)
    assert_close(both.sum(0), per_test, TOL[torch.float64].chain)
    single = (run.test[0][2:3], run.test[1][2:3])
    assert_close(both[:, 2], dk.dice_e(run.trajectory, 0, single, hops, per_hop=True, **opts), TOL[torch.float64].chain)


@pytest.mark.parametrize("hops", [0, 2, 4], ids=lambda h: f"hops{h}")
def test_influence_matrix_is_every_cascade(hops: int) -> None:
    run = random_run(6, rounds=hops + 1, seed=41)
    matrix = dk.influence_matrix(run.trajectory, 0, run.test, hops, q=run.q)
    assert matrix.shape == (hops + 1, 6, 6)
    for j in range(6):
        assert_close(matrix[:, j], dk.cascade(run.trajectory, 0, j, run.test, hops, q=run.q), TOL[torch.float64].chain)
