"""GPU suite (issue 3): kernels against the torch engine, side by side, in one run.

    make gpu-suite                  # on a CUDA machine: installs dicekern (no deps) and runs this
    python benchmarks/gpu_suite.py --smoke   # tiny sizes, CPU through TRITON_INTERPRET=1 (CI)

Measures the device's copy bandwidth (the ceiling), the mixing kernel's achieved bandwidth, the
MLP curvature kernel against the closed-form engine and torch.func, and the whole chain in one
launch (dice_e per_test, influence_matrix) against both torch engines, eager and in a CUDA graph or
torch.compile where they work. The model is an MLP features-hidden-classes with Tanh. Every result is checked against the torch engine before it is timed.
Prints a table and writes JSON to $OUT (or benchmarks/results/) as gpu_suite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

import dicekern as dk
from dicekern.bindings.gossip_mix import CSRMixing, gossip_mix
from dicekern.curvature.triton import TritonBackend
from dicekern.curvature.round import gossip_round
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.zoo import mlp
from timing import wall_seconds


def bench(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn: triton.testing.do_bench on CUDA, wall-clock medians elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(repeats, 20), return_mode="median") / 1e3
    times = sorted(wall_seconds(fn, repeats))
    return times[len(times) // 2]


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> float:
    """Relative max error against the torch engine; refuses to time a wrong kernel."""
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    if not error <= rtol:
        raise SystemExit(f"{name}: kernel differs from the torch engine by {error:.2e} > {rtol:.0e}; not timing it")
    return error


def mlp_run(n: int, hops: int, features: int, hidden: int, classes: int, batch: int, tests: int, device, dtype, seed: int = 0):
    """A recorded gossip run of the MLP under softmax cross-entropy, exponential graph, plain SGD."""
    g = torch.Generator().manual_seed(seed)
    rec = dk.Recorder(mlp(features, hidden, classes), dk.losses.softmax_cross_entropy, replay_check="off")
    obj = rec.objective
    theta = torch.randn(n, obj.layout.dim, generator=g, dtype=dtype) / features**0.5
    W = dk.topology.exponential(n).to(dtype)
    lr = torch.full((n,), 0.1, dtype=dtype)
    for t in range(hops + 1):
        x = torch.randn(n, batch, features, generator=g, dtype=dtype)
        y = torch.randint(classes, (n, batch), generator=g)
        rec.record(t, obj.layout.unflatten(theta.to(device)), x.to(device), y.to(device), lr=0.1, W=W.to(device))
        _, theta, _, _ = gossip_round(obj, rec.optimizer, theta, {}, x, y, lr, W)
    rec.record(hops + 1, obj.layout.unflatten(theta.to(device)))
    test = (torch.randn(tests, features, generator=g, dtype=dtype).to(device), torch.randint(classes, (tests,), generator=g).to(device))
    return rec.trajectory(), test


def copy_bandwidth(device, numel: int, repeats: int) -> dict:
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device, repeats)
    return {"bytes": 2 * src.numel() * 4, "seconds": seconds, "GB/s": 2 * src.numel() * 4 / seconds / 1e9}


def mixing_bandwidth(device, n: int, d: int, repeats: int) -> dict:
    W = dk.topology.exponential(n).float().to(device)
    V = torch.randn(n, d, device=device)
    mixing = CSRMixing.from_mixing(W)
    check("gossip_mix", gossip_mix(V, mixing), W @ V, 1e-5)
    seconds = bench(lambda: gossip_mix(V, mixing), device, repeats)
    moved = (mixing.col.numel() + n) * d * 4  # one read of V per non-zero, one write of out
    return {"N": n, "d": d, "nnz": mixing.col.numel(), "bytes": moved, "seconds": seconds, "GB/s": moved / seconds / 1e9}


def curvature_vs_torch(device, n: int, features: int, hidden: int, classes: int, batch: int, columns: int, repeats: int) -> dict:
    """The exact Hessian product of every node's batch loss: the MLP kernel, the closed-form engine, torch.func."""
    g = torch.Generator().manual_seed(1)
    model = mlp(features, hidden, classes)
    engines = {name: make(model, dk.losses.softmax_cross_entropy)
               for name, make in (("kernel", TritonBackend), ("closed_form", ClosedFormBackend), ("torch_func", TorchFuncBackend))}
    d = engines["kernel"].layout.dim
    thetas = (torch.randn(n, d, generator=g) / features**0.5).to(device)
    x = torch.randn(n, batch, features, generator=g).to(device)
    y = torch.randint(classes, (n, batch), generator=g).to(device)
    V = torch.randn(n, columns, d, generator=g).to(device)
    runs = {name: partial(engine.curvature_products, thetas, x, y, V, "exact") for name, engine in engines.items()}
    error = check("MLP curvature", runs["kernel"](), runs["torch_func"](), 1e-4)
    row = {"N": n, "columns": columns, "rel_error": error}
    row.update({f"{name}_s": bench(run, device, repeats) for name, run in runs.items()})
    row["speedup_vs_closed_form"] = row["closed_form_s"] / row["kernel_s"]
    return row


def torch_variants(fn, device) -> dict:
    """The torch engine eager, captured in a CUDA graph, and under torch.compile, where each works."""
    variants = {"eager": fn}
    if device.type != "cuda":
        return variants
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        variants["cuda_graph"] = graph.replay
    except Exception as failure:  # data-dependent host syncs cannot be captured
        variants["cuda_graph"] = f"n/a: {type(failure).__name__}: {str(failure)[:80]}"
    try:
        compiled = torch.compile(fn)
        compiled()
        variants["compile"] = compiled
    except Exception as failure:
        variants["compile"] = f"n/a: {type(failure).__name__}: {str(failure)[:80]}"
    return variants


def chain_vs_torch(device, n: int, objectives: int, features: int, hidden: int, classes: int, batch: int, hops: int, repeats: int) -> list[dict]:
    traj, test = mlp_run(n, hops, features, hidden, classes, batch, objectives, device, torch.float32)
    jobs = {
        "dice_e per_test": lambda backend: dk.dice_e(traj, 0, test, hops, per_test=True, backend=backend),
        "influence_matrix": lambda backend: dk.influence_matrix(traj, 0, test, hops, backend=backend),
    }
    rows = []
    for job, run in jobs.items():
        expected = run("torch")
        error = check(f"{job} N={n}", run("triton"), expected, 1e-4)
        t_kernel = bench(partial(run, "triton"), device, repeats)
        row = {"job": job, "N": n, "objectives": objectives, "rel_error": error, "one_launch_s": t_kernel}
        for engine in ("closed_form", "torch"):
            for name, variant in torch_variants(partial(run, engine), device).items():
                row[f"torch_{engine}_{name}_s"] = variant if isinstance(variant, str) else bench(variant, device, repeats)
        best = min(v for k, v in row.items() if k.startswith("torch_") and isinstance(v, float))
        row["speedup_vs_best_torch"] = best / t_kernel
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU interpreter check")
    if args.smoke:
        sizes = dict(nodes=[3], objectives=[1, 2], features=20, hidden=8, classes=3, batch=5, hops=2, mix=(8, 300), copy=1 << 16, repeats=2)
    else:
        sizes = dict(nodes=[16, 64, 256], objectives=[1, 512], features=512, hidden=128, classes=10, batch=64, hops=3, mix=(256, 1 << 18), copy=1 << 28, repeats=20)
    started = time.perf_counter()
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "date": date.today().isoformat(), "sizes": sizes,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    results["copy"] = copy_bandwidth(device, sizes["copy"], sizes["repeats"])
    results["mixing"] = mixing_bandwidth(device, *sizes["mix"], sizes["repeats"])
    results["mixing"]["fraction_of_copy"] = results["mixing"]["GB/s"] / results["copy"]["GB/s"]
    common = (sizes["features"], sizes["hidden"], sizes["classes"], sizes["batch"])
    results["curvature"] = [curvature_vs_torch(device, n, *common, 1, sizes["repeats"]) for n in sizes["nodes"]]
    results["chain"] = [
        row for n in sizes["nodes"] for m in sizes["objectives"]
        for row in chain_vs_torch(device, n, m, *common, sizes["hops"], sizes["repeats"])
    ]
    results["seconds_total"] = time.perf_counter() - started

    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_suite.json").write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, commit {results['commit']}, {results['date']}")
    print(f"copy {results['copy']['GB/s']:.0f} GB/s | mixing {results['mixing']['GB/s']:.0f} GB/s "
          f"({100 * results['mixing']['fraction_of_copy']:.0f}% of copy; target >= 60%)")
    for row in results["curvature"]:
        print(f"curvature N={row['N']:>3}: kernel {row['kernel_s'] * 1e3:.3f} ms, closed form {row['closed_form_s'] * 1e3:.3f} ms, "
              f"torch.func {row['torch_func_s'] * 1e3:.3f} ms ({row['speedup_vs_closed_form']:.1f}x the closed form)")
    print(f"{'job':<17} {'N':>4} {'M':>4} {'one launch ms':>14} {'closed form ms':>15} {'best torch / one launch':>24}")
    for row in results["chain"]:
        print(f"{row['job']:<17} {row['N']:>4} {row['objectives']:>4} {row['one_launch_s'] * 1e3:>14.3f} "
              f"{row['torch_closed_form_eager_s'] * 1e3:>15.3f} {row['speedup_vs_best_torch']:>23.1f}x")
    print(f"wrote {out_dir / 'gpu_suite.json'} ({results['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
