"""Whole-run attribution speed (issue 19, item 4): ``dk.final_influence`` (one reverse sweep)
against the per-round ``dk.dice_e`` loop it replaces and against its floor, side by side in one
process.

    .venv/bin/python benchmarks/final_speed.py              # tables (markdown) + results/final_speed.json
    .venv/bin/python benchmarks/final_speed.py --profile    # also where final_influence's time goes
    .venv/bin/python benchmarks/final_speed.py --threads 1  # steadier while another process holds a core

For a run recorded at rounds 0..T the three jobs return the same (T, N, B) scores (checked before
anything is timed):

* **sweep**: ``dk.final_influence(traj, test)``, one reverse sweep over the T rounds.
* **loop**: ``for t in range(T): dk.dice_e(traj, t, test, hops=T - t, per_hop=True)[-1]``, the
  per-round queries, sum over t of (T - t) hops: O(T^2) hops. Where the loop would take more than
  ``LOOP_BUDGET_S`` it is timed on every ``stride``-th round only and the sum is extrapolated
  (times ``stride``); the table says so ("extrapolated").
* **floor**: the torch ops the sweep cannot avoid, written here with torch.func (vmap over nodes,
  functional_call, ``zoo_workloads.Losses``: reverse-over-reverse HVPs, one JVP of the per-sample
  losses), nothing of dicekern's engine: one test gradient of every node at theta^T, then for
  tau = T-1 .. 0 the transposed mix, one JVP of every node's per-sample losses (the per-sample
  gradient dot products of round tau) and, for tau > 0, one curvature product of every node on
  one vector (T - 1 HVPs of all nodes in all: round 0's carry is never needed).

Workloads:

* **digits**: ``dk.examples.digits_run(num_nodes=16, rounds=T, batch_size=16, dtype=float32)``
  (MLP 64-32-10 tanh, D = 2410, exponential graph, plain SGD lr 0.1), the run's 200 test digits,
  T in (12, 24, 48, 96). Its default curvature backend is the closed-form MLP engine, so the
  sweep is also timed on the torch.func engine (``backend="torch"``) for comparison with a floor
  written in torch.func.
* **resnet-gn**: the zoo's default ResNet with GroupNorm (D = 19,994), float32, 8 nodes on the
  exponential graph, batch 16, torch.optim SGD per node (lr 0.05, momentum 0.9, weight decay
  5e-4) recorded live by ``zoo_workloads.record`` for T rounds, 16 test points, T in (12, 24, 48).

Times are the minimum over repeats (each job's repeats add up to about ``SECONDS_PER_JOB``, at
least 1 and at most 10, the loop's at most 3); every job is warmed up once first (the warm-up call
is the check). A loop whose checked call took more than ``SECONDS_PER_JOB`` is timed by that call
alone (dicekern and torch.func are warm from the smaller T's calls).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

import dicekern as dk
import zoo_workloads as zw

DIGITS_T = (12, 24, 48, 96)
ZOO_T = (12, 24, 48)
ZOO_MODEL = "resnet-gn"
SECONDS_PER_JOB = 3.0
LOOP_BUDGET_S = 180.0  # a loop predicted above this is timed on a subset of rounds and extrapolated
RESULTS = Path(__file__).parent / "results" / "final_speed.json"


# ---- runs ----

def digits_workload(T: int, dtype: torch.dtype) -> tuple[zw.ZooRun, float, float]:
    """The digits run as a ``zoo_workloads.ZooRun`` (so ``zw.Losses`` gives its torch.func ops):
    rounds 0..T's flat params, batches and mixing matrices. Returns (run, momentum, weight decay)."""
    run = dk.examples.digits_run(num_nodes=16, rounds=T, batch_size=16, dtype=dtype)
    traj = run.trajectory
    named = list(run.model.named_parameters())
    rounds = [traj[t] for t in range(T + 1)]
    return zw.ZooRun(name="digits", template=run.model, traj=traj, test=run.test, theta=[r.params for r in rounds],
                     momentum=[torch.zeros_like(r.params) for r in rounds], inputs=[r.inputs for r in rounds[:T]],
                     targets=[r.targets for r in rounds[:T]], W=[r.W for r in rounds[:T]], buffers=None,
                     names=[n for n, _ in named], shapes=[p.shape for _, p in named]), 0.0, 0.0


def zoo_workload(T: int) -> tuple[zw.ZooRun, float, float]:
    """``zoo_workloads.record`` of ZOO_MODEL for T rounds (its STEP + HOPS rounds, HOPS patched)."""
    with mock.patch.object(zw, "HOPS", T - zw.STEP):
        run = zw.record(ZOO_MODEL)
    assert len(run.W) == T and run.traj.steps[-1] == T
    return run, zw.MOMENTUM, zw.WEIGHT_DECAY


def lrs(run: zw.ZooRun) -> list[torch.Tensor]:
    """Every round's learning rate per node, (N, 1)."""
    return [run.traj[t].lr.reshape(-1, 1).to(run.theta[0].dtype) for t in range(len(run.W))]


# ---- the three jobs ----

def sweep(run: zw.ZooRun, backend: str | None = None):
    options = {} if backend is None else {"backend": backend}
    return lambda: dk.final_influence(run.traj, run.test, **options)


def loop(run: zw.ZooRun, rounds: range | None = None):
    T = len(run.W)
    rounds = range(T) if rounds is None else rounds
    return lambda: torch.stack([dk.dice_e(run.traj, t, run.test, hops=T - t, per_hop=True)[-1] for t in rounds])


def floor(run: zw.ZooRun, momentum: float, weight_decay: float):
    """fn() -> (T, N, B) by the floor's ops (module docstring). The adjoint of the state
    (params, momentum) at the start of round tau + 1 is (lam, lam_m); round tau's step is
    m' = mu m + g + wd theta, theta' = W (theta - lr m'), so with mu_ = W^T lam and
    u = lam_m - lr mu_ (the cotangent of m'): score = <grad loss_b, u> / B,
    lam <- mu_ + wd u + H u, lam_m <- mu u."""
    losses, T = zw.Losses(run), len(run.W)
    n, b = run.inputs[0].shape[:2]
    q = 1.0 / n
    lr = lrs(run)

    def fn() -> torch.Tensor:
        lam, lam_m = losses.test_grads(run.theta[T]).mul_(q), None
        scores = lam.new_empty(T, n, b)
        for tau in range(T - 1, -1, -1):
            mixed = run.W[tau].T @ lam
            u = -lr[tau] * mixed if lam_m is None else lam_m - lr[tau] * mixed
            x, y, theta = run.inputs[tau], run.targets[tau], run.theta[tau]
            scores[tau] = losses.sample_dots(theta, x, y, u).div_(b)
            if tau:
                lam = mixed + losses.hvps(theta, x, y, u)
                if weight_decay:
                    lam = lam + weight_decay * u
                lam_m = momentum * u if momentum else None
        return scores

    return fn


# ---- timing ----

def timed(fn, once: float, max_repeats: int = 10) -> tuple[float, int]:
    """(min seconds, repeats) of warm calls; repeats add up to about SECONDS_PER_JOB."""
    repeats = max(1, min(max_repeats, int(SECONDS_PER_JOB / max(once, 1e-9))))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, repeats


def first_call(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> float:
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert got.shape == expected.shape and err <= rtol, f"{name}: relative error {err:.2e} > {rtol:g}"
    return err


def measure(label: str, T: int, run: zw.ZooRun, momentum: float, weight_decay: float, predicted_loop: float | None,
            extra_backends: tuple[str, ...] = ()) -> dict:
    """One row: the sweep, the loop (or its extrapolation) and the floor of run, checked, then timed."""
    rtol = 1e-4 if run.theta[0].dtype == torch.float32 else 1e-9
    jobs = {"sweep": sweep(run), **{f"sweep_{b}": sweep(run, b) for b in extra_backends}, "floor": floor(run, momentum, weight_decay)}
    reference, once = first_call(jobs["sweep"])
    row = {"workload": label, "T": T, "N": run.inputs[0].shape[0], "B": run.inputs[0].shape[1], "D": run.dim,
           "dtype": str(run.theta[0].dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    firsts = {"sweep": once}
    for name, fn in jobs.items():
        if name != "sweep":
            out, firsts[name] = first_call(fn)
            row[f"{name}_rel_err"] = check(name, out, reference, rtol)
    for name, fn in jobs.items():
        row[f"{name}_s"], row[f"{name}_repeats"] = timed(fn, firsts[name])
    # the loop: whole, or every stride-th round and extrapolated
    stride = 1 if predicted_loop is None or predicted_loop <= LOOP_BUDGET_S else math.ceil(predicted_loop / (LOOP_BUDGET_S / 2))
    rounds = range(0, T, stride)
    out, once = first_call(loop(run, rounds))
    row["loop_rel_err"] = check("loop", out, reference[list(rounds)], rtol)
    if once >= SECONDS_PER_JOB:  # long loops: the checked call (warm from the smaller T's) is the measurement
        seconds, row["loop_repeats"] = once, 1
    else:
        seconds, row["loop_repeats"] = timed(loop(run, rounds), once, max_repeats=3)
    row["loop_s"], row["loop_stride"], row["loop_extrapolated"] = seconds * stride, stride, stride > 1
    row["loop_over_sweep"] = row["loop_s"] / row["sweep_s"]
    row["sweep_over_floor"] = row["sweep_s"] / row["floor_s"]
    row["sweep_s_per_round"] = row["sweep_s"] / T
    row["loop_hops"] = T * (T + 1) // 2
    print(f"  {label} T={T}: sweep {row['sweep_s']:.3f} s, loop {row['loop_s']:.2f} s"
          f"{' (extrapolated, every %d-th round)' % stride if stride > 1 else ''}, floor {row['floor_s']:.3f} s", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    extra = any("sweep_torch_s" in r for r in rows)
    head = "| workload | T | sweep s | loop s | floor s | loop/sweep | sweep/floor | sweep s per round |"
    head += " sweep (torch engine) s | torch sweep/floor |" if extra else ""
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if extra else "")]
    for r in rows:
        loop_s = f"{r['loop_s']:.2f}" + (f" (extrapolated, 1 round in {r['loop_stride']})" if r["loop_extrapolated"] else "")
        cells = [r["workload"], str(r["T"]), f"{r['sweep_s']:.3f}", loop_s, f"{r['floor_s']:.3f}", f"{r['loop_over_sweep']:.1f}x",
                 f"{r['sweep_over_floor']:.2f}x", f"{r['sweep_s_per_round'] * 1e3:.2f} ms"]
        if extra:
            cells += [f"{r['sweep_torch_s']:.3f}", f"{r['sweep_torch_s'] / r['floor_s']:.2f}x"] if "sweep_torch_s" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(rows: list[dict]) -> str:
    """Per workload: the exponent of T fitted through the first and last rows (1 linear, 2 quadratic)."""
    lines = []
    for label in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == label]
        if len(mine) < 2:
            continue
        a, z = mine[0], mine[-1]
        k = lambda key: math.log(z[key] / a[key]) / math.log(z["T"] / a["T"])
        lines.append(f"{label}: T {a['T']} -> {z['T']}: sweep time ~ T^{k('sweep_s'):.2f}, loop ~ T^{k('loop_s'):.2f}, "
                     f"floor ~ T^{k('floor_s'):.2f}; sweep per round {a['sweep_s_per_round'] * 1e3:.2f} -> {z['sweep_s_per_round'] * 1e3:.2f} ms")
    return "\n".join(lines)


# ---- profile ----

def label_phases() -> None:
    """zoo_profile's phase labels on the torch engine's methods and on the closed-form engine's
    methods of the same names (in this process only; dicekern's files are not touched)."""
    import zoo_profile
    from dicekern.curvature.closed_form import ClosedFormBackend

    zoo_profile.label_phases()
    closed_form = {label: (ClosedFormBackend, name) for label, (cls, name) in zoo_profile.PHASES.items()
                   if name in vars(ClosedFormBackend)}
    with mock.patch.object(zoo_profile, "PHASES", closed_form):
        zoo_profile.label_phases()


def profile(run: zw.ZooRun, label: str, calls: int = 3, top: int = 8) -> str:
    """torch.profiler of `calls` warm final_influence calls: the phases (the torch engine's backend
    methods, labelled as zoo_profile does) and the aten ops with the most self CPU time."""
    import zoo_profile
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn = sweep(run)
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("final_influence"):
            for _ in range(calls):
                fn()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "final_influence")
    lines = [f"{label}: {total / calls / 1e3:.1f} ms per call under the profiler"]
    phases = [(p, sum(e.cpu_time_total for e in events if e.key == p)) for p in zoo_profile.PHASES]
    lines.append("  phases: " + ", ".join(f"{p} {100 * t / total:.0f}%" for p, t in phases if t) +
                 f", the rest {100 * (total - sum(t for _, t in phases)) / total:.0f}%")
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines += [f"  {e.key}: {e.count // calls} calls, {e.self_cpu_time_total / calls / 1e3:.1f} ms, {100 * e.self_cpu_time_total / total:.0f}%"
              for e in ops]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="the digits runs' dtype (the zoo's is float32)")
    parser.add_argument("--digits-T", type=int, nargs="*", default=list(DIGITS_T))
    parser.add_argument("--zoo-T", type=int, nargs="*", default=list(ZOO_T))
    parser.add_argument("--profile", action="store_true", help="profile final_influence (digits T=24 and the zoo's first T)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    rows, profiles = [], []
    workloads = (("digits", args.digits_T, lambda T: digits_workload(T, dtype), ("torch",)), (ZOO_MODEL, args.zoo_T, zoo_workload, ()))
    for label, Ts, make, backends in workloads:
        previous = None
        for T in Ts:
            run, momentum, weight_decay = make(T)
            predicted = None if previous is None else previous["loop_s"] * (T / previous["T"]) ** 2
            previous = measure(label, T, run, momentum, weight_decay, predicted, backends)
            rows.append(previous)
    if args.profile:  # after the timings: the phase labels wrap the torch engine's methods
        label_phases()
        for label, Ts, make, _ in workloads:
            if Ts:
                T = 24 if 24 in Ts else Ts[0]
                profiles.append(profile(make(T)[0], f"{label} T={T}"))
    elapsed = time.perf_counter() - start
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; whole script {elapsed:.0f} s\n")
    print(table(rows) + "\n")
    print(growth(rows))
    for p in profiles:
        print("\n" + p)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                                    "seconds": elapsed, "rows": rows, "profiles": profiles}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
