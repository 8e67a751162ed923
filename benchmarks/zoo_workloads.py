"""The zoo benchmarks' workloads (issue 18, item 4): a recorded run, one vectorised training round,
and the FLOP floor of every query, written here with torch.func and nothing of dicekern's engine.

Imported by ``test_bench_zoo.py`` (the pytest-benchmark group "zoo"), ``zoo_memory.py`` and
``zoo_profile.py``; run as scripts, they import it as ``zoo_workloads``.

Setting: the zoo's default (paper-shaped, CPU-sized) models, float32, N = 8 nodes on the
exponential graph (in-degree 3 plus self), batch B = 16, torch.optim SGD per node with momentum
0.9 and weight decay 5e-4 (lr 0.05), recorded from the live models with ``rec.record(t, models, x,
y, W=W, optimizers=opts)`` and gossiped with ``dk.mix_``; round STEP = 1 is scored (its momentum
buffers have history) with hops 3 against the mean loss of M = 16 test points.

**The floor of a query** is the torch ops it must do, each once, on all nodes at once (vmap over
nodes, no Python loop over nodes or samples), with what the graph's sparsity lets it skip:

* ``dice_e`` (adjoint, momentum SGD): one batch gradient of every node at round t (the half step
  where hop 0's test gradient is read), the test gradients of every node at hops 0..r (one vmapped
  call), one curvature product of every node for each of hops 2..r (r - 1 = 2: round t's step
  enters only through the displacement, hop 1 is the mix alone), the r transposed mixes, the
  momentum step's elementwise cotangent, and one JVP of the per-sample losses of every node (the
  per-sample gradient dot products, with no per-sample gradient stored).
* ``cascade`` (one source's whole batch, forward): the source's batch gradient (its displacement
  and its half step), at hop s >= 2 one curvature product at each node the theta perturbation has
  reached, the test gradient at each (hop, node) pair it has reached, the mixes.
* ``influence_matrix`` (every source, forward, sources as columns): every node's batch gradient,
  the test gradients of every node at hops 0..r, at hop s >= 2 one curvature product per (node,
  source) pair the perturbation has reached (not per node and source), the mixes and the dots.
* ``dice_gt_samples`` of one node's B samples (exact replay of each removal): the factual half
  steps and test losses where a removal can change anything, and for each of the B removals (one
  vmapped call per round) the batch gradients and test losses of only the nodes whose params or
  momentum it has reached (hop 0 the source, then its out-neighbours, ...), the mixes of the
  changed rows.

A curvature product is a Hessian-vector product of the node's batch-mean loss, reverse over
reverse (``vjp`` of ``grad``), the form dicekern's torch engine uses. Each floor function returns
the query's numbers, and ``test_bench_zoo.py`` checks them against dicekern's before timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import dicekern as dk
from dicekern import zoo

N, B, HOPS, STEP, M = 8, 16, 3, 1, 16
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
DTYPE = torch.float32
SCORED = ("resnet-gn", "vit")  # with floors (profiled, memory measured); resnet-bn has none (``floors``)
GT_NODE = 0  # dice_gt_samples of this node's B samples
CASCADE_SOURCE = 0


@dataclass
class ZooRun:
    """A recorded run and, taken from the live models and optimizers, every round's flat params and
    momentum buffers (N, D) in named_parameters order, batches, mixing matrices, and BatchNorm buffers."""

    name: str
    template: nn.Module
    traj: dk.Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    theta: list[torch.Tensor]  # rounds 0..STEP+HOPS
    momentum: list[torch.Tensor]
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    W: list[torch.Tensor]
    buffers: list[dict[str, torch.Tensor]] | None  # name -> (N, *shape), BatchNorm models only
    names: list[str]
    shapes: list[torch.Size]

    @property
    def dim(self) -> int:
        return self.theta[0].shape[1]

    @property
    def state_bytes(self) -> int:
        """One copy of all nodes' state: N x S x D floats (S = 2: params and momentum)."""
        return 2 * self.theta[0].numel() * self.theta[0].element_size()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """(D,) -> name -> shape, views."""
        return {n: p.view(s) for n, p, s in zip(self.names, theta.split([s.numel() for s in self.shapes]), self.shapes)}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def record(name: str, seed: int = 0) -> ZooRun:
    """Train N nodes of zoo model name for STEP+HOPS rounds with torch.optim SGD (momentum, weight
    decay) per node and dk.mix_, recording every round from the live models."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    models = [zoo.build(name, DTYPE) for _ in range(N)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) for m in models]
    rec = dk.Recorder(models[0], dk.losses.softmax_cross_entropy, optimizer=opts)
    W = dk.topology.exponential(N, dtype=DTYPE)
    theta, momentum, inputs, targets, buffers = [], [], [], [], []
    has_buffers = any(True for _ in models[0].buffers())

    def snapshot() -> None:
        theta.append(_flat(list(dk.stack_params(models).values())))
        bufs = [[o.state[p].get("momentum_buffer") if p in o.state else None for p in m.parameters()] for m, o in zip(models, opts)]
        momentum.append(torch.stack([torch.cat([(torch.zeros_like(p) if b is None else b).flatten() for p, b in zip(m.parameters(), bs)])
                                     for m, bs in zip(models, bufs)]).detach().clone())
        if has_buffers:
            buffers.append({k: v.clone() for k, v in dk.stack_buffers(models).items()})

    for t in range(STEP + HOPS):
        x, y = zoo.random_data(name, N, B, generator=g, dtype=DTYPE)
        snapshot()
        inputs.append(x), targets.append(y)
        rec.record(t, models, x, y, W=W, optimizers=opts)
        for k, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            F.cross_entropy(model(x[k]), y[k]).backward()
            opt.step()
        dk.mix_(models, W)
    snapshot()
    rec.record(STEP + HOPS, models, optimizers=opts)
    test = zoo.random_data(name, M, generator=g, dtype=DTYPE)
    template = zoo.build(name, DTYPE)
    named = list(template.named_parameters())
    return ZooRun(name, template, rec.trajectory(), test, theta, momentum, inputs, targets, [W] * (STEP + HOPS),
                  buffers if has_buffers else None, [n for n, _ in named], [p.shape for _, p in named])


# ---- the model's losses as functions of one node's flat params (D,) ----

class Losses:
    """Batch, per-sample and test losses of run's model, and their derivatives batched over nodes."""

    def __init__(self, run: ZooRun):
        self.run = run
        model, unflatten = run.template, run.unflatten
        test_x, test_y = run.test

        def batch_loss(theta, x, y, w):  # sum_b w_b loss_b
            return (w * F.cross_entropy(functional_call(model, unflatten(theta), (x,)), y, reduction="none")).sum()

        def mean_loss(theta, x, y):
            return F.cross_entropy(functional_call(model, unflatten(theta), (x,)), y)

        def test_loss(theta):
            return F.cross_entropy(functional_call(model, unflatten(theta), (test_x,)), test_y)

        def hvp(theta, x, y, v):  # reverse over reverse, as dicekern's torch engine
            return vjp(lambda th: grad(mean_loss)(th, x, y), theta)[1](v)[0]

        def sample_dots(theta, x, y, v):  # grad loss_b^T v for every b: one JVP of the per-sample losses
            return jvp(lambda th: F.cross_entropy(functional_call(model, unflatten(th), (x,)), y, reduction="none"), (theta,), (v,))[1]

        self.test_loss = test_loss
        self.grads = vmap(grad(mean_loss))  # (N, D), (N, B, ...), (N, B) -> (N, D)
        self.weighted_grads = vmap(grad(batch_loss))  # with weights (N, B)
        self.test_grads = vmap(grad(test_loss))  # (K, D) -> (K, D)
        self.test_losses = vmap(test_loss)
        self.hvps = vmap(hvp)  # one column per node
        self.hvps_columns = vmap(vmap(hvp, in_dims=(None, None, None, 0)))  # (N, C, D) columns per node
        self.sample_dots = vmap(sample_dots)  # (N, D) -> (N, B)


# ---- (b) one vectorised training round ----

def training_round(run: ZooRun):
    """fn(t) -> (theta^{t+1}, momentum^{t+1}): every node's grad by vmap over nodes of the batch
    loss through functional_call, the momentum + weight decay SGD step, the mix. A BatchNorm model
    updates its running statistics in the same pass (functional_call with the buffers, vmapped)."""
    model, unflatten = run.template, run.unflatten
    if run.buffers is None:
        grads = Losses(run).grads
        step_grads = lambda t: grads(run.theta[t], run.inputs[t], run.targets[t])
    else:
        def loss(theta, buffers, x, y):
            out = functional_call(model, (unflatten(theta), buffers), (x,))
            return F.cross_entropy(out, y), buffers

        with_buffers = vmap(grad(loss, has_aux=True))

        def step_grads(t):
            buffers = {k: v.clone() for k, v in run.buffers[t].items()}  # updated in place by the forward
            return with_buffers(run.theta[t], buffers, run.inputs[t], run.targets[t])[0]

    def round_(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        theta = run.theta[t]
        half, m = _momentum_half(theta, run.momentum[t], step_grads(t))
        return run.W[t] @ half, m

    return round_


# ---- (a) the floors ----

def _neighbours(W: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """bool (N,) or (N, C): the receivers k with W[k, i] != 0 for some i in nodes (per column)."""
    return (W.ne(0).to(DTYPE) @ nodes.to(DTYPE)) > 0


def _momentum_half(theta, m, g):
    """torch.optim.SGD's step with momentum and weight decay: (theta^{t+1/2}, m^{t+1}). Round 0's
    buffer is recorded as zeros, so mu * 0 + g + wd theta is torch's first buffer, g + wd theta."""
    m = MOMENTUM * m + g + WEIGHT_DECAY * theta
    return theta - LR * m, m


def dice_e_floor(run: ZooRun, losses: Losses):
    """fn() -> (N, B) DICE-E scores of every sample, by the floor's ops (module docstring)."""
    t, q = STEP, 1.0 / N

    def fn() -> torch.Tensor:
        x, y, theta = run.inputs[t], run.targets[t], run.theta[t]
        half, _ = _momentum_half(theta, run.momentum[t], losses.grads(theta, x, y))
        points = torch.cat([half] + [run.theta[t + s] for s in range(1, HOPS + 1)])
        tg = losses.test_grads(points).mul_(q).view(HOPS + 1, N, -1)
        lam, lam_m = tg[HOPS], torch.zeros_like(tg[0])
        for s in range(HOPS - 1, 0, -1):  # J_s^T Mix_s^T, then inject hop s's test gradient
            lam = run.W[t + s].T @ lam
            u = lam_m - LR * lam
            lam = lam + WEIGHT_DECAY * u + losses.hvps(run.theta[t + s], run.inputs[t + s], run.targets[t + s], u)
            lam_m = MOMENTUM * u
            lam = lam + tg[s]
        u = lam_m - LR * (run.W[t].T @ lam + tg[0])  # the step's cotangent in g
        return losses.sample_dots(theta, x, y, u) / B

    return fn


def cascade_floor(run: ZooRun, losses: Losses, source: int = CASCADE_SOURCE):
    """fn() -> (hops+1, N) e[s, k] of source's whole batch, by the floor's ops."""
    t, q = STEP, 1.0 / N

    def fn() -> torch.Tensor:
        x, y, theta = run.inputs[t][source], run.targets[t][source], run.theta[t][source]
        g = losses.grads(theta[None], x[None], y[None])[0]
        half, _ = _momentum_half(theta, run.momentum[t][source], g)
        d_m = torch.zeros_like(run.theta[t])
        d_m[source] = g  # displacement: dO/dg g
        d_theta = -LR * d_m
        on_theta = torch.zeros(N, dtype=torch.bool)
        on_theta[source] = True
        on_m = on_theta.clone()
        hop_nodes, points, deltas = [torch.tensor([source])], [half[None]], [d_theta[source][None]]
        for s in range(1, HOPS + 1):
            if s >= 2:  # J of round t+s-1 where the theta perturbation is non-zero
                k = on_theta.nonzero().flatten()
                r = t + s - 1
                products = torch.zeros_like(d_theta)
                products[k] = losses.hvps(run.theta[r][k], run.inputs[r][k], run.targets[r][k], d_theta[k])
                d_m = MOMENTUM * d_m + products + WEIGHT_DECAY * d_theta
                d_theta = d_theta - LR * d_m
                on_m = on_m | on_theta
                on_theta = on_m.clone()
            d_theta = run.W[t + s - 1] @ d_theta
            on_theta = _neighbours(run.W[t + s - 1], on_theta)
            k = on_theta.nonzero().flatten()
            hop_nodes.append(k), points.append(run.theta[t + s][k]), deltas.append(d_theta[k])
        grads = losses.test_grads(torch.cat(points)).mul_(q)
        scores = torch.zeros(HOPS + 1, N, dtype=DTYPE)
        hops = torch.cat([torch.full_like(k, s) for s, k in enumerate(hop_nodes)])
        scores[hops, torch.cat(hop_nodes)] = (grads * torch.cat(deltas)).sum(-1)
        return scores

    return fn


def _column_hvps(losses: Losses, r: int, run: ZooRun, vectors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(N, C, D) H_k V[k, c] where active[k, c] (else 0): nodes with the same number of active
    columns go in one vmapped call with only their active columns."""
    out = torch.zeros_like(vectors)
    counts = active.sum(1)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        k = (counts == count).nonzero().flatten()
        cols = active[k].nonzero()[:, 1].view(len(k), count)
        out[k[:, None], cols] = losses.hvps_columns(run.theta[r][k], run.inputs[r][k], run.targets[r][k], vectors[k[:, None], cols])
    return out


def influence_floor(run: ZooRun, losses: Losses):
    """fn() -> (hops+1, N_source, N_receiver), by the floor's ops (columns are sources)."""
    t, q = STEP, 1.0 / N

    def fn() -> torch.Tensor:
        x, y, theta = run.inputs[t], run.targets[t], run.theta[t]
        g = losses.grads(theta, x, y)
        half, _ = _momentum_half(theta, run.momentum[t], g)
        points = torch.cat([half] + [run.theta[t + s] for s in range(1, HOPS + 1)])
        tg = losses.test_grads(points).mul_(q).view(HOPS + 1, N, -1)
        eye = torch.eye(N, dtype=torch.bool)
        d_m = torch.zeros(N, N, g.shape[1], dtype=DTYPE)
        d_m[eye] = g  # [receiver k, source c]
        d_theta = -LR * d_m
        on_theta, on_m = eye.clone(), eye.clone()
        scores = torch.zeros(HOPS + 1, N, N, dtype=DTYPE)
        scores[0] = torch.diag((tg[0] * d_theta[eye]).sum(-1))
        for s in range(1, HOPS + 1):
            if s >= 2:
                products = _column_hvps(losses, t + s - 1, run, d_theta, on_theta)
                d_m = MOMENTUM * d_m + products + WEIGHT_DECAY * d_theta
                d_theta = d_theta - LR * d_m
                on_m = on_m | on_theta
                on_theta = on_m.clone()
            d_theta = (run.W[t + s - 1] @ d_theta.flatten(1)).view_as(d_theta)
            on_theta = _neighbours(run.W[t + s - 1], on_theta)
            scores[s] = torch.einsum("kd,kcd->ck", tg[s], d_theta)
        return scores

    return fn


def gt_floor(run: ZooRun, losses: Losses, node: int = GT_NODE):
    """fn() -> (hops+1, B): DICE-GT of every sample of node, per hop summed over receivers, by exact
    replay of only what each removal changes (module docstring); one vmapped call per round for all B."""
    t, q = STEP, 1.0 / N
    keep = torch.full((B, B), 1.0 / B, dtype=DTYPE).fill_diagonal_(0.0)  # removal b: weight 0 for sample b
    replay_grads = vmap(losses.weighted_grads, in_dims=(0, None, None, None))  # (B, K, D) params, shared batches
    replay_test = vmap(losses.test_losses)

    def fn() -> torch.Tensor:
        totals = []
        # round t: only the source's step differs
        x, y, theta, m = run.inputs[t][node], run.targets[t][node], run.theta[t][node], run.momentum[t][node]
        half, m_new = _momentum_half(theta, m, losses.grads(theta[None], x[None], y[None])[0])
        cf_grads = vmap(losses.weighted_grads, in_dims=(None, None, None, 0))(theta[None], x[None], y[None], keep[:, None])[:, 0]
        cf_half, cf_m_new = _momentum_half(theta, m, cf_grads)  # (B, D)
        totals.append(q * (losses.test_loss(half) - losses.test_losses(cf_half)))
        changed = torch.zeros(N, dtype=torch.bool)  # rows whose params or momentum differ
        changed[node] = True
        rows, d_half = torch.tensor([node]), (cf_half - half)[:, None]  # (B, |rows|, D): counterfactual - factual half step
        cf_m = run.momentum[t + 1][None].repeat(B, 1, 1)
        cf_m[:, node] = cf_m_new
        for s in range(1, HOPS + 1):
            r = t + s  # theta^{r}: mix the changed half steps into the recorded params
            W = run.W[r - 1]
            reach = _neighbours(W, changed)
            k = reach.nonzero().flatten()
            cf_theta = run.theta[r][None].repeat(B, 1, 1)
            cf_theta[:, k] += torch.einsum("kj,bjd->bkd", W[k][:, rows], d_half)
            totals.append(q * (losses.test_losses(run.theta[r][k]) - replay_test(cf_theta[:, k])).sum(-1))
            if s == HOPS:
                break
            changed = reach | changed
            rows = changed.nonzero().flatten()
            x, y, th = run.inputs[r][rows], run.targets[r][rows], run.theta[r][rows]
            half, m_new = _momentum_half(th, run.momentum[r][rows], losses.grads(th, x, y))
            weights = torch.full((len(rows), B), 1.0 / B, dtype=DTYPE)
            cf_half, m_cf = _momentum_half(cf_theta[:, rows], cf_m[:, rows], replay_grads(cf_theta[:, rows], x, y, weights))
            d_half = cf_half - half
            cf_m = run.momentum[r + 1][None].repeat(B, 1, 1)
            cf_m[:, rows] = m_cf
        return torch.stack(totals)

    return fn


# ---- the queries themselves ----

def queries(run: ZooRun) -> dict:
    """name -> fn() of dicekern's queries on the run (what the benchmarks time)."""
    traj, test = run.traj, run.test
    return {
        "dice_e": lambda: dk.dice_e(traj, STEP, test, HOPS),
        "cascade": lambda: dk.cascade(traj, STEP, CASCADE_SOURCE, test, HOPS),
        "influence_matrix": lambda: dk.influence_matrix(traj, STEP, test, HOPS),
        "dice_gt_samples": lambda: dk.dice_gt_samples(traj, STEP, test, HOPS, nodes=[GT_NODE], per_hop=True)[:, 0],
    }


def floors(run: ZooRun) -> dict:
    """name -> fn() of the queries' floors. None for train-mode BatchNorm (resnet-bn): removing a
    sample renormalises the rest of its batch, a forward with sample-weighted batch statistics that
    torch's BatchNorm does not have, so its floor would re-implement dicekern's own (WeightedModel)."""
    if run.buffers is not None:
        return {}
    losses = Losses(run)
    return {"dice_e": dice_e_floor(run, losses), "cascade": cascade_floor(run, losses), "influence_matrix": influence_floor(run, losses),
            "dice_gt_samples": gt_floor(run, losses)}


# ---- measurement helpers ----

def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding, groups,
                        output_mask, out_shape, **kwargs) -> int:
    """torch.utils.flop_counter's formula for aten.convolution_backward with groups: torch 2.13's
    ignores them and counts a grouped conv's weight gradient groups times over. vmap over nodes
    turns every conv into a grouped one (groups = N, or N x columns), so without this the
    vmapped ResNet's backward counts N times its FLOPs."""
    t = lambda shape: [shape[1], shape[0]] + list(shape[2:])
    count = 0
    if output_mask[0]:
        count += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        weight = list(out_shape[1])
        pair = (t(grad_out_shape), t(x_shape)) if transposed else (t(x_shape), t(grad_out_shape))
        count += conv_flop_count(*pair, t(weight), transposed=False) // groups
    return count


def flops(fn) -> int:
    """FLOPs of fn() counted by FlopCounterMode (matrix products and convolutions only), with
    grouped convolutions' backward counted correctly (``_conv_backward_flop``)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) as counter:
        fn()
    return counter.get_total_flops()


def gemm_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    """This machine's large-GEMM rate in DTYPE at the current thread count: best of repeats."""
    a = torch.randn(size, size, dtype=DTYPE)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
