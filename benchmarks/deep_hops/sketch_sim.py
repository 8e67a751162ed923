"""Prototype (simulated) of the cheap second-order lift: E1 - 1/2 Q_hat, Q_hat a p-probe sketch of the
test-curvature quadratic form Q_s(z) = sum_k q_k delta_lin^T H_test delta_lin.

Reads the per-sample results of deep_hops.py --full (the .res.pt next to its --json), takes the exact
Q = 2 (E1 - lin_exact) (second order in delta, measured), and replaces it by Q * chi2_p / p: the
distribution of a Fisher-probe sketch of a rank-one form with p probes (the worst case of Hutchinson's
variance). Prints Pearson and relative error per hop against GT for p = exact, 64, 16, 4.

Usage: .venv/bin/python benchmarks/deep_hops/sketch_sim.py /tmp/dh/q1_c16_full.json.res.pt
"""
import sys, torch

res = torch.load(sys.argv[1])
gt, e1, lin = res["GT"], res["E1"], res["lin_exact"]
Q = 2 * (e1 - lin)
g = torch.Generator().manual_seed(0)


def stats(est):
    out = []
    for s in range(gt.shape[0]):
        x, y = est[s].flatten(), gt[s].flatten()
        out.append((torch.corrcoef(torch.stack([x, y]))[0, 1].item(), ((x - y).norm() / y.norm()).item()))
    return out


for name, est in [("first order", e1), ("exact Q", e1 - Q / 2)]:
    print(f"{name:12s}", "  ".join(f"h{s} r={r:.4f} rel={rel:.3f}" for s, (r, rel) in enumerate(stats(est))))
for p in (64, 16, 4):
    draws = []
    for _ in range(200):
        chi = torch.randn(p, *Q.shape, generator=g, dtype=Q.dtype).pow(2).mean(0)
        draws.append(stats(e1 - Q * chi / 2))
    mean = torch.tensor(draws).mean(0)
    print(f"sketch p={p:<3d} ", "  ".join(f"h{s} r={r:.4f} rel={rel:.3f}" for s, (r, rel) in enumerate(mean.tolist())))
