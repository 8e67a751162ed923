"""Deep hops against the learning rate, and exact refinement of the top-scored samples (issue 18, item 3).

    .venv/bin/python benchmarks/deep_hops/lr_and_refinement.py      # from the project root; ~10 min on 2 cores

Setting: ``benchmarks/zoo_fidelity.py``'s run (8 nodes, exponential graph, SGD momentum 0.9 +
weight decay 5e-4, float32, round 4 scored, hops 3, 64 test points) of the ResNets, at lr 0.05,
0.02 and 0.01 and batch 16 and 64; nodes 0 and 1. Per hop, Pearson of DICE-E against DICE-GT
("plain"), and of DICE-E with the top ``budget`` fraction of samples replaced by their exact
replay (the refinement a quarter of dice_gt_samples' cost buys), ranked by |DICE-E| of hops 2-3
("deep") or of the total ("total").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import zoo_fidelity as zf  # noqa: E402

import dicekern as dk  # noqa: E402

NODES, BUDGETS = [0, 1], (0.125, 0.25)


def refined(estimate: torch.Tensor, truth: torch.Tensor, budget: float, key: torch.Tensor) -> torch.Tensor:
    """(hops+1, nodes, B) estimate with the top budget fraction of samples by key (nodes, B) exact."""
    top = key.flatten().topk(max(1, round(budget * key.numel()))).indices
    result = estimate.clone().flatten(1)
    result[:, top] = truth.flatten(1)[:, top]
    return result.view_as(estimate)


def main() -> None:
    pearsons = lambda e, gt: " ".join(f"{dk.analysis.pearson(e[s], gt[s]):.4f}" for s in range(len(e)))
    for lr in (0.05, 0.02, 0.01):
        zf.LR = lr
        for name in ("resnet-gn", "resnet-bn"):
            for batch in (16, 64):
                traj, test, _ = zf.gossip_run(name, torch.float32, batch, zf.SIZES[name])
                e = dk.dice_e(traj, zf.STEP, test, zf.HOPS, per_hop=True)[:, NODES].double()
                gt = dk.dice_gt_samples(traj, zf.STEP, test, zf.HOPS, nodes=NODES, per_hop=True).double()
                print(f"{name} B={batch} lr={lr} plain {pearsons(e, gt)}", flush=True)
                for budget in BUDGETS:
                    for label, key in (("deep", e[2:].abs().sum(0)), ("total", e.sum(0).abs())):
                        print(f"  b={budget} {label}: {pearsons(refined(e, gt, budget, key), gt)}", flush=True)


if __name__ == "__main__":
    main()
