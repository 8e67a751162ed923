"""The paper's DICE-E evaluated walk by walk with double-backward products: slow, for tests and benchmarks.

Deliberately independent of the engine: plain torch.autograd instead of torch.func, one walk
(k_0 = source, k_1, ..., k_s) at a time, every curvature product recomputed along each walk.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from dicekern.core.checks import check_node, check_node_weights, check_samples, check_test
from dicekern.engine.options import DiceOptions
from dicekern.curvature.protocol import Curvature
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.record.trajectory import Trajectory


class _Autograd:
    """Losses, gradients and curvature products of one node's model with torch.autograd."""

    def __init__(self, objective: TorchFuncBackend):
        self.model, self.loss_fn, self.layout = objective.model, objective.loss_fn, objective.layout

    def outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.layout.unflatten(theta), (x,))

    def grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(D,) gradient of sum_b weights_b loss_b (default: the mean) at theta (D,)."""
        theta = theta.detach().requires_grad_(True)
        losses = self.loss_fn(self.outputs(theta, x), y)
        loss = losses.mean() if weights is None else (weights * losses).sum()
        return torch.autograd.grad(loss, theta)[0]

    def curvature_product(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, kind: Curvature) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        out = self.outputs(theta, x)
        if kind == "exact":
            g = torch.autograd.grad(self.loss_fn(out, y).mean(), theta, create_graph=True)[0]
            return torch.autograd.grad(g @ v, theta)[0]
        # J^T H_out J v; J v by the double-vjp trick
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, theta, u, create_graph=True)[0]
        j_v = torch.autograd.grad(jt_u, u, v)[0]
        o = out.detach().requires_grad_(True)
        g_out = torch.autograd.grad(self.loss_fn(o, y).mean(), o, create_graph=True)[0]
        h_j_v = torch.autograd.grad(g_out, o, j_v)[0]
        return torch.autograd.grad(out, theta, h_j_v)[0]


def dice_e_walks(
    traj: Trajectory,
    step: int,
    source: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    samples: object = None,
    options: DiceOptions | None = None,
    **option_fields,
) -> torch.Tensor:
    """e[s, k] of DICE.md summed over the walks P_j^{(s)} ending at k, one walk at a time.

    Same arguments and result (hops+1, N) as :func:`dicekern.cascade` (the backend option is
    ignored); cost grows with the number of walks, about degree^hops. The paper's walks are
    those of plain SGD: other optimizers are refused.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.walks.dice_e_walks(run.trajectory, 0, 1, run.test, hops=2).shape
        torch.Size([3, 4])
    """
    options = DiceOptions.of(options, **option_fields)
    if not traj.optimizer.is_plain_sgd:
        raise ValueError(f"the walk reference evaluates the paper's plain-SGD walks; the run used {traj.optimizer}: use dk.cascade")
    rounds = traj.window(step, hops)
    first = rounds[0]
    n, batch = first.inputs.shape[:2]
    j = check_node("source", source, n)
    like = first.params
    mask = check_samples(samples, batch, like)
    q = check_node_weights(options.q, n, like)
    x_test, y_test = check_test(test, like)
    ag = _Autograd(traj.objective)

    theta_j = first.params[j]
    displacement = -first.lr[j] * ag.grad(theta_j, first.inputs[j], first.targets[j], mask / batch)
    direct_point = theta_j
    if options.direct == "half_step":
        direct_point = theta_j - first.lr[j] * ag.grad(theta_j, first.inputs[j], first.targets[j])
    scores = like.new_zeros(hops + 1, n)
    scores[0, j] = q[j] * (ag.grad(direct_point, x_test, y_test) @ displacement)

    test_grads: dict[tuple[int, int], torch.Tensor] = {}  # per node and round, not per walk
    walks: list[tuple[int, ...]] = [(j,)]
    for s in range(1, hops + 1):
        mixing = rounds[s - 1].W
        walks = [w + (k,) for w in walks for k in torch.nonzero(mixing[:, w[-1]]).flatten().tolist()]
        for walk in walks:
            v = displacement
            for hop in range(1, s + 1):
                rnd = rounds[hop - 1]
                if hop >= 2 and options.curvature != "none":
                    node = walk[hop - 1] if options.curvature_at == "sender" else walk[hop]
                    v = v - rnd.lr[node] * ag.curvature_product(
                        rnd.params[node], rnd.inputs[node], rnd.targets[node], v, options.curvature
                    )
                v = rnd.W[walk[hop], walk[hop - 1]] * v
            k = walk[-1]
            if (s, k) not in test_grads:
                test_grads[s, k] = ag.grad(rounds[s].params[k], x_test, y_test)
            scores[s, k] += q[k] * (test_grads[s, k] @ v)
    return scores
