"""The per-sample second-order estimate that exists today, against DICE-GT and its cost (issue 18, item 3).

    .venv/bin/python benchmarks/deep_hops/order2_per_sample.py      # from the project root; ~1 min

``dk.cascade(..., samples=[b], order=2)`` takes every hop's test-loss change of one sample by the
trapezoid on the linearised perturbation, 1/2 (g(θ) + g(θ − δ))ᵀ δ, at every reached (hop, node).
Setting: ``benchmarks/zoo_fidelity.py``'s resnet-gn run at batch 16, lr 0.05, nodes 0 and 1 (32
samples), float32 and float64. Prints Pearson and relative error per hop of DICE-E, of the
per-sample cascades at order 1 and 2, and the wall time of each against dice_gt_samples.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import zoo_fidelity as zf  # noqa: E402

import dicekern as dk  # noqa: E402

NODES, BATCH = [0, 1], 16


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    for dtype in (torch.float32, torch.float64):
        traj, test, _ = zf.gossip_run("resnet-gn", dtype, BATCH, zf.SIZES["resnet-gn"])
        e, e_s = timed(lambda: dk.dice_e(traj, zf.STEP, test, zf.HOPS, per_hop=True)[:, NODES].double())
        gt, gt_s = timed(lambda: dk.dice_gt_samples(traj, zf.STEP, test, zf.HOPS, nodes=NODES, per_hop=True).double())
        per_sample = lambda order: torch.stack([torch.stack([
            dk.cascade(traj, zf.STEP, j, test, zf.HOPS, samples=[b], order=order).sum(-1) for b in range(BATCH)], -1) for j in NODES], 1)
        (c1, c1_s), (c2, c2_s) = timed(lambda: per_sample(1)), timed(lambda: per_sample(2))
        print(f"resnet-gn {dtype}: dice_e {e_s:.2f}s, dice_gt_samples {gt_s:.2f}s, cascades order 1 {c1_s:.2f}s, order 2 {c2_s:.2f}s")
        for label, est in (("dice_e", e), ("cascade order 1", c1.double()), ("cascade order 2", c2.double())):
            print(f"  {label}: r " + " ".join(f"{dk.analysis.pearson(est[s], gt[s]):.4f}" for s in range(zf.HOPS + 1))
                  + " | rel " + " ".join(f"{dk.analysis.relative_error(est[s], gt[s]):.3f}" for s in range(zf.HOPS + 1)), flush=True)


if __name__ == "__main__":
    main()
