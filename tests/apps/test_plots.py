"""Every picture is a whole PNG, drawn without touching the caller's matplotlib backend; layouts fit the topology."""

from __future__ import annotations

import math
import stat

import matplotlib
import matplotlib.figure
import numpy as np
import pytest
import torch

import dicekern as dk
from conftest import is_png, random_run

BACKEND = "svg"


@pytest.fixture(autouse=True)
def other_backend():
    """A caller's non-Agg backend, restored afterwards: no picture may switch it."""
    before = matplotlib.get_backend()
    matplotlib.use(BACKEND)
    yield
    matplotlib.use(before)


def assert_picture(written, expected) -> None:
    assert written == expected and is_png(expected)
    assert stat.S_IMODE(expected.stat().st_mode) == 0o644
    assert matplotlib.get_backend() == BACKEND
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]  # no temporary file left


@pytest.mark.parametrize("hops", [3, 0])
def test_cascade_on_graph(tmp_path, hops) -> None:
    flow = torch.randn(hops + 1, 7, generator=torch.Generator().manual_seed(hops), dtype=torch.float64)
    path = tmp_path / "new" / "folder" / "cascade.png"
    assert_picture(dk.plots.cascade_on_graph(dk.topology.ring(7), flow, 3, path, caption=f"run 1, round 2, hops {hops}"), path)


def test_estimate_vs_truth(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(3, 5, generator=g)
    path = tmp_path / "scatter.png"
    assert_picture(dk.plots.estimate_vs_truth(truth + 0.1 * torch.randn(3, 5, generator=g), truth, path, label="mine",
                                              caption="run 1"), path)


def test_estimate_vs_truth_per_hop(tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    truth = torch.randn(3, 2, 5, generator=g)
    path = tmp_path / "per_hop.png"
    assert_picture(dk.plots.estimate_vs_truth_per_hop(truth + 0.1 * torch.randn(3, 2, 5, generator=g), truth, path, caption="run 1"),
                   path)


def test_estimate_vs_truth_per_hop_of_a_recorded_run(tmp_path) -> None:
    run = random_run(5, 3, seed=3)
    nodes = [0, 2]
    estimate = dk.dice_e(run.trajectory, 0, run.test, 2, q=run.q, per_hop=True)[:, nodes]
    truth = dk.dice_gt_samples(run.trajectory, 0, run.test, 2, q=run.q, nodes=nodes, per_hop=True)
    path = tmp_path / "per_hop.png"
    assert_picture(dk.plots.estimate_vs_truth_per_hop(estimate, truth, path), path)


@pytest.mark.parametrize("function", [dk.plots.estimate_vs_truth, dk.plots.estimate_vs_truth_per_hop], ids=["total", "per-hop"])
def test_constant_scores_show_no_correlation(tmp_path, function) -> None:
    # a hop where every score is 0 has no correlation; warnings are errors under pytest.ini
    g = torch.Generator().manual_seed(4)
    truth = torch.cat([torch.zeros(1, 6), torch.randn(2, 6, generator=g)])
    path = tmp_path / "constant.png"
    assert_picture(function(torch.zeros(3, 6), truth, path), path)


def test_decay_over_hops(tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    per_hop = torch.randn(4, 6, 3, generator=g) * torch.tensor([1.0, 0.1, 0.01, 0.001])[:, None, None]
    path = tmp_path / "decay.png"
    assert_picture(dk.plots.decay_over_hops(per_hop, path, caption="run 1"), path)


@pytest.mark.parametrize("anomalous", [[1, 4], []], ids=["known", "unknown"])
def test_anomaly_ranking(tmp_path, anomalous) -> None:
    path = tmp_path / "anomaly.png"
    scores = torch.randn(6, generator=torch.Generator().manual_seed(6))
    assert_picture(dk.plots.anomaly_ranking(scores, anomalous, path, auc=0.5 if anomalous else None, caption="run 1"), path)


def test_influence_heatmap(tmp_path) -> None:
    path = tmp_path / "heatmap.png"
    matrix = torch.randn(7, 7, generator=torch.Generator().manual_seed(7))
    assert_picture(dk.plots.influence_heatmap(matrix, path, caption="run 1, round 2, hops 2"), path)


@pytest.mark.parametrize("nodes", [5, 23], ids=["legend", "5-labelled"])
def test_contribution_over_rounds(tmp_path, nodes) -> None:
    path = tmp_path / "rounds.png"
    per_round = torch.randn(4, nodes, generator=torch.Generator().manual_seed(8))
    assert_picture(dk.plots.contribution_over_rounds([2, 3, 5, 6], per_round, path, caption="run 1"), path)


def test_failed_write_keeps_the_old_picture(tmp_path, monkeypatch) -> None:
    path = tmp_path / "heatmap.png"
    dk.plots.influence_heatmap(torch.eye(3), path)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        dk.plots.influence_heatmap(-torch.eye(3), path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def permuted(W: torch.Tensor, seed: int) -> torch.Tensor:
    """W with its nodes renumbered at random, so that node order tells nothing about the graph."""
    order = torch.randperm(len(W), generator=torch.Generator().manual_seed(seed))
    return W[order][:, order]


def edges(W: torch.Tensor) -> list[tuple[int, int]]:
    return [(k, j) for k, j in (W != 0).nonzero().tolist() if k != j]


@pytest.mark.parametrize("W", [dk.topology.ring(7), permuted(dk.topology.ring(9), seed=9)], ids=["ring7", "ring9-permuted"])
def test_graph_layout_of_a_ring(W) -> None:
    n = len(W)
    positions = dk.plots.graph_layout(W)
    points = np.stack([positions[k] for k in range(n)])
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0)
    angles = np.arctan2(points[:, 1], points[:, 0])
    for k, j in edges(W):
        gap = abs(angles[k] - angles[j]) % (2 * math.pi)
        assert min(gap, 2 * math.pi - gap) == pytest.approx(2 * math.pi / n)


@pytest.mark.parametrize(("W", "shape"), [
    pytest.param(dk.topology.torus(4, 4), (4, 4), id="torus4x4"),
    pytest.param(permuted(dk.topology.torus(4, 4), seed=10), (4, 4), id="torus4x4-permuted"),
    pytest.param(permuted(dk.topology.torus(5, 3), seed=11), (3, 5), id="torus5x3-permuted"),
])
def test_graph_layout_of_a_torus(W, shape) -> None:
    positions = dk.plots.graph_layout(W)
    points = np.stack([positions[k] for k in range(len(W))])
    # cell of each node: the rank of its coordinate among the distinct ones, rows from the top
    cells = [np.unique(-points[:, 1], return_inverse=True)[1], np.unique(points[:, 0], return_inverse=True)[1]]
    assert sorted({(r, c) for r, c in zip(*cells)}) == [(r, c) for r in range(shape[0]) for c in range(shape[1])]
    for k, j in edges(W):
        steps = sorted(min(abs(a[k] - a[j]), size - abs(a[k] - a[j])) for a, size in zip(cells, shape))
        assert steps == [0, 1]


def test_graph_layout_of_a_torus_keeps_row_major_numbering() -> None:
    positions = dk.plots.graph_layout(dk.topology.torus(3, 4))
    assert [positions[k].tolist() for k in (0, 1, 4)] == [[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]]


def test_graph_layout_of_an_exponential_graph() -> None:
    positions = dk.plots.graph_layout(dk.topology.exponential(8))
    assert sorted(positions) == list(range(8))
    points = np.stack(list(positions.values()))
    assert points.shape == (8, 2) and np.isfinite(points).all()
    assert len({tuple(p.round(6)) for p in points}) == 8


ring, zeros = dk.topology.ring(5), torch.zeros


@pytest.mark.parametrize(("draw", "problem"), [
    pytest.param(lambda path: dk.plots.cascade_on_graph(zeros(5, 4), zeros(2, 5), 0, path), "W must be a square", id="W-not-square"),
    pytest.param(lambda path: dk.plots.cascade_on_graph(ring, zeros(2, 4), 0, path), "flow must have shape", id="flow-nodes"),
    pytest.param(lambda path: dk.plots.cascade_on_graph(ring, zeros(2, 5), 5, path), "source must be a node", id="source"),
    pytest.param(lambda path: dk.plots.estimate_vs_truth(zeros(2, 3), zeros(3, 2), path), "same non-empty shape", id="scatter-shapes"),
    pytest.param(lambda path: dk.plots.estimate_vs_truth_per_hop(zeros(3, 2, 4), zeros(2, 2, 4), path), "same non-empty shape",
                 id="per-hop-shapes"),
    pytest.param(lambda path: dk.plots.estimate_vs_truth_per_hop(zeros(3), zeros(3), path), "per hop", id="per-hop-flat"),
    pytest.param(lambda path: dk.plots.decay_over_hops(zeros(3), path), "per_hop must have shape", id="decay-flat"),
    pytest.param(lambda path: dk.plots.anomaly_ranking(zeros(2, 3), [], path), "scores must have shape", id="scores-2d"),
    pytest.param(lambda path: dk.plots.anomaly_ranking(zeros(4), [4], path), "anomalous node", id="anomalous-node"),
    pytest.param(lambda path: dk.plots.influence_heatmap(zeros(3, 4), path), "matrix must be a square", id="heatmap-not-square"),
    pytest.param(lambda path: dk.plots.contribution_over_rounds([0, 1, 2], zeros(2, 4), path), "steps must list", id="rounds-rows"),
    pytest.param(lambda path: dk.plots.contribution_over_rounds([0, 1], zeros(2), path), "per_round must have shape", id="rounds-flat"),
    pytest.param(lambda path: dk.plots.graph_layout(zeros(2, 3)), "W must be a square", id="layout-not-square"),
])
def test_bad_shapes_raise(tmp_path, draw, problem) -> None:
    path = tmp_path / "never.png"
    with pytest.raises(ValueError, match=problem):
        draw(path)
    assert not path.exists()


@pytest.mark.parametrize("contributions", [[-0.4, 0.1, -0.2, 0.3], [-1.0, -2.0]], ids=["with-harmful", "all-helpful"])
def test_contribution_shares(tmp_path, contributions) -> None:
    path = tmp_path / "shares.png"
    assert_picture(dk.plots.contribution_shares(dk.analysis.shares(torch.tensor(contributions)), path, caption="a run"), path)
