"""Recorder bookkeeping and trajectory verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dicekern as dk
from dicekern.core.partition import Partition
from dicekern.engine.mixing import TorchMixer
from conftest import TOL, cross_entropy, random_run, torch_optim_run


def test_recorder_keeps_only_its_window() -> None:
    run = random_run(3, rounds=2, seed=0)
    rec = dk.Recorder(run.trajectory.objective.model, run.trajectory.objective.loss_fn, window=2)
    for t in range(5):
        rec.record(t, run.trajectory.params(0))
    assert rec.trajectory().steps == (3, 4)


def test_recorder_copies_what_the_trainer_mutates() -> None:
    run = random_run(3, rounds=1, seed=0)
    rec = dk.Recorder(run.trajectory.objective.model, run.trajectory.objective.loss_fn)
    params = {k: v.clone() for k, v in run.trajectory.params(0).items()}
    x, y = run.trajectory[0].inputs.clone(), run.trajectory[0].targets
    rec.record(0, params, x, y, lr=0.1, W=dk.topology.ring(3))
    for v in params.values():
        v.add_(1.0)
    x.zero_()
    stored = rec.trajectory()
    assert torch.equal(stored[0].params, run.trajectory[0].params)
    assert torch.equal(stored[0].inputs, run.trajectory[0].inputs)
    assert stored.params(0).keys() == params.keys()


def test_verify_accepts_plain_gossip_sgd() -> None:
    report = random_run(4, rounds=3, seed=2).trajectory.verify()
    assert report.ok and report.rounds_checked == 3 and report.max_rel_mismatch <= TOL[torch.float64].rounding


MISDECLARED = [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.1, "momentum", id="momentum"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=1e-5), 1e-5, "adam-lr1e-5", id="adam-lr1e-5"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=5e-4), 0.05, "sgd-wd5e-4", id="weight-decay"),
]


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


@DTYPES
@pytest.mark.parametrize("make, lr, name", MISDECLARED)
def test_a_run_recorded_as_plain_sgd_is_refused_at_record(make, lr, name, dtype) -> None:
    """Per-node torch optimizers that are not plain SGD: record() of the next round raises, naming
    the parameter, the mismatch relative to the round's update, and the likely causes."""
    with pytest.raises(ValueError, match=r"round [12] is not the replay of round [01] under SGD\(momentum=0.0.*: "
                                         r"'?[0-9a-z.]+'? differs by [0-9.e+-]+ of that round's update .*Likely causes: .*momentum, weight decay, Adam"):
        torch_optim_run(make, rounds=3, seed=4, lr=lr, declared=dk.optim.SGD(), dtype=dtype)


@DTYPES
@pytest.mark.parametrize("make, lr, name", MISDECLARED)
def test_verify_measures_against_the_update(make, lr, name, dtype) -> None:
    """The same runs recorded without the check: verify() reports them; declared correctly they pass."""
    for seed in (4, 5, 6):
        wrong = torch_optim_run(make, rounds=3, seed=seed, lr=lr, declared=dk.optim.SGD(), replay_check="off", dtype=dtype).trajectory.verify()
        assert not wrong.ok and wrong.rounds_checked == 3 and wrong.max_rel_mismatch > 2e-3
        right = torch_optim_run(make, rounds=3, seed=seed, lr=lr, dtype=dtype).trajectory.verify()
        assert right.ok and right.excess < 0.5, right


def test_record_replays_the_first_two_transitions_then_one_in_thirty_two(monkeypatch) -> None:
    import dicekern.record.trajectory as trajectory

    run = random_run(3, rounds=40, seed=6)
    replayed = []
    real = trajectory.replay_mismatch
    monkeypatch.setattr(trajectory, "replay_mismatch", lambda *a, **k: replayed.append(1) or real(*a, **k))
    for check, expected in (("sampled", 2 + 1), ("every", 40), ("off", 0)):
        replayed.clear()
        rec = dk.Recorder(run.trajectory.objective.model, cross_entropy, replay_check=check)
        for t in run.trajectory.steps:
            r = run.trajectory[t]
            rec.record(t, run.trajectory.params(t), *((r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()))
        assert len(replayed) == expected, check  # transitions 0, 1 and 32 when sampled


def test_record_compares_the_optimizer_state_too() -> None:
    """A momentum buffer recorded after the step instead of before: the params replay, the state does not."""
    run = torch_optim_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), rounds=2, seed=1)
    traj = run.trajectory
    rec = dk.Recorder(run.models[0], cross_entropy, optimizer=traj.optimizer)
    r0 = traj[0]
    rec.record(0, traj.params(0), r0.inputs, r0.targets, r0.lr, r0.W, state=r0.state)
    bad = dict(traj[1].state, momentum_buffer=traj[1].state["momentum_buffer"] * 1.01)
    with pytest.raises(ValueError, match="state\\['momentum_buffer'\\] differs"):
        rec.record(1, traj.params(1), state=bad)
    with pytest.raises(ValueError, match="state\\['has_buffer'\\] differs"):
        rec.record(1, traj.params(1), state=dict(traj[1].state, has_buffer=torch.zeros(4, dtype=torch.bool)))


class Noisy(nn.Module):
    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


class WithBuffer(nn.Linear):
    def __init__(self):
        super().__init__(3, 3)
        self.register_buffer("scale", torch.ones(3))


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)),
     "module '1' \\(BatchNorm1d\\) has track_running_stats=False: .* test point's loss is not defined"),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval(), "module '1' \\(BatchNorm1d\\) is in eval mode while training"),
    (nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Linear(4, 3)), "module '1' \\(SyncBatchNorm\\) is not one of nn.BatchNorm1d/2d/3d"),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 3)), "module '1' \\(Dropout\\) is in train mode .* model.eval\\(\\)"),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout2d(0.2), nn.Linear(4, 3)), "module '1' \\(Dropout2d\\) is in train mode"),
    (WithBuffer(), "buffers \\['scale'\\] outside BatchNorm"),
], ids=["batchnorm-no-running-stats", "batchnorm-eval", "syncbatchnorm", "dropout-train", "dropout2d-train", "buffer"])
def test_models_dicekern_cannot_replay_are_refused(model, match) -> None:
    with pytest.raises(ValueError, match=match):
        dk.Recorder(model, cross_entropy)


def test_dropout_in_eval_mode_is_accepted_and_random_forwards_are_refused() -> None:
    run = random_run(3, rounds=1, seed=0)
    r = run.trajectory[0]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Dropout(0.3)).double().eval()
    dk.Recorder(model, cross_entropy).record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W)
    noisy = dk.Recorder(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), Noisy()), cross_entropy)
    with pytest.raises(ValueError, match="outputs differ between two calls .* random"):
        noisy.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W)
    assert noisy.trajectory().steps == ()


def test_recorder_takes_any_form_of_learning_rate() -> None:
    run = random_run(3, rounds=1, seed=0)
    r = run.trajectory[0]
    for lr in (0.1, np.float32(0.1), torch.tensor(0.1), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), np.array([0.1, 0.2, 0.3])):
        rec = dk.Recorder(run.trajectory.objective.model, cross_entropy)
        rec.record(0, run.trajectory.params(0), r.inputs, r.targets, lr=lr, W=r.W)
        assert rec.trajectory()[0].lr.shape == (3,)


def test_a_stateful_optimizer_needs_its_state() -> None:
    run = random_run(3, rounds=1, seed=0)
    r = run.trajectory[0]
    rec = dk.Recorder(run.trajectory.objective.model, cross_entropy, optimizer=dk.optim.Adam())
    with pytest.raises(ValueError, match="state is missing: Adam.* keeps optimizer state; .*stack_state"):
        rec.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W)
    with pytest.raises(ValueError, match="exactly the keys \\['exp_avg', 'exp_avg_sq', 'step'\\]"):
        rec.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W, state={"exp_avg": torch.zeros(3, 31)})


def test_a_block_of_the_nodes_cannot_be_replayed_alone() -> None:
    run = random_run(4, rounds=2, seed=2)
    traj = run.trajectory
    block = Partition(range(2), 4, exchange=TorchMixer)  # a mixer of rows, but no other process to exchange with
    rec = dk.Recorder(traj.objective.model, cross_entropy, partition=block)
    rows = lambda t: {k: v[:2] for k, v in traj.params(t).items()}
    rec.record(0, rows(0), traj[0].inputs[:2], traj[0].targets[:2], traj[0].lr[:2], traj[0].W)
    with pytest.raises(ValueError, match="hold 2 of the 4 nodes.*DistributedRecorder"):
        rec.record(1, rows(1))


def test_verify_needs_two_consecutive_rounds() -> None:
    run = random_run(3, rounds=1, seed=0)
    rec = dk.Recorder(run.trajectory.objective.model, run.trajectory.objective.loss_fn)
    rec.record(0, run.trajectory.params(0))
    with pytest.raises(ValueError, match="nothing to verify"):
        rec.trajectory().verify()
