"""BatchNorm in train mode, exactly (DICE.md, "Models with buffers"): recorded with its buffers,
saved, replayed, and explained by DICE-E.

Two oracles: the nodes' own nn.BatchNorm modules and deep-copied torch optimizers, replayed with a
sample left out of the batch (its loss term dropped, the denominator B kept), for DICE-GT; and a
central finite difference of the weighted replay in the sample's weight for every DICE-E term.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import TOL, assert_close, assert_terms_are_derivatives, cross_entropy, weighted_replay

N, B, ROUNDS, STEP, HOPS = 3, 4, 4, 1, 2

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
}


def conv_bn(momentum: float | None = 0.1, affine: bool = True) -> nn.Module:
    """Without biases before BatchNorm, as in ResNets: BatchNorm cancels them, so their gradient is
    rounding noise, which Adam would scale up to lr-sized steps."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3, momentum=momentum, affine=affine), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12, 4, bias=False), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


def train(make_model, make_optimizer, *, mix_buffers: bool = False, seed: int = 0, trainer_mixes_buffers: bool | None = None,
          forwards: int = 1, replay_check: str = "every"):
    """A recorded run of N nodes with live modules; returns (trajectory, test, snapshots) where
    snapshots[t] = (models, optimizers, batch) deep copies at the start of round t.

    trainer_mixes_buffers: what the trainer does, when it differs from the declared mix_buffers;
    forwards: train-mode forwards of the batch per round (the last one steps)."""
    torch.manual_seed(seed)
    models = [make_model().double() for _ in range(N)]
    opts = [make_optimizer(m.parameters()) for m in models]
    rec = dk.Recorder(models[0], cross_entropy, optimizer=opts, mix_buffers=mix_buffers, replay_check=replay_check)
    g = torch.Generator().manual_seed(seed + 1)
    W = dk.topology.exponential(N)
    snapshots = []
    for t in range(ROUNDS):
        x, y = torch.randn(N, B, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(3, (N, B), generator=g)
        snapshots.append(copy.deepcopy((models, opts)) + ((x, y),))
        rec.record(t, models, x, y, W=W, optimizers=opts)
        for k, (model, opt) in enumerate(zip(models, opts)):
            for _ in range(forwards):
                opt.zero_grad()
                cross_entropy(model(x[k]), y[k]).mean().backward()
            opt.step()
        dk.mix_(models, W, buffers=mix_buffers if trainer_mixes_buffers is None else trainer_mixes_buffers)
    rec.record(ROUNDS, models, optimizers=opts)
    test = (torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(3, (5,), generator=g))
    return rec.trajectory(), test, snapshots


def replayed_test_losses(snapshots, test, W, source: int, removed: int | None, mix_buffers: bool) -> torch.Tensor:
    """(hops+1, N) test losses (eval mode) at theta^{t+1/2}, theta^{t+1}, ..., replayed by the
    nodes' own modules from round STEP, without sample ``removed`` of ``source`` at round STEP."""
    models, opts, _ = copy.deepcopy(snapshots[STEP])

    def test_losses() -> torch.Tensor:
        losses = []
        for model in models:
            model.eval()
            with torch.no_grad():
                losses.append(cross_entropy(model(test[0]), test[1]).mean())
            model.train()
        return torch.stack(losses)

    rows = []
    for t in range(STEP, STEP + HOPS):
        x, y = snapshots[t][2]
        for k, (model, opt) in enumerate(zip(models, opts)):
            keep = [b for b in range(B) if not (t == STEP and k == source and b == removed)]
            opt.zero_grad()
            (cross_entropy(model(x[k, keep]), y[k, keep]).sum() / B).backward()
            opt.step()
        if t == STEP:
            rows.append(test_losses())
        dk.mix_(models, W, buffers=mix_buffers)
        rows.append(test_losses())
    return torch.stack(rows)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_dice_gt_equals_a_replay_by_the_nodes_own_batchnorm_modules(optimizer: str) -> None:
    traj, test, snapshots = train(conv_bn, OPTIMIZERS[optimizer])
    W = traj[STEP].W
    factual = replayed_test_losses(snapshots, test, W, 0, None, False)
    for source, sample in [(0, 1), (2, 3)]:
        removed = replayed_test_losses(snapshots, test, W, source, sample, False)
        expected = (factual - removed) / N
        reach = dk.dice_gt(traj, STEP, source, test, HOPS, samples=[sample]) != 0
        assert_close(dk.dice_gt(traj, STEP, source, test, HOPS, samples=[sample]), torch.where(reach, expected, 0.0), TOL[torch.float64].chain)
    per_sample = dk.dice_gt_samples(traj, STEP, test, HOPS, nodes=[2], per_hop=True)  # (hops+1, 1, B)
    expected = torch.stack([(factual - replayed_test_losses(snapshots, test, W, 2, b, False)).sum(-1) / N for b in range(B)], dim=-1)
    assert_close(per_sample[:, 0], expected, TOL[torch.float64].chain)


@pytest.mark.parametrize("make_model, mix_buffers", [
    pytest.param(lambda: conv_bn(momentum=None), False, id="cumulative-average"),
    pytest.param(lambda: conv_bn(affine=False), False, id="no-affine"),
    pytest.param(conv_bn, True, id="mix-buffers"),
])
def test_batchnorm_variants_replay_exactly(make_model, mix_buffers: bool) -> None:
    traj, test, snapshots = train(make_model, OPTIMIZERS["momentum"], mix_buffers=mix_buffers)
    assert traj.verify().ok and traj.mix_buffers == mix_buffers
    factual = replayed_test_losses(snapshots, test, traj[STEP].W, 0, None, mix_buffers)
    removed = replayed_test_losses(snapshots, test, traj[STEP].W, 1, 2, mix_buffers)
    gt = dk.dice_gt(traj, STEP, 1, test, HOPS, samples=[2])
    assert_close(gt, torch.where(gt != 0, (factual - removed) / N, 0.0), TOL[torch.float64].chain)


def test_batchnorm_runs_save_and_load_their_buffers(tmp_path) -> None:
    traj, test, _ = train(conv_bn, OPTIMIZERS["adam"], mix_buffers=True)
    traj.save(tmp_path / "run")
    loaded = dk.Trajectory.load(tmp_path / "run", traj.objective.model, cross_entropy)
    assert loaded.mix_buffers and loaded.steps == traj.steps
    for t in traj.steps:
        assert all(torch.equal(a, b) for a, b in zip(loaded[t].buffers, traj[t].buffers))
    assert torch.equal(dk.dice_gt(loaded, STEP, 0, test, HOPS), dk.dice_gt(traj, STEP, 0, test, HOPS))


def test_batchnorm_buffers_that_do_not_fit_are_refused() -> None:
    torch.manual_seed(0)
    models = [conv_bn().double() for _ in range(N)]
    rec = dk.Recorder(models[0], cross_entropy)
    params, buffers = dk.stack_params(models), dk.stack_buffers(models)
    x, y, W = torch.randn(N, B, 2, 4, 4, dtype=torch.float64), torch.randint(3, (N, B)), dk.topology.ring(N)
    with pytest.raises(ValueError, match="BatchNorm layers \\['1', '5'\\] keep running statistics: record them, buffers="):
        rec.record(0, params, x, y, lr=0.1, W=W)
    with pytest.raises(ValueError, match="unknown: \\['1.extra'\\], missing: \\['5.num_batches_tracked'\\]"):
        rec.record(0, params, x, y, lr=0.1, W=W, buffers={**{k: v for k, v in buffers.items() if k != "5.num_batches_tracked"},
                                                          "1.extra": torch.zeros(N)})
    with pytest.raises(ValueError, match="buffers\\['1.running_mean'\\] has shape \\(3, 4\\), expected \\(3, 3\\)"):
        rec.record(0, params, x, y, lr=0.1, W=W, buffers={**buffers, "1.running_mean": torch.zeros(N, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="buffers\\['1.running_var'\\] is torch.float32 on cpu, expected torch.float64"):
        rec.record(0, params, x, y, lr=0.1, W=W, buffers={**buffers, "1.running_var": buffers["1.running_var"].float()})
    with pytest.raises(ValueError, match="buffers\\['1.num_batches_tracked'\\] is torch.float64 on cpu, expected an integer dtype"):
        rec.record(0, params, x, y, lr=0.1, W=W, buffers={**buffers, "1.num_batches_tracked": torch.zeros(N, dtype=torch.float64)})
    with pytest.raises(ValueError, match="buffers\\['1.running_var'\\] has negative entries"):
        rec.record(0, params, x, y, lr=0.1, W=W, buffers={**buffers, "1.running_var": -buffers["1.running_var"]})
    assert rec.trajectory().steps == ()
    rec.record(0, models, x, y, lr=0.1, W=W)  # the live models bring their buffers
    with pytest.raises(ValueError, match="explains their running statistics with curvature='exact' and order=1; got curvature='ggn'"):
        dk.dice_e(rec.trajectory(), 0, (x[0], y[0]), 0, curvature="ggn")


@pytest.mark.parametrize("declared", [False, True])
def test_the_replay_check_names_buffers_mixed_otherwise_than_declared(declared: bool) -> None:
    cause = "declare it with mix_buffers=True" if not declared else "but mix_buffers=True was declared"
    with pytest.raises(ValueError, match=f"round 1 is not the replay of round 0.*buffers\\['1.running_(mean|var)'\\].*{cause}"):
        train(conv_bn, OPTIMIZERS["momentum"], mix_buffers=declared, trainer_mixes_buffers=not declared)
    report = train(conv_bn, OPTIMIZERS["momentum"], mix_buffers=declared, trainer_mixes_buffers=not declared, replay_check="off")[0].verify()
    assert not report.ok and report.worst_param.startswith("buffers[") and cause in report.cause


def test_the_replay_check_names_a_second_train_mode_forward() -> None:
    """Two train-mode forwards per round move the running statistics twice and count two batches."""
    with pytest.raises(ValueError, match="buffers\\['1.num_batches_tracked'\\] differs from the replayed value.*recorded count is not this round's"):
        train(conv_bn, OPTIMIZERS["sgd"], forwards=2)
    assert train(conv_bn, OPTIMIZERS["sgd"], mix_buffers=True)[0].verify().excess < 1e-3  # declared and done: at rounding


@pytest.mark.parametrize("optimizer, mix_buffers", [
    pytest.param(name, mix, id=f"{name}{'-mix-buffers' if mix else ''}") for name in sorted(OPTIMIZERS) for mix in (False, True)
])
def test_every_dice_e_term_is_the_derivative_of_the_replay(optimizer: str, mix_buffers: bool) -> None:
    """cascade and dice_e(per_hop=True) of a BatchNorm run, every hop and receiver, to 1e-6 of
    each hop's scale: the chain carries the running statistics (their update, their gradient at
    test time, and the renormalisation of the batch a removed sample leaves behind)."""
    traj, test, _ = train(conv_bn, OPTIMIZERS[optimizer], mix_buffers=mix_buffers)
    q = torch.full((N,), 1.0 / N, dtype=torch.float64)
    per_hop = dk.dice_e(traj, STEP, test, HOPS, per_hop=True)
    replay = weighted_replay(traj, STEP, test, q, HOPS)
    for source, sample in [(0, 1), (2, 3)]:
        assert_terms_are_derivatives(traj, STEP, test, q, HOPS, replay, per_hop, source, sample)


def test_the_batchnorm_queries_agree_with_each_other() -> None:
    """influence_matrix rows are whole-batch cascades, per_test averages to the mean test loss, and
    the ledger totals the windows' dice_e."""
    traj, test, _ = train(conv_bn, OPTIMIZERS["adam"], mix_buffers=True)
    matrix = dk.influence_matrix(traj, STEP, test, HOPS)
    for source in range(N):
        assert_close(matrix[:, source], dk.cascade(traj, STEP, source, test, HOPS), TOL[torch.float64].same)
    assert_close(dk.dice_e(traj, STEP, test, HOPS, per_test=True).mean(0), dk.dice_e(traj, STEP, test, HOPS), TOL[torch.float64].same)
    ledger = dk.OnlineDICE(traj.objective.model, cross_entropy, test, HOPS, optimizer=traj.optimizer, mix_buffers=True)
    for t in traj.steps:
        r = traj[t]
        batch = (r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()
        ledger.record(t, traj.params(t), *batch, state=r.state, buffers=traj.objective.buffer_layout.unflatten(*r.buffers))
    expected = sum(dk.dice_e(traj, t, test, HOPS).sum(1) for t in ledger.scored_steps)
    assert ledger.scored_steps == list(range(ROUNDS - HOPS + 1)) and ledger.node_totals is not None
    assert_close(ledger.node_totals, expected, TOL[torch.float64].same)
