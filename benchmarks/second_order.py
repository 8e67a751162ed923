"""order=2 against order=1: relative error against DICE-GT per hop, and cost (issue 12).

    python benchmarks/second_order.py      # prints two markdown tables

Setting: digits MLP 64-32-10, 16 nodes, exponential graph, lr 0.1, batch 16, hops 3, the
200-digit test objective, float64. Whole batches: cascade of sources 0, 5, 10 at rounds 5, 15
and 30 against dk.dice_gt; samples: every sample of nodes 0, 4, 8, 12 at round 30 against
dk.dice_gt_samples. The error of hop s is ||e[s] - gt[s]|| / ||gt[s]|| over all of them. Times are
the best of five warm calls, both orders side by side.
"""

from __future__ import annotations

import torch

import dicekern as dk
from timing import wall_seconds

HOPS, STEPS, SOURCES, NODES = 3, (5, 15, 30), (0, 5, 10), [0, 4, 8, 12]


def errors(estimate: torch.Tensor, truth: torch.Tensor) -> list[float]:
    return [((e - g).norm() / g.norm()).item() for e, g in zip(estimate, truth)]


def main() -> None:
    run = dk.examples.digits_run(num_nodes=16, rounds=34, batch_size=16)
    traj, test = run.trajectory, run.test
    pairs = [(t, j) for t in STEPS for j in SOURCES]
    truth = torch.stack([dk.dice_gt(traj, t, j, test, HOPS) for t, j in pairs], dim=1)
    samples_truth = dk.dice_gt_samples(traj, STEPS[-1], test, HOPS, nodes=NODES, per_hop=True)
    print("| estimate | hop 0 | hop 1 | hop 2 | hop 3 |")
    print("|---|---:|---:|---:|---:|")
    for order in (1, 2):
        whole = torch.stack([dk.cascade(traj, t, j, test, HOPS, order=order) for t, j in pairs], dim=1)
        samples = dk.dice_e(traj, STEPS[-1], test, HOPS, per_hop=True, order=order)[:, NODES]
        for name, estimate, reference in (("whole batch", whole, truth), ("per sample", samples, samples_truth)):
            print(f"| {name}, order {order} | " + " | ".join(f"{100 * e:.2f}%" for e in errors(estimate, reference)) + " |")
    print("\n| query | order 1 ms | order 2 ms | ratio |")
    print("|---|---:|---:|---:|")
    queries = {
        "dice_e (all 256 samples)": lambda order: dk.dice_e(traj, STEPS[-1], test, HOPS, order=order),
        "cascade (one source)": lambda order: dk.cascade(traj, STEPS[-1], 0, test, HOPS, order=order),
        "influence_matrix (all sources)": lambda order: dk.influence_matrix(traj, STEPS[-1], test, HOPS, order=order),
    }
    for name, query in queries.items():
        first, second = (min(wall_seconds(lambda o=order: query(o), 5)) for order in (1, 2))
        print(f"| {name} | {first * 1e3:.1f} | {second * 1e3:.1f} | {second / first:.2f}x |")


if __name__ == "__main__":
    main()
