"""DICE under momentum, Nesterov, weight decay, Adam and AdamW, checked without dicekern's own math:
finite differences and exact replays run by the users' own per-node torch.optim optimizers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import dicekern as dk
from conftest import (TOL, assert_close, assert_dice_gt_is_the_replay, assert_terms_are_derivatives, cross_entropy,
                      replayed_losses, torch_optim_run)

OPTIMIZERS = {
    "momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), 0.1, False),
    "momentum-gossiped": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.1, True),
    "nesterov": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True), 0.1, False),
    "weight-decay": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05), 0.1, False),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01), 0.02, False),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1), 0.02, False),
}
STEP = 2  # the scored round: Adam's moments and the momentum buffers have history by then


def recorded_run(name: str, n: int, hops: int):
    make, lr, mix_state = OPTIMIZERS[name]
    return torch_optim_run(make, n, rounds=STEP + hops + 1, seed=n + 7, lr=lr, mix_state=mix_state)


def nodes_at(run, step: int, name: str):
    """Fresh per-node models and torch optimizers holding the recorded params and state of round step."""
    traj = run.trajectory
    make = OPTIMIZERS[name][0]
    models, optimizers = [], []
    rnd = traj[step]
    for k in range(traj.num_nodes):
        model = copy.deepcopy(run.models[0])
        with torch.no_grad():
            for p, value in zip(model.parameters(), traj.objective.layout.unflatten(rnd.params[k]).values()):
                p.copy_(value)
        opt = make(model.parameters())
        for p, (_, columns) in zip(model.parameters(), traj.objective.layout.slices()):
            block = lambda key: rnd.state[key][k, columns].view_as(p).clone()
            if "has_buffer" in rnd.state and rnd.state["has_buffer"][k]:
                opt.state[p]["momentum_buffer"] = block("momentum_buffer")
            if "step" in rnd.state and rnd.state["step"][k] > 0:
                opt.state[p].update(step=torch.tensor(float(rnd.state["step"][k])), exp_avg=block("exp_avg"), exp_avg_sq=block("exp_avg_sq"))
        models.append(model)
        optimizers.append(opt)
    return models, optimizers


def replay(run, name: str, hops: int):
    """weights (N, B) -> (hops+1, N): replayed_losses from round STEP by fresh torch.optim nodes of the recorded state."""
    return lambda weights: replayed_losses(run.trajectory, STEP, run.test, run.q, hops, weights, *nodes_at(run, STEP, name))


CASES = [pytest.param(name, n, id=f"{name}-N{n}") for name in OPTIMIZERS for n in (3, 5)]


@pytest.mark.parametrize("name, n", CASES)
def test_every_term_is_the_derivative_of_the_replay(name: str, n: int) -> None:
    """e[s, k] (exact curvature) = (1/B) d q_k L(theta_k^{t+s}) / d w_z: central differences of the
    torch.optim replay in the sample weight agree to 1e-6 of each hop's scale, hops 0..3."""
    hops = 3
    run = recorded_run(name, n, hops)
    traj = run.trajectory
    per_hop = dk.dice_e(traj, STEP, run.test, hops, q=run.q, per_hop=True)  # (hops+1, N, B)
    for h in range(hops):  # a shorter query is the same terms
        assert_close(dk.dice_e(traj, STEP, run.test, h, q=run.q), per_hop[: h + 1].sum(0), TOL[torch.float64].same)
    for source, sample in ((n - 1, 0), (0, 3)):
        flow = assert_terms_are_derivatives(traj, STEP, run.test, run.q, hops, replay(run, name, hops), per_hop, source, sample)
        if name != "weight-decay" and not traj.mix_state:  # the source's own state carries its sample on
            assert flow[2:, source].abs().min() > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dice_gt_is_the_torch_optim_replay(name: str) -> None:
    """dice_gt and dice_gt_samples equal replays by the nodes' own torch.optim optimizers to 1e-10."""
    n, hops = 4, 3
    run = recorded_run(name, n, hops)
    assert_dice_gt_is_the_replay(run.trajectory, STEP, run.test, run.q, hops, replay(run, name, hops), 2, [1, 4], TOL[torch.float64].op)


@pytest.mark.slow  # digits fidelity: trains 34 rounds and replays 128 removals
@pytest.mark.parametrize("optimizer, lr", [(dk.optim.SGD(momentum=0.9), 0.05), (dk.optim.Adam(), 0.005)], ids=["momentum", "adam"])
def test_dice_e_tracks_dice_gt_on_digits(optimizer, lr: float) -> None:
    """16 nodes, exponential graph, MLP, batch 16, round 30, per-sample removal of every sample of
    8 nodes: Pearson >= 0.999 at every hop 0..3 (README, "Optimizers", has the numbers)."""
    run = dk.examples.digits_run(num_nodes=16, rounds=34, batch_size=16, lr=lr, optimizer=optimizer)
    traj, step, nodes = run.trajectory, 30, list(range(0, 16, 2))
    losses = [traj.objective.test_losses(traj[t].params, run.test).mean().item() for t in (0, 34)]
    assert losses[1] < 0.92 * losses[0]  # training makes progress
    e = dk.dice_e(traj, step, run.test, 3, per_hop=True)[:, nodes]
    gt = dk.dice_gt_samples(traj, step, run.test, 3, per_hop=True, nodes=nodes)
    for s in range(4):
        pearson = np.corrcoef(e[s].flatten().numpy(), gt[s].flatten().numpy())[0, 1]
        assert pearson >= 0.999, (s, pearson)


def test_conventions_of_the_sgd_analysis_are_refused_with_state() -> None:
    run = recorded_run("adam", 3, 1)
    for option, value in (("curvature_at", "receiver"), ("direct", "paper")):
        with pytest.raises(ValueError, match=f"{option}='{value}' .*SGD without momentum"):
            dk.dice_e(run.trajectory, STEP, run.test, 1, **{option: value})
    with pytest.raises(ValueError, match="walk reference evaluates the paper's plain-SGD walks"):
        dk.walks.dice_e_walks(run.trajectory, STEP, 0, run.test, 1)
    weight_decay = recorded_run("weight-decay", 3, 2)  # stateless: both conventions apply
    dk.dice_e(weight_decay.trajectory, STEP, weight_decay.test, 2, curvature_at="receiver", direct="paper")


def test_ggn_replaces_the_hessian_inside_the_step_jacobian() -> None:
    """curvature="ggn" under Adam: cascade and dice_e still agree with each other, and differ from exact."""
    run = recorded_run("adam", 4, 3)
    traj = run.trajectory
    per_hop = dk.dice_e(traj, STEP, run.test, 3, q=run.q, per_hop=True, curvature="ggn")
    flow = torch.stack([dk.cascade(traj, STEP, j, run.test, 3, q=run.q, samples=[1], curvature="ggn") for j in range(4)])
    assert_close(per_hop[:, :, 1], flow.sum(-1).T, TOL[torch.float64].op)
    exact = dk.dice_e(traj, STEP, run.test, 3, q=run.q, per_hop=True)
    assert not torch.allclose(per_hop[2:], exact[2:])
    assert_close(per_hop[:2], exact[:2], TOL[torch.float64].same)  # hops 0 and 1 use no curvature


@pytest.mark.parametrize("name", ["nesterov", "adamw", "momentum-gossiped"])
def test_every_query_agrees_under_every_optimizer(name: str, tmp_path) -> None:
    """influence_matrix is every source's cascade, per_test averages to the mean objective, and the
    online ledger (stopped, saved, resumed) totals the offline scores."""
    n, hops = 4, 2
    run = recorded_run(name, n, hops)
    traj = run.trajectory
    matrix = dk.influence_matrix(traj, STEP, run.test, hops, q=run.q)
    for j in range(n):
        assert_close(matrix[:, j], dk.cascade(traj, STEP, j, run.test, hops, q=run.q), TOL[torch.float64].op)
    assert_close(dk.analysis.proximal_influence(traj, STEP, run.test, q=run.q), matrix[1], TOL[torch.float64].same)
    per_test = dk.dice_e(traj, STEP, run.test, hops, q=run.q, per_test=True, per_hop=True)
    assert per_test.shape == (hops + 1, 6, n, 5)
    assert_close(per_test.mean(1), dk.dice_e(traj, STEP, run.test, hops, q=run.q, per_hop=True), TOL[torch.float64].op)

    def feed(ledger, steps):
        for t in steps:
            r = traj[t]
            ledger.record(t, traj.params(t), *((r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()), state=r.state)

    model, spec = run.models[0], traj.optimizer
    whole = dk.OnlineDICE(model, cross_entropy, run.test, hops, q=run.q, optimizer=spec, mix_state=traj.mix_state, node_matrix=True)
    feed(whole, traj.steps)
    offline = [dk.dice_e(traj, t, run.test, hops, q=run.q) for t in whole.scored_steps]
    assert_close(whole.node_totals, sum(s.sum(1) for s in offline), TOL[torch.float64].op)
    stopped = dk.OnlineDICE(model, cross_entropy, run.test, hops, q=run.q, optimizer=spec, mix_state=traj.mix_state, node_matrix=True)
    feed(stopped, traj.steps[:4])
    stopped.save(tmp_path)
    resumed = dk.OnlineDICE.load(tmp_path, model, cross_entropy, run.test, q=run.q)
    assert resumed.recorder.optimizer == spec and resumed.recorder.mix_state == traj.mix_state
    feed(resumed, traj.steps[4:])
    assert torch.equal(resumed.node_totals, whole.node_totals) and torch.equal(resumed.matrix_totals, whole.matrix_totals)


def test_last_layer_mode_takes_the_head_block_of_the_optimizer_state() -> None:
    """Hop 0 of last-layer DICE-E under momentum, by hand: the head steps with its own buffer block,
    Delta = -lr (1 - dampening) grad_head loss_b / B, on each node's recorded features."""
    run = recorded_run("momentum", 3, 2)
    traj, spec = run.trajectory, run.trajectory.optimizer
    head, head_test = dk.last_layer(traj, run.test)
    assert head.optimizer == spec and head[STEP].state["momentum_buffer"].shape == (3, 4 * 3 + 3)
    scores = dk.dice_e(head, STEP, head_test, 0, q=run.q)
    rnd = traj[STEP]
    for j in range(3):
        model = copy.deepcopy(run.models[0])
        with torch.no_grad():
            for p, value in zip(model.parameters(), traj.objective.layout.unflatten(rnd.params[j]).values()):
                p.copy_(value)
        extractor, linear = model[:2], model[2]
        features, test_features = extractor(rnd.inputs[j]).detach(), extractor(run.test[0]).detach()
        flat = lambda: torch.cat([linear.weight.reshape(-1), linear.bias])
        grad_of = lambda loss: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [linear.weight, linear.bias])])
        sample_grads = torch.stack([grad_of(cross_entropy(linear(features[b : b + 1]), rnd.targets[j, b : b + 1]).sum()) for b in range(5)])
        buffer = head[STEP].state["momentum_buffer"][j]
        half = flat().detach() - rnd.lr[j] * (spec.momentum * buffer + (1 - spec.dampening) * sample_grads.mean(0))
        with torch.no_grad():
            linear.weight.copy_(half[:12].view(3, 4))
            linear.bias.copy_(half[12:])
        test_grad = grad_of(cross_entropy(linear(test_features), run.test[1]).mean())
        expected = -run.q[j] * rnd.lr[j] * (1 - spec.dampening) / 5 * sample_grads @ test_grad
        assert_close(scores[j], expected, TOL[torch.float64].op)
