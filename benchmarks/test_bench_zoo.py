"""The zoo group (issue 18, item 4): dicekern's queries on paper-shaped models, side by side with
their FLOP floors and one vectorised training round, in one run.

    .venv/bin/python -m pytest benchmarks -q -o addopts= --benchmark-only -k zoo   # then benchmarks/ratios.py on its JSON

Setting (``zoo_workloads``): the zoo's default ResNet with GroupNorm ("resnet-gn", D = 19,994) and
ViT ("vit", D = 19,338), float32, 8 nodes on the exponential graph, batch 16, torch.optim SGD per
node with momentum 0.9 and weight decay 5e-4, recorded from the live models, round 1 scored with
hops 3 against the mean loss of 16 test points. One group per model; entries:

* ``round``: one vectorised training round (vmap over nodes of grad of the batch loss through
  functional_call, the momentum step, the mix), the unit of "x round";
* ``dice_e``, ``cascade`` (source 0's whole batch), ``influence_matrix``, ``dice_gt_samples`` (the
  16 samples of node 0 only, per hop), each next to ``<query>_floor``: the torch ops the query must
  do, run once each (``zoo_workloads`` says which), whose time is the floor's time.

"resnet-bn" (train-mode BatchNorm, the authors' model): the round and the four queries, and no
floor (``zoo_workloads.floors`` says why); its queries do the same convolutions as resnet-gn's.

Before anything is timed, the round must reproduce the recorded round of the live torch.optim
trainer, and every floor must return its query's numbers. Each entry stores in ``extra_info`` the
FLOPs it does (FlopCounterMode, matrix products and convolutions only, grouped convolutions'
backward corrected) and this machine's 1024^3 GEMM rate, so ``ratios.py`` also prints the floor as
FLOPs at the GEMM rate.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

import zoo_workloads as zw

MODELS = ("resnet-gn", "vit", "resnet-bn")
QUERIES = ("dice_e", "cascade", "influence_matrix", "dice_gt_samples")
CASES = [pytest.param(model, job, id=f"{model}-{job}") for model in MODELS
         for job in ("round", *(q + suffix for q in QUERIES for suffix in ("", "_floor")))
         if model != "resnet-bn" or not job.endswith("_floor")]
SECONDS_PER_ENTRY = 2.0  # each entry's timed rounds add up to about this (3 to 20 rounds)


@functools.cache
def gemm_rate() -> float:
    return zw.gemm_flops_per_second()


@functools.cache
def workloads(model: str) -> dict:
    """job -> fn() on the recorded run of model, checked: the round against the live trainer, each floor against its query."""
    run = zw.record(model)
    step_round = zw.training_round(run)
    theta, momentum = step_round(zw.STEP)
    for got, recorded in ((theta, run.theta[zw.STEP + 1]), (momentum, run.momentum[zw.STEP + 1])):
        assert (got - recorded).abs().max() <= 1e-5 * recorded.abs().max()
    jobs = {"round": lambda: step_round(zw.STEP), **zw.queries(run)}
    for query, floor in zw.floors(run).items():
        expected, got = jobs[query](), floor()
        rtol = 1e-3 if query == "dice_gt_samples" else 1e-4  # GT: differences of float32 losses
        assert got.shape == expected.shape and (got - expected).abs().max() <= rtol * expected.abs().max(), query
        jobs[f"{query}_floor"] = floor
    jobs["state_bytes"] = run.state_bytes
    return jobs


@pytest.mark.parametrize("model, job", CASES)
def test_zoo(benchmark, model: str, job: str) -> None:
    benchmark.group = f"zoo {model} float32 N={zw.N} B={zw.B} hops={zw.HOPS} M={zw.M}"
    jobs = workloads(model)
    fn = jobs[job]
    start = time.perf_counter()
    count = zw.flops(fn)  # also the warm-up call
    once = time.perf_counter() - start
    benchmark.extra_info.update(model=model, job=job, gflop=count / 1e9, gemm_gflops=gemm_rate() / 1e9,
                                threads=torch.get_num_threads(), state_mb=jobs["state_bytes"] / 2**20)
    benchmark.pedantic(fn, rounds=max(3, min(20, int(SECONDS_PER_ENTRY / once))), iterations=1, warmup_rounds=0)
