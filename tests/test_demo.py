"""The main job end to end, on a small configuration."""

from __future__ import annotations

import json

from dicekern.demo import DemoConfig, run_demo


def test_run_demo_writes_results_and_plots(tmp_path) -> None:
    lines: list[str] = []
    config = DemoConfig(num_nodes=6, step=4, hops=2, batch_size=6, gt_nodes=3, top=3)
    results = run_demo(tmp_path, config, progress=False, echo=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["per_hop"] == results["per_hop"] and len(saved["per_hop"]) == 3
    assert all(row["pearson_hop"] > 0.99 for row in saved["per_hop"])
    assert saved["cascade_vs_walks_rel_error"] < 1e-9
    assert set(saved["last_layer"]) == {"pearson_vs_full_dice_e", "pearson_vs_dice_gt", "rel_error_vs_full_dice_e"}
    assert saved["samples"] == {"dice_e": 36, "dice_gt": 18}
    helpful, harmful = saved["most_helpful"], saved["most_harmful"]
    assert len(helpful) == 3 and helpful[0]["dice_e"] <= helpful[-1]["dice_e"] <= harmful[-1]["dice_e"]
    for name in ("cascade.png", "e_vs_gt.png", "decay.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert any("pearson" in line for line in lines)
