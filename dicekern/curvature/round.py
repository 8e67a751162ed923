"""The plain round of every node at once: each node's optimizer step on its own batch, then gossip.

The recorder's replay check, the ground truth and the examples run it; the engine linearises it
(``dicekern.engine.step``). Shapes: params (N, D), inputs (N, B, ...), targets (N, B, ...), W (N, N).
"""

from __future__ import annotations

import torch

from dicekern.core.optim import OptimizerSpec, State
from dicekern.curvature.torch_func import TorchFuncBackend, mean_weights


def local_update(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, params: torch.Tensor, state: State, inputs: torch.Tensor,
    targets: torch.Tensor, lr: torch.Tensor, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """(theta^{t+1/2} (N, D), state^{t+1}) of every node's optimizer step on sum_b weights[k, b] loss_b.

    weights (N, B) default to 1/B (the batch mean); a zero drops a sample but keeps B.
    """
    if weights is None:
        weights = mean_weights(inputs.shape[:2], params)
    return optimizer.update(params, state, objective.node_grads(params, inputs, targets, weights), lr)


def gossip_round(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, params: torch.Tensor, state: State, inputs: torch.Tensor,
    targets: torch.Tensor, lr: torch.Tensor, mixing: torch.Tensor, weights: torch.Tensor | None = None, *, mix_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """One round of adapt-then-combine: (theta^{t+1/2}, theta^{t+1}, state^{t+1}); params (N, D)."""
    half, state = local_update(objective, optimizer, params, state, inputs, targets, lr, weights)
    if mix_state:
        state = {name: mixing @ value if name in optimizer.state_blocks else value for name, value in state.items()}
    return half, mixing @ half, state
