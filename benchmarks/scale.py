"""Scale benchmark (issues 4 and 10): dice_e for one round, hops 3, at N = 64, 256, 1024 on three graphs.

    python benchmarks/scale.py        # prints a markdown table, writes results/scale.json

Each configuration runs in a fresh subprocess. CPU tensors are invisible to tracemalloc, so the
peak is read from the process: the rise of its peak resident set (Linux ru_maxrss) over the first
dice_e call. That call also pays one-off set-up costs, so the table reports the rise above an N=2
run of the same graph. The walk count is what the paper's
walk-by-walk evaluation would enumerate per source; dice_e's cost should follow nnz(W)·D + N·HVP.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HOPS, BATCH, REPEATS, FEATURES = 3, 8, 5, 256  # MLP 256-32-10, D = 8554: big enough to see memory
NODES = (64, 256, 1024)
GRAPHS = ("ring", "exponential", "one_peer_exponential")


def measure(n: int, graph: str) -> dict:
    """Runs inside the subprocess: record a random run, time dice_e, read peak memory."""
    import torch
    from torch import nn

    import dicekern as dk

    make_w = {"ring": lambda t: dk.topology.ring(n), "exponential": lambda t: dk.topology.exponential(n),
              "one_peer_exponential": lambda t: dk.topology.one_peer_exponential(n, t)}[graph]
    g = torch.Generator().manual_seed(0)
    rec = dk.Recorder(nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 10)), dk.losses.softmax_cross_entropy, replay_check="off")
    dim = rec.objective.layout.dim
    for t in range(HOPS + 1):
        params = rec.objective.layout.unflatten(0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64))
        if t < HOPS:
            x, y = torch.randn(n, BATCH, FEATURES, generator=g, dtype=torch.float64), torch.randint(10, (n, BATCH), generator=g)
            rec.record(t, params, x, y, lr=0.1, W=make_w(t))
        else:
            rec.record(t, params)
    traj = rec.trajectory()
    test = (torch.randn(32, FEATURES, generator=g, dtype=torch.float64), torch.randint(10, (32,), generator=g))
    walks, reach = 0, torch.eye(n, dtype=torch.float64)
    for t in range(HOPS):
        reach = (traj[t].W != 0).double() @ reach
        walks += reach.sum().item() / n
    nnz = sum(int((traj[t].W != 0).sum()) for t in range(HOPS)) / HOPS
    rss_before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    dk.dice_e(traj, 0, test, HOPS)  # first call: pays torch.func's set-up and reaches the peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        dk.dice_e(traj, 0, test, HOPS)
        times.append(time.perf_counter() - start)
    return {"N": n, "graph": graph, "D": dim, "nnz": nnz, "walks_per_source": walks,
            "seconds": sorted(times)[REPEATS // 2], "peak_mb": peak - rss_before}


def run_one(n: int, graph: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(n), graph], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    rows = []
    for graph in GRAPHS:
        setup_mb = run_one(2, graph)["peak_mb"]
        for n in NODES:
            row = run_one(n, graph)
            row["peak_mb_above_setup"] = row["peak_mb"] - setup_mb
            rows.append(row)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "scale.json").write_text(json.dumps(rows, indent=1))
    print("| graph | N | nnz(W) | walks per source (<= 3 hops) | dice_e ms | µs per node | peak MB above N=2 | one (N, D) state MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        state_mb = r["N"] * r["D"] * 8 / 2**20
        print(f"| {r['graph']} | {r['N']} | {r['nnz']:.0f} | {r['walks_per_source']:.0f} | {r['seconds'] * 1e3:.1f} | "
              f"{r['seconds'] * 1e6 / r['N']:.1f} | {r['peak_mb_above_setup']:.0f} | {state_mb:.0f} |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
