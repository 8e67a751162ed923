"""Why deep hops of a GroupNorm ResNet lose per-sample Pearson (issue 18, item 3): measurements.

Trains the repro's GroupNorm ResNet (/work/shared/repro/gn_resnet_deep_hops.py) on 8 nodes, records
it, then for every sample of the chosen source nodes at round `step`:

  basic  : dk.dice_e(per_hop) vs dk.dice_gt_samples per hop (Pearson, relative error), the replay's
           nondeterminism (factual replay twice, and alone vs inside a vmapped batch of replays),
           and the cancellation |sum_k gt_k| / sum_k |gt_k| over receivers of each hop.
  --full : (float64) the per-sample error decomposition of DICE.md's hop terms, from replays of the
           run with the sample's weight w (1 factual, 0 removed), theta_k^{t+s}(w) for every k:
             delta_exact = theta(1) - theta(0)        delta_lin = d theta / dw at w = 1 (central FD)
           and the estimators, summed over receivers k with q_k = 1/N:
             GT        L(theta) - L(theta - delta_exact)               (the truth)
             E1        g(theta)^T delta_lin                            (DICE-E, first order)
             lin_exact L(theta) - L(theta - delta_lin)                 (test loss exact, dynamics linear)
             trap_lin  1/2 (g(theta) + g(theta - delta_lin))^T delta_lin  (= dk.cascade(order=2))
             E1_exact  g(theta)^T delta_exact                          (test loss linear, dynamics exact)
             taylor2   f'(1) - f''(1)/2     (f(w) the hop's summed test loss, both FD in w)
             mid       f'(1/2)              (derivative of the replay at w = 1/2, FD)
             taylor2_test  E1 - 1/2 sum_k delta_lin^T H_test delta_lin  (test part of f'' only)
             taylor2_dyn   E1 - 1/2 g^T theta''    (dynamics part of f'' only)
           so GT - E1 = (GT - lin_exact) [dynamics nonlinearity] + (lin_exact - E1) [test curvature].

Usage (project root): .venv/bin/python benchmarks/deep_hops/deep_hops.py [--C 16] [--blocks 1]
  [--dtype 64|32] [--act relu|gelu|softplus] [--momentum 0.9] [--batch 16] [--lr 0.05] [--seed 0]
  [--nodes 0 1] [--full] [--json out.json]
"""
import argparse, json, math, time
import torch
from torch import nn
from torch.func import vmap
import dicekern as dk
from dicekern.curvature.round import RoundUpdate, local_update, mix
from dicekern.curvature.torch_func import mean_weights
from dicekern.truth.ground_truth import _replay_test_losses

p = argparse.ArgumentParser()
p.add_argument("--C", type=int, default=16)
p.add_argument("--blocks", type=int, default=1, help="residual blocks per stage")
p.add_argument("--dtype", default="64")
p.add_argument("--act", default="relu")
p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--rounds", type=int, default=18)
p.add_argument("--step", type=int, default=12)
p.add_argument("--hops", type=int, default=3)
p.add_argument("--topology", default="ring")
p.add_argument("--nodes", type=int, nargs="+", default=[0, 1])
p.add_argument("--full", action="store_true")
p.add_argument("--h", type=float, default=1e-3, help="FD step in w (float64)")
p.add_argument("--json", default=None)
p.add_argument("--samples", type=int, default=0, help="score only the first k samples of each node (0: all, via dice_gt_samples)")
p.add_argument("--test", type=int, default=200)
p.add_argument("--no-check", action="store_true", help="skip the replay nondeterminism check")
a = p.parse_args()
torch.set_num_threads(2)
dtype = {"64": torch.float64, "32": torch.float32}[a.dtype]
torch.manual_seed(a.seed)
N, B, C = 8, a.batch, a.C
act = {"relu": nn.ReLU, "gelu": nn.GELU, "softplus": lambda: nn.Softplus(beta=4.0)}[a.act]


class Block(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False); s.n1 = nn.GroupNorm(4, c)
        s.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False); s.n2 = nn.GroupNorm(4, c)
        s.a1, s.a2 = act(), act()

    def forward(s, x):
        h = s.a1(s.n1(s.c1(x))); return s.a2(x + s.n2(s.c2(h)))


def make():
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.GroupNorm(4, C), act(),
                         *[Block(C) for _ in range(a.blocks)], nn.Conv2d(C, 2 * C, 3, stride=2, padding=1), act(),
                         *[Block(2 * C) for _ in range(a.blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * C, 10)).to(dtype)


m0 = make(); models = [make() for _ in range(N)]
for m in models: m.load_state_dict(m0.state_dict())
D = sum(p.numel() for p in m0.parameters())
opts = [torch.optim.SGD(m.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.wd) for m in models]
loss_fn = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
W = getattr(dk.topology, a.topology)(N).to(dtype)
rec = dk.Recorder(models[0], loss_fn, optimizer=opts)
g = torch.Generator().manual_seed(a.seed)
proto = torch.randn(10, 3, 12, 12, generator=g)


def data(shape):
    y = torch.randint(10, shape, generator=g)
    return (proto[y] + 1.0 * torch.randn(*shape, 3, 12, 12, generator=g)).to(dtype), y


def stacked(models):
    names = [n for n, _ in models[0].named_parameters()]
    return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}


t0 = time.time()
for t in range(a.rounds):
    x, y = data((N, B))
    rec.record(t, stacked(models), x, y, lr=dk.optim.stack_lr(opts), W=W, state=dk.optim.stack_state(opts, models))
    for k, (m, o) in enumerate(zip(models, opts)):
        o.zero_grad(); loss_fn(m(x[k]), y[k]).mean().backward(); o.step()
    half = stacked(models)
    with torch.no_grad():
        for k, m in enumerate(models):
            for n, prm in m.named_parameters(): prm.copy_(torch.einsum("j,j...->...", W[k], half[n]))
rec.record(a.rounds, stacked(models), state=dk.optim.stack_state(opts, models))
traj = rec.trajectory()
test = data((a.test,))
hops, step, nodes = a.hops, a.step, a.nodes
out = {"args": vars(a), "D": D, "train_s": time.time() - t0}
print(f"D={D} dtype={a.dtype} act={a.act} mom={a.momentum} B={B} lr={a.lr} seed={a.seed} nodes={nodes}", flush=True)


def stats(est, gt):
    """per hop: Pearson over samples, relative error ||est - gt|| / ||gt||."""
    res = []
    for s in range(gt.shape[0]):
        x, y = est[s].flatten().double(), gt[s].flatten().double()
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        res.append((round(r, 5), round(((x - y).norm() / y.norm()).item(), 4)))
    return res


t0 = time.time(); e = dk.dice_e(traj, step, test, hops, per_hop=True)[:, nodes]; out["dice_e_s"] = time.time() - t0
t0 = time.time()
if a.samples == 0:
    gt = dk.dice_gt_samples(traj, step, test, hops, nodes=nodes, per_hop=True)
else:  # the same replays as dice_gt_samples, for k samples per node only
    B = a.samples; e = e[..., :B]
    rounds_ = traj.window(step, hops)
    fac = _replay_test_losses(traj, rounds_, test, torch.ones(1, N, a.batch, dtype=dtype))[0]
    gt = torch.zeros(hops + 1, len(nodes), B, dtype=dtype)
    for i, j in enumerate(nodes):
        keep = torch.ones(B, N, a.batch, dtype=dtype)
        keep[torch.arange(B), j, torch.arange(B)] = 0
        gt[:, i] = ((fac - _replay_test_losses(traj, rounds_, test, keep)) / N).sum(-1).T
out["gt_s"] = time.time() - t0
out["E1_vs_gt"] = stats(e, gt)
for s, (r, rel) in enumerate(out["E1_vs_gt"]):
    print(f"  hop {s}: dice_e vs dice_gt_samples pearson {r:.5f} rel {rel:.3f}  |gt| {gt[s].abs().mean():.2e}", flush=True)
print(f"  times: dice_e {out['dice_e_s']:.1f}s  dice_gt_samples({len(nodes)} nodes) {out['gt_s']:.1f}s", flush=True)

# (b) nondeterminism: the factual replay twice, alone (K=1) and as row 0 of a vmapped batch of 8
rounds = traj.window(step, hops)
ones = torch.ones(1, N, a.batch, dtype=dtype)
if not a.no_check:
    L1, L2 = _replay_test_losses(traj, rounds, test, ones)[0], _replay_test_losses(traj, rounds, test, ones)[0]
    L8 = _replay_test_losses(traj, rounds, test, ones.repeat(8, 1, 1))
    out["replay_twice_maxdiff"] = (L1 - L2).abs().max().item()
    out["replay_K1_vs_K8_maxdiff"] = (L1 - L8[0]).abs().max().item() / N
    out["replay_rows_of_K8_maxdiff"] = (L8 - L8[0]).abs().max().item() / N
    out["gt_typical"] = gt.abs().mean().item()
    print(f"  replay twice max|dL| {out['replay_twice_maxdiff']:.1e}; q*|L(K=1) - L(K=8 row 0)| {out['replay_K1_vs_K8_maxdiff']:.1e};"
          f" rows of K=8 differ by {out['replay_rows_of_K8_maxdiff']:.1e}; mean |gt| {out['gt_typical']:.1e}", flush=True)

if a.full:
    objective = traj.objective

    def replay_points(keep):
        """(K, hops+1, N, D) theta^{t+1/2}, theta^{t+1}, ..., theta^{t+hops} of K replays (no BatchNorm)."""
        first = rounds[0]
        K = keep.shape[0]
        uniform = mean_weights(tuple(keep.shape), keep)
        expand = lambda v: v.expand(K, *v.shape)
        state = {n_: expand(v) for n_, v in first.state.items()}

        def rep(rnd, params, state, weights):
            upd = local_update(objective, traj.optimizer, params, state, rnd.inputs, rnd.targets, rnd.lr, weights, None)
            return upd.half, mix(upd, traj.optimizer, rnd.W, mix_state=traj.mix_state, mix_buffers=traj.mix_buffers)

        vr = vmap(rep, in_dims=(None, 0, 0, 0), out_dims=(0, RoundUpdate(0, 0, 0, None)))
        half, (_, theta, state, _) = vr(first, expand(first.params), state, keep * uniform)
        pts = [half, theta]
        for rnd in rounds[1:-1]:
            _, (_, theta, state, _) = vr(rnd, theta, state, uniform.expand(K, *uniform.shape[1:]))
            pts.append(theta)
        return torch.stack(pts[: len(rounds)], 1)

    h = a.h
    ws = [1.0, 0.0, 1 - h, 1 + h, 0.5 - h, 0.5 + h]
    q = 1.0 / N
    names = ["GT", "E1", "lin_exact", "trap_lin", "E1_exact", "taylor2", "taylor2_test", "taylor2_dyn", "mid", "trap_exact"]
    res = {n_: torch.zeros(hops + 1, len(nodes), B, dtype=torch.float64) for n_ in names}
    cancel = torch.zeros(hops + 1, len(nodes), B, dtype=torch.float64)
    dnl = torch.zeros(hops + 1, len(nodes), B, dtype=torch.float64)  # ||delta_exact - delta_lin|| / ||delta_exact||
    tl = lambda P: objective.test_losses(P.reshape(-1, P.shape[-1]), test).view(P.shape[:-1])
    tg = lambda P: objective.test_grads(P.reshape(-1, P.shape[-1]), test).view(P.shape)
    t0 = time.time()
    for i, j in enumerate(nodes):
        for b in range(B):
            keep = torch.ones(len(ws), N, a.batch, dtype=dtype)
            for r_, w in enumerate(ws): keep[r_, j, b] = w
            P = replay_points(keep)  # (6, hops+1, N, D)
            th, th0 = P[0], P[1]
            d_ex = th - th0
            d_lin = (P[3] - P[2]) / (2 * h)
            th2 = (P[3] - 2 * P[0] + P[2]) / h ** 2
            Lw = tl(P)  # (6, hops+1, N)
            G = tg(torch.stack([th, th - d_lin, th - d_ex]))
            gt_k = q * (Lw[0] - Lw[1])
            res["GT"][:, i, b] = gt_k.sum(-1)
            res["E1"][:, i, b] = q * (G[0] * d_lin).sum((-1, -2))
            res["lin_exact"][:, i, b] = q * (Lw[0] - tl(th - d_lin)).sum(-1)
            res["trap_lin"][:, i, b] = q * (0.5 * (G[0] + G[1]) * d_lin).sum((-1, -2))
            res["trap_exact"][:, i, b] = q * (0.5 * (G[0] + G[2]) * d_ex).sum((-1, -2))
            res["E1_exact"][:, i, b] = q * (G[0] * d_ex).sum((-1, -2))
            f1 = q * (Lw[3] - Lw[2]).sum(-1) / (2 * h)
            f2 = q * (Lw[3] - 2 * Lw[0] + Lw[2]).sum(-1) / h ** 2
            res["taylor2"][:, i, b] = f1 - 0.5 * f2
            gth2 = q * (G[0] * th2).sum((-1, -2))  # dynamics part of f''
            res["taylor2_dyn"][:, i, b] = f1 - 0.5 * gth2
            res["taylor2_test"][:, i, b] = f1 - 0.5 * (f2 - gth2)
            res["mid"][:, i, b] = q * (Lw[5] - Lw[4]).sum(-1) / (2 * h)
            cancel[:, i, b] = gt_k.sum(-1).abs() / gt_k.abs().sum(-1).clamp_min(1e-300)
            dnl[:, i, b] = (d_ex - d_lin).flatten(-2).norm(dim=-1) / d_ex.flatten(-2).norm(dim=-1).clamp_min(1e-300)
            print(f"  sample {b} done {time.time() - t0:.0f}s", flush=True) if b % 4 == 3 else None
        print(f"  node {j} replays done {time.time() - t0:.0f}s", flush=True)
    out["full_s"] = time.time() - t0
    out["gt_check"] = (res["GT"] - gt.double()).abs().max().item() / gt.abs().max().item()
    out["E1_check"] = (res["E1"] - e.double()).abs().max().item() / e.abs().max().item()
    print(f"  checks: my GT vs dice_gt_samples {out['gt_check']:.1e}, FD E1 vs dice_e {out['E1_check']:.1e}")
    out["cancel_median"] = cancel.flatten(1).median(1).values.tolist()
    out["dyn_nonlin_median"] = dnl.flatten(1).median(1).values.tolist()
    err = lambda x: ((x - res["GT"]).flatten(1).norm(dim=1) / res["GT"].flatten(1).norm(dim=1)).tolist()
    out["err_dynamics"] = err(res["GT"] - res["lin_exact"] + res["GT"])  # ||GT - lin_exact|| / ||GT||
    out["err_test_curv"] = err(res["lin_exact"] - res["E1"] + res["GT"])  # ||lin_exact - E1|| / ||GT||
    print("  cancellation |sum_k gt_k|/sum_k|gt_k| (median) per hop:", [f"{c:.2f}" for c in out["cancel_median"]])
    print("  ||d_exact - d_lin||/||d_exact|| (median) per hop:", [f"{c:.3f}" for c in out["dyn_nonlin_median"]])
    print("  error split per hop, ||GT - lin_exact||/||GT|| (dynamics):", [f"{c:.3f}" for c in out["err_dynamics"]],
          " ||lin_exact - E1||/||GT|| (test curvature):", [f"{c:.3f}" for c in out["err_test_curv"]])
    out["estimators"] = {}
    for n_ in names[1:]:
        out["estimators"][n_] = stats(res[n_], res["GT"])
        print(f"  {n_:13s} " + "  ".join(f"h{s} r={r:.4f} rel={rel:.3f}" for s, (r, rel) in enumerate(out["estimators"][n_])), flush=True)
    torch.save(res, (a.json or "/tmp/dh/res") + ".res.pt")
if a.json:
    json.dump(out, open(a.json, "w"), indent=1)
