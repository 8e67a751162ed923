"""Peak memory of dk.dice_gt_samples per chunk size, against dicekern.truth.ground_truth.replay_bytes.

    python benchmarks/dice_gt_memory.py

Each configuration runs in a fresh process; "peak MB" is the rise of the process's peak resident
set during the call. Models: the digits MLP 64-32-10 and a small CNN (D = 6373), 8 nodes, batch 16,
hops 3, float64, every sample of 4 nodes replayed.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import torch
from torch import nn

import dicekern as dk
from dicekern.truth.ground_truth import replay_bytes

NODES, BATCH, HOPS = 8, 16, 3


def model_of(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "cnn":
        layers = [nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(1024, 5)]
        return nn.Sequential(*layers).double(), (1, 16, 16)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5)).double(), (64,)


def measure(kind: str, chunk: int | None) -> None:
    model, shape = model_of(kind)
    rec = dk.Recorder(model, lambda o, y: nn.functional.cross_entropy(o, y, reduction="none"), replay_check="off")
    g = torch.Generator().manual_seed(0)
    theta = 0.1 * torch.randn(NODES, rec.objective.layout.dim, generator=g, dtype=torch.float64)
    for t in range(HOPS + 1):
        x = torch.randn(NODES, BATCH, *shape, generator=g, dtype=torch.float64)
        rec.record(t, rec.objective.layout.unflatten(theta), x, torch.randint(5, (NODES, BATCH), generator=g), lr=0.1,
                   W=dk.topology.exponential(NODES))
    rec.record(HOPS + 1, rec.objective.layout.unflatten(theta))
    traj = rec.trajectory()
    test = (torch.randn(20, *shape, dtype=torch.float64), torch.randint(5, (20,)))
    estimate = replay_bytes(traj, traj.window(0, HOPS))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dk.dice_gt_samples(traj, 0, test, HOPS, nodes=[0, 1, 2, 3], chunk_size=chunk)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"| {kind} | {traj.objective.layout.dim} | {chunk or 'auto'} | {estimate / 2**20:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        measure(sys.argv[1], None if sys.argv[2] == "auto" else int(sys.argv[2]))
    else:
        print("| model | D | chunk | estimated MiB per replay | peak MB |\n|---|---:|---:|---:|---:|", flush=True)
        for kind in ("mlp", "cnn"):
            for chunk in ("1", "16", "64", "auto"):
                subprocess.run([sys.executable, __file__, kind, chunk], check=True)
