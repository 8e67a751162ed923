"""The online ledger: totals equal offline DICE-E, memory stays bounded, and a resumed run is identical."""

from __future__ import annotations

import pytest
import torch

import dicekern as dk
from conftest import RTOL, assert_close

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
        assert_close(online_scores, offline_scores, RTOL[torch.float64])
    assert_close(ledger.node_totals, sum(s.sum(1) for s in offline), RTOL[torch.float64])
    by_id: dict[int, float] = {}
    for t, s in zip(scored, offline):
        for i, v in zip(sample_ids(t).flatten().tolist(), s.flatten().tolist()):
            by_id[i] = by_id.get(i, 0.0) + v
    assert ledger.sample_totals.keys() == by_id.keys()
    assert_close(torch.tensor([ledger.sample_totals[i] for i in by_id]), torch.tensor(list(by_id.values())), RTOL[torch.float64])
    matrix = sum(dk.influence_matrix(run.trajectory, t, run.test, HOPS, q=q).sum(0) for t in scored)
    assert_close(ledger.matrix_totals, matrix, RTOL[torch.float64])


def test_memory_is_bounded_and_test_gradients_are_computed_once(run, monkeypatch) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    objective = ledger.recorder.objective
    computed_rows = []
    real = objective.test_grads
    monkeypatch.setattr(objective, "test_grads", lambda thetas, test: computed_rows.append(len(thetas)) or real(thetas, test))
    for t in run.trajectory.steps:
        feed(ledger, run, [t])
        assert len(ledger.recorder.trajectory().steps) <= HOPS + 1
        assert len(ledger._test_grads) <= HOPS
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
    feed(resumed, run, steps[5:])
    assert resumed.scored_steps == whole.scored_steps
    assert torch.equal(resumed.node_totals, whole.node_totals)
    assert torch.equal(resumed.matrix_totals, whole.matrix_totals)
    assert resumed.sample_totals == whole.sample_totals


def test_bad_sample_ids(run) -> None:
    ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, HOPS)
    r = run.trajectory[0]
    with pytest.raises(ValueError, match="sample_ids must be integer ids of shape \\(N, B\\) = \\(5, 4\\)"):
        ledger.record(0, run.trajectory.params(0), r.inputs, r.targets, r.lr, r.W, sample_ids=torch.zeros(5, 3, dtype=torch.long))
    assert ledger.recorder.trajectory().steps == ()  # nothing was recorded
