"""Proximal influence and reciprocity against their definitions written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

import dicekern as dk
from conftest import TOL, assert_close, random_run


def test_proximal_influence_is_definition_4() -> None:
    run = random_run(5, rounds=2, seed=23)
    traj, q = run.trajectory, run.q
    obj, r0, r1 = traj.objective, traj[0], traj[1]

    def grad(theta, x, y):
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(obj.mean_loss(th, x, y), th)[0]

    expected = torch.zeros(5, 5, dtype=torch.float64)
    for j in range(5):
        local = grad(r0.params[j], r0.inputs[j], r0.targets[j])
        for k in range(5):
            if r0.W[k, j] != 0:
                expected[j, k] = -r0.lr[j] * r0.W[k, j] * q[k] * local @ grad(r1.params[k], *run.test)
    assert_close(dk.analysis.proximal_influence(traj, 0, run.test, q=q), expected, TOL[torch.float64].chain)


def test_reciprocity_by_hand() -> None:
    influence = torch.tensor([[5.0, 2.0, 0.0], [-1.0, 7.0, 3.0], [4.0, 6.0, 9.0]], dtype=torch.float64)
    r = dk.analysis.reciprocity(influence)
    assert r.edge[0, 1] == -2.0 and r.edge[1, 0] == -0.5 and r.edge[1, 2] == 0.5
    assert math.isnan(r.edge[0, 2]) and math.isnan(r.edge[0, 0])
    torch.testing.assert_close(r.given, torch.tensor([2.0, 2.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(r.received, torch.tensor([3.0, 8.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(r.node, torch.tensor([2 / 3, 0.25, 10 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        dk.analysis.reciprocity(torch.zeros(2, 3))


def test_node_scores_sum_influence_on_other_nodes() -> None:
    run = random_run(4, rounds=4, seed=29)
    scores = dk.analysis.node_scores(run.trajectory, [0, 1], run.test, 2, q=run.q)
    expected = torch.zeros(4, dtype=torch.float64)
    for t in (0, 1):
        m = dk.influence_matrix(run.trajectory, t, run.test, 2, q=run.q)
        for j in range(4):
            expected[j] += sum(m[s, j, k] for s in (1, 2) for k in range(4) if k != j)
    assert_close(scores, expected, TOL[torch.float64].chain)
    with pytest.raises(ValueError, match="hops >= 1"):
        dk.analysis.node_scores(run.trajectory, [0], run.test, 0)


def test_detection_auc_by_hand() -> None:
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3])
    assert dk.analysis.detection_auc(scores, [0, 2]) == 1.0
    assert dk.analysis.detection_auc(scores, [1, 3]) == 0.0
    assert dk.analysis.detection_auc(scores, [0, 3]) == 0.75
    with pytest.raises(ValueError, match="both anomalous and normal"):
        dk.analysis.detection_auc(scores, [0, 1, 2, 3])


def test_anomaly_experiment_reports_an_auc_per_seed_and_hops() -> None:
    """Every reported score and AUC is the one recomputed from the same corrupted run."""
    results = dk.analysis.anomaly_experiment("flip", [0, 1], num_nodes=6, corrupted=2, rounds=8, scored_from=3, hops=(1, 2))
    assert set(results["auc"]) == {1, 2} and all(len(v) == 2 for v in results["auc"].values())
    for index, seed in enumerate([0, 1]):
        entry = results["runs"][index]
        assert entry["seed"] == seed and len(entry["anomalous"]) == 2
        run = dk.examples.digits_run(6, 8, seed=seed, corrupt={b: "flip" for b in entry["anomalous"]})
        for h in (1, 2):
            scores = dk.analysis.node_scores(run.trajectory, range(3, 8 - h + 1), run.test, h)
            assert_close(torch.tensor(entry["scores"][h], dtype=torch.float64), scores, TOL[torch.float64].same)
            assert results["auc"][h][index] == dk.analysis.detection_auc(scores, entry["anomalous"])


def test_corrupted_digits() -> None:
    clean = dk.examples.digits_run(num_nodes=4, rounds=1, batch_size=6, seed=3)
    flipped = dk.examples.digits_run(num_nodes=4, rounds=1, batch_size=6, seed=3, corrupt={1: "flip"})
    assert torch.equal(clean.trajectory[0].inputs, flipped.trajectory[0].inputs)
    labels_clean, labels_flipped = clean.trajectory[0].targets, flipped.trajectory[0].targets
    assert (labels_clean[1] != labels_flipped[1]).all() and torch.equal(labels_clean[0], labels_flipped[0])
    with pytest.raises(ValueError, match="nodes are 0..3"):
        dk.examples.digits_run(num_nodes=4, rounds=1, corrupt={4: "flip"})
    with pytest.raises(ValueError, match="must be one of"):
        dk.examples.digits_run(num_nodes=4, rounds=1, corrupt={0: "erase"})


def test_free_riders_mislabels_exclusions_and_sample_ids() -> None:
    clean = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=6, seed=3)
    features, labels = dk.examples.digits_split(4, seed=3)[1:3]
    ids = clean.sample_ids  # (rounds, N, B) digits of every batch entry
    assert ids.shape == (3, 4, 6)
    assert torch.equal(clean.trajectory[1].targets, torch.as_tensor(labels)[ids[1]])
    assert torch.allclose(clean.trajectory[1].inputs, torch.as_tensor(features, dtype=torch.float64)[ids[1]])
    rider = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=6, seed=3, corrupt={2: "free_rider"})
    assert len(rider.sample_ids[:, 2].unique()) == 2 and len(rider.sample_ids[:, 1].unique()) > 2
    noisy = dk.examples.digits_run(num_nodes=4, rounds=1, batch_size=6, seed=3, mislabel={0: 0.25, 3: 0.5})
    pools = dk.examples.digits_split(4, seed=3)[0]
    for node, fraction in ((0, 0.25), (3, 0.5), (1, 0.0)):
        assert noisy.mislabeled[pools[node]].sum() == round(fraction * len(pools[node]))
    wrong = noisy.mislabeled.nonzero().flatten()
    assert not noisy.mislabeled[pools[1]].any() and len(wrong) > 0
    left_out = pools[2][:30].tolist()
    without = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=6, seed=3, mislabel={0: 0.25, 3: 0.5}, exclude=left_out)
    assert not set(without.sample_ids.flatten().tolist()) & set(left_out)
    assert torch.equal(without.mislabeled, noisy.mislabeled)  # the same digits stay mislabelled
    with pytest.raises(ValueError, match="mislabel\\[0\\] must be a fraction in \\[0, 1\\]"):
        dk.examples.digits_run(num_nodes=4, rounds=1, mislabel={0: 1.5})


def test_shares_keep_harmful_nodes_negative() -> None:
    """Benefit is minus the contribution; shares divide it by the sum of |benefit|, so a harmful
    node's share is negative, not clipped, and the harmful nodes are listed, worst first."""
    contributions = torch.tensor([-0.4, 0.1, -0.2, 0.3], dtype=torch.float64)
    split = dk.analysis.shares(contributions)
    assert_close(split.benefit, -contributions, 0.0)
    assert_close(split.share, torch.tensor([0.4, -0.1, 0.2, -0.3], dtype=torch.float64), 1e-15)
    assert split.harmful == [3, 1]
    assert split.share.abs().sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("bad, error, needle", [
    (torch.zeros(3), ValueError, "nothing to share"), (torch.ones(2, 2), ValueError, "shape"),
    (torch.tensor([1.0, float("nan")]), ValueError, "NaN"), ([1.0, 2.0], TypeError, "tensor"),
])
def test_shares_refuse_what_they_cannot_split(bad, error, needle) -> None:
    with pytest.raises(error, match=needle):
        dk.analysis.shares(bad)
