"""A save killed at any instant: SIGKILL (sent by the saving process to itself) before every write
step of a save, and at random times from outside. After each kill the folder loads as exactly the
previous save or exactly the new one, and a resumed ledger ends with the uninterrupted totals, bit
for bit."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

import dicekern as dk
from conftest import cross_entropy, random_run

pytestmark = pytest.mark.slow  # forks a saving child and kills it at every write step of a save

WRITE_STEPS = ("open", "fsync", "mkdir", "rename", "replace")  # every os call by which a save changes the disk


def in_child(work, kill_at: int | None = None, kill_after: float | None = None) -> int:
    """Run work() in a forked child; kill it by its own pid before its kill_at-th write step, or from
    the parent after kill_after seconds. Returns the child's number of write steps (-1 if killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count (and maybe stop at) every write step, then report the count
        os.close(read)
        steps = [0]

        def counted(name):
            real = getattr(os, name)

            def call(*args, **kwargs):
                if name != "open" or args[1] & os.O_CREAT:
                    steps[0] += 1
                    if steps[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            return call

        for name in WRITE_STEPS:
            setattr(os, name, counted(name))
        try:
            work()
            os.write(write, str(steps[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    report = os.read(read, 64)
    os.close(read)
    return int(report) if report else -1


def same_rounds(a: dk.Trajectory, b: dk.Trajectory) -> bool:
    return a.steps == b.steps and all(torch.equal(a[t].params, b[t].params) for t in a.steps)


def test_a_killed_trajectory_save_leaves_the_old_run_or_the_new_one(tmp_path) -> None:
    old, new = random_run(4, rounds=3, seed=1), random_run(4, rounds=5, seed=2)
    path = tmp_path / "run"
    old.trajectory.save(path)
    load = lambda: dk.Trajectory.load(path, old.trajectory.objective.model, cross_entropy)
    steps = in_child(lambda: new.trajectory.save(path))
    assert steps > 10 and same_rounds(load(), new.trajectory)
    for kill_at in range(1, steps + 1):
        old.trajectory.save(path)
        assert in_child(lambda: new.trajectory.save(path), kill_at=kill_at) == -1
        loaded = load()
        assert same_rounds(loaded, old.trajectory) or same_rounds(loaded, new.trajectory), kill_at
        dk.dice_e(loaded, 0, old.test, 1)  # every round of it reads and checks


def test_a_killed_first_save_leaves_nothing_that_loads(tmp_path) -> None:
    run = random_run(3, rounds=2, seed=1)
    steps = in_child(lambda: run.trajectory.save(tmp_path / "probe"))
    for kill_at in range(1, steps + 1):
        path = tmp_path / f"run{kill_at}"
        in_child(lambda: run.trajectory.save(path), kill_at=kill_at)
        try:
            loaded = dk.Trajectory.load(path, run.trajectory.objective.model, cross_entropy)
        except ValueError as error:
            assert "holds no saved trajectory" in str(error)
        else:
            assert same_rounds(loaded, run.trajectory)


HOPS = 2


@pytest.fixture(scope="module")
def digits():
    return dk.examples.digits_run(num_nodes=4, rounds=9, batch_size=4, hidden=8, optimizer="momentum")


def feed(ledger: dk.OnlineDICE, run, steps) -> None:
    for t in steps:
        r = run.trajectory[t]
        batch = (r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()
        ids = (torch.arange(16).view(4, 4) + t) % 10 if r.has_batch else None
        ledger.record(t, run.trajectory.params(t), *batch, state=r.state, sample_ids=ids)


def ledger_of(run) -> dk.OnlineDICE:
    return dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, optimizer=run.trajectory.optimizer, node_matrix=True)


def summary(ledger: dk.OnlineDICE) -> str:
    """Everything a checkpoint restores, exactly (floats by repr)."""
    totals = None if ledger.node_totals is None else ledger.node_totals.tolist()
    return repr((ledger.scored_steps, ledger.recorder.trajectory().steps, totals, sorted(ledger.sample_totals.items())))


def test_a_killed_ledger_save_resumes_to_the_uninterrupted_totals(digits, tmp_path) -> None:
    """Checkpoint A after rounds 0..4, checkpoint B after 0..6 killed at every write step and at
    random instants: the folder loads as A or B, and feeding the rest gives the uninterrupted totals."""
    whole = ledger_of(digits)
    feed(whole, digits, digits.trajectory.steps)
    first, second = ledger_of(digits), ledger_of(digits)
    feed(first, digits, range(5))
    feed(second, digits, range(7))
    expected = {summary(first): 5, summary(second): 7}
    path = tmp_path / "ledger"
    steps = in_child(lambda: second.save(path))
    kills = [dict(kill_at=k) for k in range(1, steps + 1)]
    duration = time.perf_counter()
    second.save(path)
    duration = time.perf_counter() - duration
    rng = random.Random(0)
    kills += [dict(kill_after=rng.uniform(0, 1.5 * duration)) for _ in range(12)]
    for kill in kills:
        first.save(path)
        in_child(lambda: second.save(path), **kill)
        resumed = dk.OnlineDICE.load(path, digits.model, digits.loss_fn, digits.test)
        assert summary(resumed) in expected, kill
        feed(resumed, digits, range(expected[summary(resumed)], 10))
        assert torch.equal(resumed.node_totals, whole.node_totals) and torch.equal(resumed.matrix_totals, whole.matrix_totals), kill
        assert resumed.sample_totals == whole.sample_totals and resumed.scored_steps == whole.scored_steps
