"""The plain round of every node at once: each node's optimizer step on its own batch, then gossip.

The recorder's replay check, the ground truth and the examples run it; the engine linearises it
(``dicekern.engine.step``). Shapes: params (N, D), inputs (N, B, ...), targets (N, B, ...), W (N, N);
a BatchNorm model's buffers are running statistics (N, D_b) and counters (N, L).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dicekern.core.optim import OptimizerSpec, State
from dicekern.curvature.batchnorm import update_buffers
from dicekern.curvature.torch_func import TorchFuncBackend, mean_weights


class Buffers(NamedTuple):
    """Every node's BatchNorm buffers: running means and variances (N, D_b) in ``BufferLayout``
    order, and the layers' num_batches_tracked counters (N, L) int64."""

    running: torch.Tensor
    counters: torch.Tensor


def test_point(params: torch.Tensor, buffers: Buffers | None) -> torch.Tensor:
    """Where every node's test loss is taken: params (N, D), or with BatchNorm params and running
    statistics (N, D + D_b)."""
    return params if buffers is None else torch.cat([params, buffers.running], -1)


class NodeUpdate(NamedTuple):
    """Every node's local step: theta^{t+1/2} (N, D), the optimizer state and the buffers after it."""

    half: torch.Tensor
    state: State
    buffers: Buffers | None


class RoundUpdate(NamedTuple):
    """One round of adapt-then-combine: theta^{t+1/2}, theta^{t+1} (N, D), state and buffers^{t+1}."""

    half: torch.Tensor
    params: torch.Tensor
    state: State
    buffers: Buffers | None


def local_update(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, params: torch.Tensor, state: State, inputs: torch.Tensor,
    targets: torch.Tensor, lr: torch.Tensor, weights: torch.Tensor | None = None, buffers: Buffers | None = None,
) -> NodeUpdate:
    """Every node's optimizer step on sum_b weights[k, b] loss_b, and its BatchNorm buffers' update.

    weights (N, B) default to 1/B (the batch mean); a zero drops a sample but keeps B (and drops it
    from the batch statistics). buffers: a BatchNorm model's, None for a model without.
    """
    return local_update_and_grads(objective, optimizer, params, state, inputs, targets, lr, weights, buffers)[0]


def local_update_and_grads(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, params: torch.Tensor, state: State, inputs: torch.Tensor,
    targets: torch.Tensor, lr: torch.Tensor, weights: torch.Tensor | None = None, buffers: Buffers | None = None,
) -> tuple[NodeUpdate, torch.Tensor]:
    """``local_update`` and the (N, D) gradients it stepped with."""
    if weights is None:
        weights = mean_weights(inputs.shape[:2], params)
    if bool(objective.buffer_layout) != (buffers is not None):
        raise ValueError("a BatchNorm model steps with its buffers, a model without BatchNorm without: "
                         f"the model has {len(objective.buffer_layout.modules)} BatchNorm layers, buffers are {'given' if buffers else 'missing'}")
    if buffers is None:
        grads = objective.node_grads(params, inputs, targets, weights)
        return NodeUpdate(*optimizer.update(params, state, grads, lr), None), grads
    grads, statistics = objective.node_grads_and_statistics(params, inputs, targets, weights)
    half, state = optimizer.update(params, state, grads, lr)
    forward = weights.ne(0).any(-1)
    return NodeUpdate(half, state, Buffers(*update_buffers(objective.buffer_layout, buffers.running, buffers.counters, statistics, forward))), grads


def mix(update: NodeUpdate, optimizer: OptimizerSpec, mixing: torch.Tensor, *, mix_state: bool = False,
        mix_buffers: bool = False) -> RoundUpdate:
    """The combine half of a round: the params always mix, the optimizer state with mix_state, the
    running statistics with mix_buffers (counters stay at their node)."""
    state, buffers = update.state, update.buffers
    if mix_state:
        state = {name: mixing @ value if name in optimizer.state_blocks else value for name, value in state.items()}
    if mix_buffers and buffers is not None:
        buffers = Buffers(mixing @ buffers.running, buffers.counters)
    return RoundUpdate(update.half, mixing @ update.half, state, buffers)


def gossip_round(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, params: torch.Tensor, state: State, inputs: torch.Tensor,
    targets: torch.Tensor, lr: torch.Tensor, mixing: torch.Tensor, weights: torch.Tensor | None = None, *,
    buffers: Buffers | None = None, mix_state: bool = False, mix_buffers: bool = False,
) -> RoundUpdate:
    """One round of adapt-then-combine: ``local_update`` then ``mix``."""
    update = local_update(objective, optimizer, params, state, inputs, targets, lr, weights, buffers)
    return mix(update, optimizer, mixing, mix_state=mix_state, mix_buffers=mix_buffers)
