"""Peak memory of dice_e and influence_matrix, in (N, D) buffers, on both torch engines.

    python benchmarks/memory.py       # prints a markdown table

The peak is the largest rise of the process's in-use heap (glibc mallinfo2: allocated small
blocks plus mmapped large ones) read after every torch operation of one warm call, divided by the
bytes of one (N, D) float64 tensor. Settings: N = 64 with an MLP 256-32-10 (D = 8554) and N = 16
with an MLP 1024-256-128-10 (D = 296,586); exponential graph, batch 8, hops 3, 32 test points.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dicekern as dk

HOPS, BATCH, TESTS = 3, 8, 32
SETTINGS = {"N=64 D=8554": (64, [256, 32, 10]), "N=16 D=296586": (16, [1024, 256, 128, 10])}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_bytes() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    """The largest rise of the in-use heap after any torch operation run inside the block."""

    def __enter__(self):
        self.base, self.peak = heap_bytes(), 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_bytes() - self.base)
        return out


def peak_buffers(fn, buffer_bytes: int) -> float:
    with PeakHeap():  # warm: lazily allocated library and dispatcher buffers are not the query's
        fn()
    with PeakHeap() as peak:
        fn()
    return peak.peak / buffer_bytes


def run(n: int, widths: list[int]):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    rec = dk.Recorder(nn.Sequential(*layers[:-1]).double(), dk.losses.softmax_cross_entropy, replay_check="off")
    g = torch.Generator().manual_seed(0)
    dim = rec.objective.layout.dim
    for t in range(HOPS + 1):
        params = rec.objective.layout.unflatten(0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64))
        if t < HOPS:
            x, y = torch.randn(n, BATCH, widths[0], generator=g, dtype=torch.float64), torch.randint(widths[-1], (n, BATCH), generator=g)
            rec.record(t, params, x, y, lr=0.1, W=dk.topology.exponential(n))
        else:
            rec.record(t, params)
    test = (torch.randn(TESTS, widths[0], generator=g, dtype=torch.float64), torch.randint(widths[-1], (TESTS,), generator=g))
    return rec.trajectory(), test


if __name__ == "__main__":
    print("| setting | engine | dice_e | influence_matrix |\n|---|---|---:|---:|")
    for setting, (n, widths) in SETTINGS.items():
        traj, test = run(n, widths)
        buffer = n * traj.objective.layout.dim * 8
        for engine in ("torch", "closed_form"):
            dice_e = peak_buffers(lambda: dk.dice_e(traj, 0, test, HOPS, backend=engine), buffer)
            matrix = peak_buffers(lambda: dk.influence_matrix(traj, 0, test, HOPS, backend=engine), buffer)
            print(f"| {setting} | {engine} | {dice_e:.1f} | {matrix:.1f} |", flush=True)
