"""Recorder bookkeeping and trajectory verification."""

from __future__ import annotations

import pytest
import torch

import dicekern as dk
from conftest import random_run


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
    assert report.ok and report.rounds_checked == 3 and report.max_rel_mismatch < 1e-14


def test_verify_reports_a_trainer_that_is_not_plain_sgd() -> None:
    """Momentum from round 1 on: the replay of round 2 misses the recorded round 3."""
    run = random_run(4, rounds=4, seed=3)
    traj = run.trajectory
    obj = traj.objective
    rec = dk.Recorder(obj.model, obj.loss_fn)
    theta, velocity = traj[0].params, torch.zeros_like(traj[0].params)
    for t in range(4):
        rnd = traj[t]
        rec.record(t, obj.layout.unflatten(theta), rnd.inputs, rnd.targets, lr=rnd.lr, W=rnd.W)
        weights = torch.full(rnd.inputs.shape[:2], 1 / rnd.inputs.shape[1], dtype=theta.dtype)
        velocity = (0.9 if t >= 2 else 0.0) * velocity + obj.node_grads(theta, rnd.inputs, rnd.targets, weights)
        theta = rnd.W @ (theta - rnd.lr * velocity)
    rec.record(4, obj.layout.unflatten(theta))
    report = rec.trajectory().verify()
    assert not report.ok
    assert report.worst_step == 3 and report.max_abs_mismatch > 1e-3


def test_verify_needs_two_consecutive_rounds() -> None:
    run = random_run(3, rounds=1, seed=0)
    rec = dk.Recorder(run.trajectory.objective.model, run.trajectory.objective.loss_fn)
    rec.record(0, run.trajectory.params(0))
    with pytest.raises(ValueError, match="nothing to verify"):
        rec.trajectory().verify()
