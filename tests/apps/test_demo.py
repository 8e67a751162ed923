"""The main job end to end, on a small configuration."""

from __future__ import annotations

import json

import pytest
import torch

import dicekern as dk
from conftest import TOL
from dicekern.apps.demo import DemoConfig, run_demo


def test_run_demo_writes_results_and_plots(tmp_path) -> None:
    lines: list[str] = []
    config = DemoConfig(num_nodes=6, step=4, hops=2, batch_size=6, gt_nodes=3, top=3)
    results = run_demo(tmp_path, config, progress=False, echo=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["per_hop"] == results["per_hop"] and len(saved["per_hop"]) == 3
    assert all(row["pearson_hop"] > 0.99 for row in saved["per_hop"])
    assert saved["cascade_vs_walks_rel_error"] < TOL[torch.float64].chain
    assert set(saved["last_layer"]) == {"pearson_vs_full_dice_e", "pearson_vs_dice_gt", "rel_error_vs_full_dice_e"}
    assert saved["samples"] == {"dice_e": 36, "dice_gt": 18}
    # the samples listed are the three lowest and highest DICE-E of the same run, recomputed
    run = dk.examples.digits_run(6, 6, batch_size=6, seed=0)
    total = dk.dice_e(run.trajectory, 4, run.test, 2)
    order = total.flatten().argsort()
    for listed, indices in ((saved["most_helpful"], order[:3]), (saved["most_harmful"], order.flip(0)[:3])):
        expected = [{"node": int(i) // 6, "sample": int(i) % 6, "label": int(run.trajectory[4].targets.flatten()[i]),
                     "dice_e": total.flatten()[i].item()} for i in indices]
        assert [(r["node"], r["sample"], r["label"]) for r in listed] == [(r["node"], r["sample"], r["label"]) for r in expected]
        assert [r["dice_e"] for r in listed] == pytest.approx([r["dice_e"] for r in expected], rel=TOL[torch.float64].same)
    for name in ("cascade.png", "e_vs_gt.png", "decay.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert any("pearson" in line for line in lines)
