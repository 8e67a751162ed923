"""How far dice_e runs above its FLOP floor (issue 10).

    python benchmarks/flop_floor.py      # prints a markdown table

The floor of a call is its FLOPs at this machine's large-GEMM rate: FLOPs counted by
torch.utils.flop_counter.FlopCounterMode (matrix products only: elementwise work is not counted,
so the floor is optimistic) on the closed-form engine, whose products are the chain's algebra and
nothing else; the rate is the best of ten 1024^3 matmuls in the same dtype. Times are the best of
twenty warm calls. Setting: digits MLP 64-32-10, 16 nodes, exponential graph, batch 16, hops 3,
round 5, test objectives of M = 16 and 200 points.
"""

from __future__ import annotations


import torch
from torch.utils.flop_counter import FlopCounterMode

import dicekern as dk
from timing import wall_seconds
from dicekern.curvature.round import gossip_round

HOPS, STEP = 3, 5


def best_seconds(fn, repeats: int) -> float:
    return min(wall_seconds(fn, repeats))


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


if __name__ == "__main__":
    print("| dtype | M | dice_e GFLOP | x a training round | GEMM GFLOP/s | floor ms | closed_form ms (x floor) | torch ms (x floor) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float64, torch.float32):
        run = dk.examples.digits_run(num_nodes=16, rounds=STEP + HOPS + 1, batch_size=16, dtype=dtype)
        traj, rnd = run.trajectory, run.trajectory[STEP]
        square = torch.randn(1024, 1024, dtype=dtype)
        rate = 2 * 1024**3 / best_seconds(lambda: square @ square, 10)
        round_flops = flops(lambda: gossip_round(traj.objective, traj.optimizer, rnd.params, rnd.state, rnd.inputs, rnd.targets, rnd.lr, rnd.W))
        for m in (16, 200):
            test = (run.test[0][:m], run.test[1][:m])
            query = lambda backend: dk.dice_e(traj, STEP, test, HOPS, backend=backend)
            count = flops(lambda: query("closed_form"))
            floor = count / rate
            closed, reference = best_seconds(lambda: query("closed_form"), 20), best_seconds(lambda: query("torch"), 20)
            print(f"| {str(dtype).removeprefix('torch.')} | {m} | {count / 1e9:.3f} | {count / round_flops:.1f} | {rate / 1e9:.1f} | "
                  f"{floor * 1e3:.2f} | {closed * 1e3:.2f} ({closed / floor:.1f}x) | {reference * 1e3:.2f} ({reference / floor:.1f}x) |", flush=True)
