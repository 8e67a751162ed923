"""The online ledger: totals equal offline DICE-E, memory stays bounded, and a resumed run is identical."""

from __future__ import annotations

import json

import pytest
import torch

import dicekern as dk
from dicekern.engine.ledger import LedgerState
from conftest import TOL, assert_close
from dicekern.engine.chain import Chain

HOPS = 2


@pytest.fixture(scope="module")
def run():
    return dk.examples.digits_run(num_nodes=5, rounds=7, batch_size=4, hidden=8)


def sample_ids(step: int, n: int = 5, b: int = 4) -> torch.Tensor:
    """Ids that repeat across rounds, as data points of an epoch would."""
    return (torch.arange(n * b).view(n, b) + 7 * step) % 30


def feed(ledger: dk.OnlineDICE, run, steps) -> list[torch.Tensor]:
    scores = []
    for t in steps:
        r = run.trajectory[t]
        args = (r.inputs, r.targets, r.lr, r.W) if r.has_batch else ()
        out = ledger.record(t, run.trajectory.params(t), *args, sample_ids=sample_ids(t) if r.has_batch else None)
        if out is not None:
            scores.append(out)
    return scores


def test_totals_equal_offline_dice_e(run) -> None:
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, q=q, node_matrix=True)
    returned = feed(ledger, run, run.trajectory.steps)
    scored = list(range(0, 7 - HOPS + 1))
    assert ledger.scored_steps == scored
    offline = [dk.dice_e(run.trajectory, t, run.test, HOPS, q=q) for t in scored]
    for online_scores, offline_scores in zip(returned, offline):
        assert_close(online_scores, offline_scores, TOL[torch.float64].chain)
    assert_close(ledger.node_totals, sum(s.sum(1) for s in offline), TOL[torch.float64].chain)
    by_id: dict[int, float] = {}
    for t, s in zip(scored, offline):
        for i, v in zip(sample_ids(t).flatten().tolist(), s.flatten().tolist()):
            by_id[i] = by_id.get(i, 0.0) + v
    assert ledger.sample_totals.keys() == by_id.keys()
    assert_close(torch.tensor([ledger.sample_totals[i] for i in by_id]), torch.tensor(list(by_id.values())), TOL[torch.float64].chain)
    matrix = sum(dk.influence_matrix(run.trajectory, t, run.test, HOPS, q=q).sum(0) for t in scored)
    assert_close(ledger.matrix_totals, matrix, TOL[torch.float64].chain)
    assert sorted(ledger.round_totals) == scored
    for t, s in zip(scored, offline):
        assert_close(ledger.round_totals[t], s.sum(1), TOL[torch.float64].chain)


def test_memory_is_bounded_and_test_gradients_are_computed_once(run, monkeypatch) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, backend="torch")  # the engine whose objective is the recorder's
    objective = ledger.recorder.objective
    computed_rows = []
    real = objective.test_grads
    monkeypatch.setattr(objective, "test_grads", lambda thetas, test: computed_rows.append(len(thetas)) or real(thetas, test))
    for t in run.trajectory.steps:
        feed(ledger, run, [t])
        assert len(ledger.recorder.trajectory().steps) <= HOPS + 1
        assert len(ledger.state.test_grads) <= HOPS
    windows = len(ledger.scored_steps)
    # every window computes its own half step (hop 0); rounds 1..7 are each computed once
    assert sum(computed_rows) == 5 * windows + 5 * 7


def test_a_stopped_run_resumes_with_identical_totals(run, tmp_path) -> None:
    steps = run.trajectory.steps
    whole = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, node_matrix=True)
    feed(whole, run, steps)
    first = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, node_matrix=True)
    feed(first, run, steps[:5])
    first.save(tmp_path)
    resumed = dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test)
    assert_same_state(resumed.state, first.state)
    feed(resumed, run, steps[5:])
    assert resumed.scored_steps == whole.scored_steps
    assert torch.equal(resumed.node_totals, whole.node_totals)
    assert torch.equal(resumed.matrix_totals, whole.matrix_totals)
    assert resumed.sample_totals == whole.sample_totals
    assert resumed.round_totals.keys() == whole.round_totals.keys()
    assert all(torch.equal(resumed.round_totals[t], whole.round_totals[t]) for t in whole.round_totals)
    steps = sorted(resumed.round_totals)
    picture = dk.plots.contribution_over_rounds(steps, torch.stack([resumed.round_totals[t] for t in steps]), tmp_path / "c.png")
    assert picture.stat().st_size > 0


def assert_same_state(got: LedgerState, expected: LedgerState) -> None:
    """Every field of two ledger states equal, tensors bitwise."""
    same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
    for name in vars(expected):
        a, b = getattr(got, name), getattr(expected, name)
        if isinstance(b, dict):
            assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in b), name
        else:
            assert same(a, b), name
    assert expected.test_grads and expected.sample_ids and expected.round_totals  # the check covered every kind of field


def test_a_given_recorder_is_recorded_into_and_checked(run, tmp_path) -> None:
    recorder = dk.Recorder(run.model, run.loss_fn, window=HOPS + 1, replay_check="every")
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, recorder=recorder)
    default = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    for t in run.trajectory.steps:
        feed(ledger, run, [t])
        feed(default, run, [t])
        assert ledger.recorder is recorder and recorder.trajectory().steps == default.recorder.trajectory().steps
        if t == 3:
            ledger.save(tmp_path)
    assert torch.equal(ledger.node_totals, default.node_totals)
    again = dk.Recorder(run.model, run.loss_fn, window=HOPS + 1, replay_check="every")
    resumed = dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test, recorder=again)
    assert resumed.recorder is again
    feed(resumed, run, run.trajectory.steps[4:])
    assert torch.equal(resumed.node_totals, ledger.node_totals)
    with pytest.raises(ValueError, match="the given recorder does not match the saved replay_check"):
        dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test, recorder=dk.Recorder(run.model, run.loss_fn, window=HOPS + 1))
    with pytest.raises(TypeError, match="recorder must be a dicekern.Recorder, got dict"):
        dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test, recorder={})
    make = lambda **kwargs: dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, **kwargs)
    with pytest.raises(ValueError, match="window of 3 rounds .*got window=2"):
        make(recorder=dk.Recorder(run.model, run.loss_fn, window=2))
    with pytest.raises(ValueError, match="the recorder must be empty"):
        make(recorder=recorder)
    with pytest.raises(ValueError, match="another model or loss_fn"):
        make(recorder=dk.Recorder(torch.nn.Linear(64, 10), run.loss_fn, window=HOPS + 1))
    with pytest.raises(ValueError, match="with a recorder given, pass replay_check to the recorder, not to OnlineDICE"):
        make(recorder=dk.Recorder(run.model, run.loss_fn, window=HOPS + 1), replay_check="sampled")  # even the default
    with pytest.raises(TypeError, match="recorder must be a dicekern.Recorder, got dict"):
        make(recorder={})


def test_bad_sample_ids(run) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    r = run.trajectory[0]
    with pytest.raises(ValueError, match="sample_ids must be integer ids of shape \\(N, B\\) = \\(5, 4\\)"):
        ledger.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W, sample_ids=torch.zeros(5, 3, dtype=torch.long))
    assert ledger.recorder.trajectory().steps == ()  # nothing was recorded


def test_rounds_out_of_order_or_with_a_gap_are_refused_and_nothing_is_lost(run) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    feed(ledger, run, [0, 1, 2])
    with pytest.raises(ValueError, match="expected round 3, got 4"):
        feed(ledger, run, [4])
    with pytest.raises(ValueError, match="expected round 3, got 1"):
        feed(ledger, run, [1])
    assert ledger.recorder.trajectory().steps == (0, 1, 2)
    feed(ledger, run, [3, 4, 5, 6, 7])
    whole = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    feed(whole, run, run.trajectory.steps)
    assert torch.equal(ledger.node_totals, whole.node_totals) and ledger.scored_steps == whole.scored_steps == [0, 1, 2, 3, 4, 5]


def test_the_constructor_and_the_first_round_check_what_scoring_needs(run) -> None:
    with pytest.raises(TypeError, match="test must be a pair"):
        dk.OnlineDICE(run.model, run.loss_fn, run.test[0], HOPS)
    with pytest.raises(ValueError, match="curvature must be one of"):
        dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, curvature="fisher")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, backend="cuda")
    checks = [
        (dict(q=torch.full((3,), 1 / 3, dtype=torch.float64)), "q must have shape \\(N,\\) = \\(5,\\)"),
        (dict(optimizer=dk.optim.Adam(), curvature_at="receiver"), "curvature_at='receiver' needs an optimizer without state"),
    ]
    for kwargs, match in checks:
        ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, **kwargs)
        r = run.trajectory[0]
        state = dk.optim.Adam().initial_state(5, r.params.shape[1], r.params) if "optimizer" in kwargs else None
        with pytest.raises(ValueError, match=match):
            ledger.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W, state=state)
        assert ledger.recorder.trajectory().steps == ()  # round 0 can be recorded again


def test_a_round_that_fails_to_score_can_be_retried(run, monkeypatch) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, node_matrix=True)
    feed(ledger, run, [0, 1])
    with monkeypatch.context() as patch:
        patch.setattr(Chain, "influence_matrix", lambda self: (_ for _ in ()).throw(MemoryError("out of memory")))
        with pytest.raises(MemoryError):
            feed(ledger, run, [2])
    assert ledger.recorder.trajectory().steps == (0, 1) and ledger.scored_steps == [] and ledger.node_totals is None
    feed(ledger, run, run.trajectory.steps[2:])
    whole = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, node_matrix=True)
    feed(whole, run, run.trajectory.steps)
    assert torch.equal(ledger.node_totals, whole.node_totals) and ledger.sample_totals == whole.sample_totals


def test_a_resumed_ledger_refuses_another_test_set_or_q_and_checks_its_parts(run, tmp_path) -> None:
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, q=q)
    feed(ledger, run, range(4))
    ledger.save(tmp_path / "a")
    other_test = (run.test[0][:10], run.test[1][:10])
    with pytest.raises(ValueError, match="the test set differs"):
        dk.OnlineDICE.load(tmp_path / "a", run.model, run.loss_fn, other_test)
    with pytest.raises(ValueError, match="q differs from the saved node weights"):
        dk.OnlineDICE.load(tmp_path / "a", run.model, run.loss_fn, run.test, q=torch.full((5,), 0.2, dtype=torch.float64))
    resumed = dk.OnlineDICE.load(tmp_path / "a", run.model, run.loss_fn, run.test)  # q: the saved one
    assert torch.equal(resumed.options.q, q) and resumed.scored_steps == [0, 1]
    feed(ledger, run, [4])
    ledger.save(tmp_path / "b")
    folder = lambda name: tmp_path / name / json.loads((tmp_path / name / "CURRENT").read_text())["snapshot"]
    (folder("b") / "test_grads.safetensors").write_bytes((folder("a") / "test_grads.safetensors").read_bytes())
    with pytest.raises(ValueError, match="test_grads.safetensors does not belong to .*ledger.json"):
        dk.OnlineDICE.load(tmp_path / "b", run.model, run.loss_fn, run.test)
    ledger.save(tmp_path / "b")
    (folder("b") / "pending" / "manifest.json").write_bytes((folder("a") / "pending" / "manifest.json").read_bytes())
    with pytest.raises(ValueError, match="pending/manifest.json does not belong to"):
        dk.OnlineDICE.load(tmp_path / "b", run.model, run.loss_fn, run.test)
    with pytest.raises(ValueError, match="holds no saved OnlineDICE ledger"):
        dk.OnlineDICE.load(tmp_path / "c", run.model, run.loss_fn, run.test)


def test_a_version_2_ledger_resumes_without_round_totals(run, tmp_path) -> None:
    """Ledgers saved before round_totals existed resume with the same totals and an empty history."""
    import hashlib

    steps = run.trajectory.steps
    first = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    feed(first, run, steps[:5])
    first.save(tmp_path)
    pointer = json.loads((tmp_path / "CURRENT").read_text())
    ledger_file = tmp_path / pointer["snapshot"] / "ledger.json"
    ledger = json.loads(ledger_file.read_text())
    del ledger["round_totals"]
    ledger["version"] = 2
    data = json.dumps(ledger).encode()
    ledger_file.write_bytes(data)
    pointer["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "CURRENT").write_text(json.dumps(pointer))
    resumed = dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test)
    assert resumed.round_totals == {} and torch.equal(resumed.node_totals, first.node_totals)
    feed(resumed, run, steps[5:])
    assert sorted(resumed.round_totals) == [s for s in resumed.scored_steps if s > first.scored_steps[-1]]


def run_until(run, last: int) -> dk.Trajectory:
    """The run's rounds 0..last, as if it had ended there."""
    traj = run.trajectory
    return dk.Trajectory(traj.objective, {t: traj[t] for t in range(last + 1)}, traj.optimizer)


@pytest.mark.parametrize("order", [1, 2])
def test_final_totals_stream_node_contributions(run, order: int) -> None:
    """After each record(), final_totals are dk.node_contributions of the run so far (10^-10), and
    the windowed totals are unchanged by keeping them."""
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, final_contributions=True, order=order)
    plain = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS, order=order)
    for t in run.trajectory.steps:
        feed(ledger, run, [t])
        feed(plain, run, [t])
        if t == 0:
            assert torch.equal(ledger.final_totals, torch.zeros(5, dtype=torch.float64))
            continue
        expected = dk.node_contributions(run_until(run, t), run.test, order=order)
        assert expected.abs().max() > 0
        assert_close(ledger.final_totals, expected, TOL[torch.float64].op)
    assert torch.equal(ledger.node_totals, plain.node_totals)


def test_final_totals_resume_bitwise_and_need_the_round_before(run, tmp_path) -> None:
    steps = run.trajectory.steps
    whole = dk.OnlineDICE(run.model, run.loss_fn, run.test, 0, final_contributions=True)
    feed(whole, run, steps)
    first = dk.OnlineDICE(run.model, run.loss_fn, run.test, 0, final_contributions=True)
    feed(first, run, steps[:4])
    first.save(tmp_path)
    resumed = dk.OnlineDICE.load(tmp_path, run.model, run.loss_fn, run.test)
    assert resumed.final_contributions and torch.equal(resumed.state.perturbation, first.state.perturbation)
    feed(resumed, run, steps[4:])
    assert torch.equal(resumed.final_totals, whole.final_totals)
    assert whole.recorder.window == 2  # hops 0 keeps one round more: the carry reads the round before the newest
    with pytest.raises(ValueError, match="window of 2 rounds"):
        dk.OnlineDICE(run.model, run.loss_fn, run.test, 0, final_contributions=True, recorder=dk.Recorder(run.model, run.loss_fn, window=1))
