"""The per-node objective computed by the Triton MLP kernels (``dicekern.bindings.mlp``).

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch
from torch import nn

from dicekern.bindings.mlp import CURVATURE_MODES, mlp_node
from dicekern.bindings.plan import mlp_plan
from dicekern.kernels import codes
from dicekern.curvature.torch_func import Curvature, LossFn, TorchFuncBackend, mean_weights


class TritonBackend(TorchFuncBackend):
    """Gradients, curvature products and per-sample dots of an MLP the kernels cover, computed by them.

    Same interface and results as :class:`TorchFuncBackend`. Shapes: inputs (N, B, F) (flattened
    when the model starts with nn.Flatten), targets (N, B) (or (N, B, K) for squared_error).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        plan = mlp_plan(model, loss_fn)
        if isinstance(plan, str):
            raise ValueError(f"the MLP kernels cannot run this model: {plan}")
        super().__init__(model, loss_fn)
        self.plan = plan

    def node_grads(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return mlp_node(self.plan, codes.MODE_GRAD, thetas, inputs, targets, weights)

    def test_grads(self, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = test
        return mlp_node(self.plan, codes.MODE_GRAD, thetas, x, y, mean_weights((len(x),), thetas), shared_data=True)

    def _curvature_products(
        self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        weights = mean_weights(inputs.shape[:2], thetas)
        return mlp_node(self.plan, CURVATURE_MODES[kind], thetas, inputs, targets, weights, vectors, coef=1.0 / inputs.shape[1])

    def per_sample_dots(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return mlp_node(self.plan, codes.MODE_DOTS, thetas, inputs, targets, mean_weights(inputs.shape[:2], thetas), vectors)
