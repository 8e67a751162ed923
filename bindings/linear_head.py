"""Launcher of the linear-head kernel (``dicekern::linear_head``) and the objective built on it.

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch
import triton
from torch import nn
from torch.library import triton_op, wrap_triton

from dicekern.bindings.dispatch import check_operand, require_triton_device
from dicekern.kernels import linear_head as kernel
from dicekern.losses import ClosedFormLoss
from dicekern.objective import Curvature, LossFn, NodeObjective

BLOCK_B, BLOCK_F = 32, 64
LOSS_CODES = {
    "softmax_cross_entropy": kernel.LOSS_SOFTMAX_CE,
    "binary_logistic": kernel.LOSS_LOGISTIC,
    "squared_error": kernel.LOSS_SQUARED,
}


def is_linear_head(model: nn.Module, loss_fn: LossFn) -> bool:
    """True for a single nn.Linear under a closed-form loss of ``dicekern.losses``."""
    if not isinstance(model, nn.Linear) or not isinstance(loss_fn, ClosedFormLoss):
        return False
    return loss_fn.kind != "binary_logistic" or model.out_features == 1


@triton_op("dicekern::linear_head", mutates_args={})
def _linear_head_op(
    thetas: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    vectors: torch.Tensor,
    lr: torch.Tensor,
    mode: int,
    loss: int,
    num_outputs: int,
    has_bias: bool,
    shared_data: bool,
) -> torch.Tensor:
    n, d = thetas.shape
    batch, features = inputs.shape[-2:]
    columns = vectors.shape[1] if mode != kernel.MODE_GRAD else 1
    rows = n * columns
    k_pad = max(16, triton.next_power_of_2(num_outputs))
    out_shape = (n, columns, batch) if mode == kernel.MODE_DOTS else ((n, columns, d) if mode == kernel.MODE_DAMP else (n, d))
    out = torch.empty(out_shape, dtype=thetas.dtype, device=thetas.device)
    scratch = torch.empty(0 if mode == kernel.MODE_DOTS else rows * batch * k_pad, dtype=thetas.dtype, device=thetas.device)
    per_node = lambda t: 0 if shared_data else t[0].numel()
    wrap_triton(kernel.linear_head_fwd_kernel)[(rows,)](
        out, scratch, thetas, vectors, inputs, targets, weights,
        lr, batch, features, num_outputs, d, columns,
        per_node(inputs), per_node(targets), per_node(weights),
        MODE=mode, LOSS=loss, HAS_BIAS=has_bias, BLOCK_B=BLOCK_B, BLOCK_F=BLOCK_F, K_PAD=k_pad,
    )
    return out


class LinearHeadObjective(NodeObjective):
    """The losses of a single nn.Linear under a ``dicekern.losses`` loss, computed by the kernel.

    Same interface and results as :class:`NodeObjective`; its curvature is exact, so "exact" and
    "ggn" coincide. Shapes: inputs (N, B, F), targets (N, B) (or (N, B, K) for squared_error).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        if not is_linear_head(model, loss_fn):
            raise ValueError(
                "the linear-head kernels need a single nn.Linear under dicekern.losses.softmax_cross_entropy, "
                "binary_logistic (one output) or squared_error"
            )
        super().__init__(model, loss_fn)
        self.num_features, self.num_outputs = model.in_features, model.out_features
        self.has_bias = model.bias is not None
        self.loss_code = LOSS_CODES[loss_fn.kind]

    def _launch(
        self,
        mode: int,
        thetas: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        vectors: torch.Tensor | None = None,
        lr: float = 0.0,
        shared_data: bool = False,
    ) -> torch.Tensor:
        require_triton_device(thetas.device)
        n, d = thetas.shape
        check_operand("thetas", thetas, thetas, (n, self.layout.dim))
        lead = () if shared_data else (n,)
        batch = inputs.shape[-2] if inputs.dim() >= 2 else -1
        check_operand("inputs", inputs, thetas, lead + (batch, self.num_features))
        target_shape = lead + (batch,) + ((self.num_outputs,) if self.loss_code == kernel.LOSS_SQUARED else ())
        target_dtype = torch.int64 if self.loss_code == kernel.LOSS_SOFTMAX_CE else thetas.dtype
        check_operand("targets", targets, thetas, target_shape, dtype=target_dtype)
        check_operand("weights", weights, thetas, lead + (batch,))
        if vectors is None:
            vectors = thetas.new_empty(n, 0, d)
        else:
            check_operand("vectors", vectors, thetas, (n, vectors.shape[1] if vectors.dim() == 3 else -1, d))
        return torch.ops.dicekern.linear_head(
            thetas, inputs, targets, weights, vectors, thetas.new_full((1,), lr), mode,
            self.loss_code, self.num_outputs, self.has_bias, shared_data,
        )

    def _run(self, mode: int, thetas, inputs, targets, weights, vectors=None, lr: float = 0.0, shared_data: bool = False):
        """_launch on contiguous copies: the engine hands over views (slices, expands)."""
        operands = [t if t is None else t.contiguous() for t in (thetas, inputs, targets, weights, vectors)]
        return self._launch(mode, *operands, lr=lr, shared_data=shared_data)

    @staticmethod
    def _uniform(inputs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.full(inputs.shape[:-1], 1.0 / inputs.shape[-2], dtype=like.dtype, device=like.device)

    def node_grads(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._run(kernel.MODE_GRAD, thetas, inputs, targets, weights)

    def test_grads(self, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = test
        return self._run(kernel.MODE_GRAD, thetas, x, y, self._uniform(x, thetas), shared_data=True)

    def _damp_nodes(
        self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, lr: float, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        return self._run(kernel.MODE_DAMP, thetas, inputs, targets, self._uniform(inputs, thetas), vectors, lr)

    def per_sample_dots(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self._run(kernel.MODE_DOTS, thetas, inputs, targets, self._uniform(inputs, thetas), vectors)
