"""Every picture is written as a non-empty PNG."""

from __future__ import annotations

import torch

import dicekern as dk


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_pictures_are_written(tmp_path) -> None:
    run = dk.examples.digits_run(num_nodes=6, rounds=4, batch_size=4, hidden=8)
    flow = dk.cascade(run.trajectory, 0, 2, run.test, 3)
    per_hop = dk.dice_e(run.trajectory, 0, run.test, 3, per_hop=True)
    truth = dk.dice_gt_samples(run.trajectory, 0, run.test, 3, nodes=[0, 1])
    paths = [
        dk.plots.cascade_on_graph(run.trajectory[0].W, flow, 2, tmp_path / "a" / "cascade.png"),
        dk.plots.estimate_vs_truth(per_hop.sum(0)[:2], truth, tmp_path / "scatter.png"),
        dk.plots.decay_over_hops(per_hop, tmp_path / "decay.png"),
        dk.plots.anomaly_ranking(torch.randn(6), [1, 4], tmp_path / "anomaly.png", auc=0.5),
    ]
    assert all(is_png(p) for p in paths)
