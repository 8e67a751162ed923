"""Peak memory of dice_e on the zoo (issue 18, item 4), in copies of all nodes' state, by chunk_size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_memory.py      # prints markdown tables

The peak is ``memory.py``'s: the largest rise of the process's in-use heap (glibc mallinfo2) read
after every torch operation of one warm call. The unit is one copy of all nodes' state, N x S x D
floats (S = 2: params and momentum buffers; float32), 1.22 MiB for the ResNet here. The target is
hops + 4 = 7 copies plus one chunk of per-sample work: the largest single vectorised call dice_e
makes on one chunk of k nodes (k hop-node pairs for the test gradients), measured alone with the
floors' functions (``zoo_workloads.Losses``): a curvature product, the per-sample JVP, the batch
gradients or the test gradients of k nodes. Setting: ``zoo_workloads`` (8 nodes, batch 16, hops 3,
16 test points). Next to it, the peak with the test gradients taken one hop at a time (the chain's
path for large runs, forced here by setting chain.BATCHED_TEST_GRADS_MAX_ELEMENTS to 0), and the
time of dice_e at each chunk_size, best of 5 warm calls side by side. With a chunk_size the chain
takes the test gradients one hop at a time by itself.
"""

from __future__ import annotations

import torch

import dicekern.engine.chain as chain
import dicekern as dk
import zoo_workloads as zw
from memory import peak_buffers
from timing import wall_seconds

CHUNK_SIZES = (None, 4, 2, 1)


def chunked(run: zw.ZooRun, chunk_size: int | None):
    """dice_e of the benchmark's query with chunk_size."""
    return lambda: dk.dice_e(run.traj, zw.STEP, run.test, zw.HOPS, chunk_size=chunk_size)


def hop_by_hop(fn):
    """fn with the chain taking the test gradients one hop at a time."""
    def patched():
        saved, chain.BATCHED_TEST_GRADS_MAX_ELEMENTS = chain.BATCHED_TEST_GRADS_MAX_ELEMENTS, 0
        try:
            return fn()
        finally:
            chain.BATCHED_TEST_GRADS_MAX_ELEMENTS = saved
    return patched


def one_chunk(run: zw.ZooRun, k: int, test_rows: int) -> dict:
    """label -> fn() of each vectorised call dice_e makes on a chunk: k nodes, test_rows hop-node pairs."""
    losses, t = zw.Losses(run), zw.STEP
    theta, x, y = run.theta[t][:k], run.inputs[t][:k], run.targets[t][:k]
    u = torch.randn_like(theta)
    points = torch.cat([run.theta[t + s] for s in range(zw.HOPS + 1)])[:test_rows]
    return {"curvature product": lambda: losses.hvps(theta, x, y, u), "per-sample JVP": lambda: losses.sample_dots(theta, x, y, u),
            "batch gradients": lambda: losses.grads(theta, x, y), "test gradients": lambda: losses.test_grads(points)}


if __name__ == "__main__":
    rows, times = [], []
    for model in zw.SCORED:
        run = zw.record(model)
        for chunk_size in CHUNK_SIZES:
            k = chunk_size or zw.N
            query = chunked(run, chunk_size)
            peaks = [peak_buffers(fn, run.state_bytes) for fn in (query, hop_by_hop(query))]
            chunk = {label: peak_buffers(fn, run.state_bytes) for label, fn in one_chunk(run, k, chunk_size or (zw.HOPS + 1) * zw.N).items()}
            largest = max(chunk, key=chunk.get)
            target = zw.HOPS + 4 + chunk[largest]
            rows.append(f"| {model} | {chunk_size} | {chunk[largest]:.1f} ({largest}) | {target:.1f} | "
                        + " | ".join(f"{peak:.1f} ({'met' if peak <= target else 'not met'})" for peak in peaks) + " |")
        seconds = {c: min(wall_seconds(chunked(run, c), 5)) for c in CHUNK_SIZES}
        times.append(f"| {model} | " + " | ".join(f"{seconds[c] * 1e3:.0f} ({seconds[c] / seconds[None]:.2f}x)" for c in CHUNK_SIZES) + " |")
        print(f"{model}: one state copy {run.state_bytes / 2**20:.2f} MiB", flush=True)
    print(f"\n| model | chunk_size | one chunk: its largest call | target: {zw.HOPS + 4} + one chunk | dice_e peak | "
          f"dice_e peak, test gradients hop by hop |\n|---|---|---:|---:|---:|---:|\n" + "\n".join(rows))
    print("\n| model | " + " | ".join(f"dice_e ms, chunk_size {c}" for c in CHUNK_SIZES) + " |\n|---|" + "---:|" * len(CHUNK_SIZES))
    print("\n".join(times))
