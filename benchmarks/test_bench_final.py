"""The final group (issue 19, item 4): whole-run attribution in one reverse sweep against the
per-round dice_e loop it replaces and against its floor, side by side in one run.

    .venv/bin/python -m pytest benchmarks -q -o addopts= --benchmark-only -k final   # then benchmarks/ratios.py on its JSON

Setting: ``dk.examples.digits_run(num_nodes=16, rounds=T, batch_size=16)`` in float32 (MLP 64-32-10
tanh, D = 2410, exponential graph, plain SGD lr 0.1), its 200 test digits, T = 8 (the loop is
36 hops). Entries:

* ``sweep``: ``dk.final_influence(traj, test)`` (the closed-form MLP engine, the default);
* ``sweep_torch``: the same on the torch.func engine (``backend="torch"``);
* ``loop``: ``dk.dice_e(traj, t, test, hops=T - t, per_hop=True)[-1]`` for t = 0..T-1;
* ``floor``: ``final_speed.floor``, the torch ops the sweep cannot avoid written with torch.func
  (one test gradient of all nodes, then per round the transposed mix, one JVP of the per-sample
  losses of all nodes and, but for round 0, one HVP of all nodes).

Every entry must return the sweep's (T, N, B) scores (1e-4 of scale) before anything is timed.
``benchmarks/final_speed.py`` times T = 12..96 and a zoo ResNet.
"""

from __future__ import annotations

import functools

import pytest
import torch

import final_speed as fs

T = 8
JOBS = ("sweep", "sweep_torch", "loop", "floor")


@functools.cache
def jobs() -> dict:
    run, momentum, weight_decay = fs.digits_workload(T, torch.float32)
    fns = {"sweep": fs.sweep(run), "sweep_torch": fs.sweep(run, "torch"), "loop": fs.loop(run), "floor": fs.floor(run, momentum, weight_decay)}
    expected = fns["sweep"]()
    for name, fn in fns.items():
        got = fn()
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4 * expected.abs().max(), name
    return fns


@pytest.mark.parametrize("job", JOBS)
def test_final(benchmark, job: str) -> None:
    benchmark.group = f"final digits float32 N=16 B=16 T={T} M=200"
    benchmark(jobs()[job])
