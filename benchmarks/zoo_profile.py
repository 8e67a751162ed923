"""Where the queries' time goes on the zoo (issue 18, item 4): torch.profiler on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_profile.py      # prints markdown tables

For each zoo model with floors (``zoo_workloads``: 8 nodes, batch 16, hops 3, 16 test points,
float32), five warm calls of each query (dice_e, cascade, influence_matrix, dice_gt_samples) under
``torch.profiler.profile(activities=[CPU])``:

1. **Phases**: the torch engine's backend methods and the mixer, each wrapped in a
   ``record_function`` label for the profile (in this process only; dicekern's files are not
   touched): their total CPU time (children included) as a share of the query's. The rest is
   the optimizer algebra, the plan, the checks and Python.
2. **Ops**: the aten ops with the most self CPU time, and their share.
3. **Alternatives** (analysis of what would lift it, best of 5 warm calls side by side): one
   curvature product of all nodes by reverse over reverse (``vjp`` of ``grad``, the engine's) and
   by forward over reverse (``jvp`` of ``grad``); under torch.compile where it compiles.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch.autograd.profiler import record_function
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import dicekern.curvature.torch_func as torch_func
import dicekern.engine.mixing as mixing
import zoo_workloads as zw
from timing import wall_seconds

PHASES = {  # label -> (class, method)
    "batch gradients": (torch_func.TorchFuncBackend, "node_grads"),
    "test gradients": (torch_func.TorchFuncBackend, "test_grads"),
    "curvature products": (torch_func.TorchFuncBackend, "curvature_products"),
    "per-sample dots": (torch_func.TorchFuncBackend, "per_sample_dots"),
    "mixes": (mixing.TorchMixer, "__call__"),
    "test losses (DICE-GT)": (torch_func.TorchFuncBackend, "test_losses"),
}
CALLS, TOP = 5, 6


def label_phases() -> None:
    for label, (cls, name) in PHASES.items():
        method = getattr(cls, name)

        @functools.wraps(method)
        def labelled(*args, _method=method, _label=label, **kwargs):
            with record_function(_label):
                return _method(*args, **kwargs)

        setattr(cls, name, labelled)


def profile_query(run: zw.ZooRun, name: str) -> tuple[str, list[str]]:
    """(a row of the phase table: ms per call and each phase's share, top ops' rows) of query name."""
    query = zw.queries(run)[name]
    query()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(name):
            for _ in range(CALLS):
                query()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == name)
    spent = {label: sum(e.cpu_time_total for e in events if e.key == label) for label in PHASES}
    cells = [f"{100 * spent[label] / total:.0f}%" if spent[label] else "" for label in PHASES]
    phases = f"| {run.name} | {name} | {total / CALLS / 1e3:.1f} | {' | '.join(cells)} | {100 * (total - sum(spent.values())) / total:.0f}% |"
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    op_rows = [f"| {run.name} | {name} | {e.key} | {e.count // CALLS} | {e.self_cpu_time_total / CALLS / 1e3:.1f} | "
               f"{100 * e.self_cpu_time_total / total:.0f}% |" for e in ops]
    return phases, op_rows


def alternatives(run: zw.ZooRun) -> list[str]:
    model, unflatten = run.template, run.unflatten

    def mean_loss(theta, x, y):
        return F.cross_entropy(functional_call(model, unflatten(theta), (x,)), y)

    reverse = vmap(lambda th, x, y, v: vjp(lambda t: grad(mean_loss)(t, x, y), th)[1](v)[0])
    forward = vmap(lambda th, x, y, v: jvp(lambda t: grad(mean_loss)(t, x, y), (th,), (v,))[1])
    r = zw.STEP + 1
    args = (run.theta[r], run.inputs[r], run.targets[r], torch.randn_like(run.theta[r]))
    variants = {"reverse over reverse (the engine's)": lambda: reverse(*args), "forward over reverse": lambda: forward(*args),
                "one batch gradient of all nodes (for scale)": lambda: zw.Losses(run).grads(*args[:3])}
    if "--compile" in sys.argv:
        compiled = torch.compile(reverse)
        try:
            compiled(*args)
            variants["reverse over reverse, torch.compile"] = lambda: compiled(*args)
        except Exception as error:  # noqa: BLE001 - a report, not a failure
            print(f"{run.name}: torch.compile of the HVP failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    rows = []
    for label, fn in variants.items():
        rows.append(f"| {run.name} | {label} | {min(wall_seconds(fn, 5)) * 1e3:.1f} | {zw.flops(fn) / 1e9:.3f} |")
    return rows


if __name__ == "__main__":
    label_phases()
    phase_rows, op_rows, alt_rows = [], [], []
    for model in zw.SCORED:
        run = zw.record(model)
        for name in zw.queries(run):
            phases, ops = profile_query(run, name)
            phase_rows.append(phases)
            op_rows += ops
        alt_rows += alternatives(run)
        print(f"{model} done", file=sys.stderr, flush=True)
    print(f"threads: {torch.get_num_threads()}\n")
    print(f"| model | query | ms per call | {' | '.join(PHASES)} | the rest |\n|---|---|---:|{'---:|' * (len(PHASES) + 1)}\n"
          + "\n".join(phase_rows))
    print(f"\n| model | query | op (top {TOP} by self CPU time) | calls per query | self ms per call | share |\n|---|---|---|---:|---:|---:|\n"
          + "\n".join(op_rows))
    print("\n| model | one curvature product of all 8 nodes | best ms | GFLOP |\n|---|---|---:|---:|\n" + "\n".join(alt_rows))
