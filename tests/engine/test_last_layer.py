"""Last-layer mode: the chain restricted to the final nn.Linear on each node's own features."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import TOL, assert_close, cross_entropy, random_run
from dicekern.curvature.torch_func import TorchFuncBackend


class CountedRounds(Mapping):
    """A run's rounds that note every step read (listing or testing a step reads none)."""

    def __init__(self, traj: dk.Trajectory):
        self.rounds = {t: traj[t] for t in traj.steps}
        self.reads: list[int] = []

    def __getitem__(self, step: int) -> dk.Round:
        self.reads.append(step)
        return self.rounds[step]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rounds)

    def __len__(self) -> int:
        return len(self.rounds)

    def __contains__(self, step: object) -> bool:
        return step in self.rounds


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
    assert_close(dk.dice_e(head_traj, 0, head_test, 2, q=q), expected, TOL[torch.float64].chain)
    cascade = dk.cascade(head_traj, 0, 1, head_test, 2, q=q, samples=[3])
    assert_close(cascade.sum(), expected[1, 3], TOL[torch.float64].chain)


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
        assert_close(query("triton"), query("torch"), TOL[torch.float64].op)


def test_last_layer_takes_the_head_name_from_the_module_tree() -> None:
    """The same recorded rounds under an OrderedDict-named nn.Sequential score as under the index-named one."""
    run = random_run(5, rounds=3, seed=31)
    named = nn.Sequential(OrderedDict(body=nn.Linear(3, 4), act=nn.Tanh(), head=nn.Linear(4, 3)))
    rounds = {t: run.trajectory[t] for t in run.trajectory.steps}  # same flat layout: body = 0, head = 2
    traj = dk.Trajectory(TorchFuncBackend(named, cross_entropy), rounds, run.trajectory.optimizer)
    head_traj, head_test = dk.last_layer(traj, run.test)
    index_traj, index_test = dk.last_layer(run.trajectory, run.test)
    assert head_traj.objective.layout.names == ("weight", "bias")
    for step, hops in ((0, 2), (1, 2), (2, 0)):
        expected = dk.dice_e(index_traj, step, index_test, hops, q=run.q)
        assert_close(dk.dice_e(head_traj, step, head_test, hops, q=run.q), expected, TOL[torch.float64].same)


def test_last_layer_reads_rounds_when_a_query_needs_them() -> None:
    """last_layer itself reads one round's params (the run's dtype and device); a query from t with h hops
    derives rounds t..t+h, plus the first round the query's checks look at, and no other."""
    run = random_run(3, rounds=7, seed=37)
    counted = CountedRounds(run.trajectory)
    traj = dk.Trajectory(run.trajectory.objective, counted, run.trajectory.optimizer)
    head_traj, head_test = dk.last_layer(traj, run.test)
    assert counted.reads == [0]
    assert head_traj.steps == traj.steps and 5 in head_traj and 9 not in head_traj and len(head_test.features) == 8
    assert counted.reads == [0]
    counted.reads.clear()
    scores = dk.dice_e(head_traj, 3, head_test, 2, q=run.q)
    assert set(counted.reads) == {0, 3, 4, 5}
    plain_traj, plain_test = dk.last_layer(run.trajectory, run.test)  # the same rounds, uncounted
    assert_close(scores, dk.dice_e(plain_traj, 3, plain_test, 2, q=run.q), TOL[torch.float64].same)
    counted.reads.clear()
    dk.dice_e(head_traj, 4, head_test, 2, q=run.q)  # rounds 0, 4 and 5 are cached: only round 6 is new
    assert set(counted.reads) == {6}


def test_last_layer_with_a_parameter_free_extractor() -> None:
    """nn.Flatten then nn.Linear: every node's features are its own batch, so the head is the whole model."""
    run = random_run(4, rounds=2, seed=41, model=nn.Sequential(nn.Flatten(), nn.Linear(3, 3)))
    head_traj, head_test = dk.last_layer(run.trajectory, run.test)
    assert torch.equal(head_traj[1].inputs, run.trajectory[1].inputs)
    assert torch.equal(head_test.features[2], run.test[0].expand(4, *run.test[0].shape))
    assert_close(dk.dice_e(head_traj, 0, head_test, 2, q=run.q), dk.dice_e(run.trajectory, 0, run.test, 2, q=run.q), TOL[torch.float64].same)


def test_last_layer_rejects_other_models() -> None:
    run = random_run(3, rounds=1, seed=0)
    rec = dk.Recorder(torch.nn.Linear(3, 3), lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"))
    rec.record(0, {"weight": torch.zeros(3, 3, 3, dtype=torch.float64), "bias": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="nn.Sequential whose last module is nn.Linear"):
        dk.last_layer(rec.trajectory(), run.test)
    shared = torch.nn.Linear(3, 3)  # the same module first and last: its parameters are named "0.", not "2."
    rec = dk.Recorder(torch.nn.Sequential(shared, torch.nn.Tanh(), shared), cross_entropy)
    rec.record(0, {"0.weight": torch.zeros(3, 3, 3, dtype=torch.float64), "0.bias": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="parameters under '2.' are \\[\\], not \\['2.weight', '2.bias'\\]"):
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
