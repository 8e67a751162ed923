"""Launcher of the linear-head kernel (``dicekern::linear_head``) and the objective built on it.

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch
import triton
from torch import nn
from torch.library import triton_op, wrap_triton

from dicekern.bindings.dispatch import check_operand, is_linear_head, new_output, require_triton_device
from dicekern.bindings.gossip_mix import CSRMixing
from dicekern.kernels import linear_head as kernel
from dicekern.kernels import linear_head_chain as chain_kernel
from dicekern.objectives.torch_func import Curvature, LossFn, NodeObjective, mean_weights

BLOCK_B, BLOCK_F, BLOCK_D = 32, 64, 128  # samples, features, flat-vector blocks
LOSS_CODES = {
    "softmax_cross_entropy": kernel.LOSS_SOFTMAX_CE,
    "binary_logistic": kernel.LOSS_LOGISTIC,
    "squared_error": kernel.LOSS_SQUARED,
}


@triton_op("dicekern::linear_head", mutates_args={})
def _linear_head_op(
    thetas: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    vectors: torch.Tensor,
    coef: torch.Tensor,
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
    out_shape = (n, columns, batch) if mode == kernel.MODE_DOTS else ((n, columns, d) if mode == kernel.MODE_HVP else (n, d))
    out = new_output(out_shape, thetas)
    scratch = torch.empty(0 if mode == kernel.MODE_DOTS else rows * batch * k_pad, dtype=thetas.dtype, device=thetas.device)
    per_node = lambda t: 0 if shared_data else t[0].numel()
    wrap_triton(kernel.linear_head_fwd_kernel)[(rows,)](
        out, scratch, thetas, vectors, inputs, targets, weights,
        coef, batch, features, num_outputs, d, columns,
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
            thetas, inputs, targets, weights, vectors, thetas.new_full((1,), 1.0 / batch if mode == kernel.MODE_HVP else 1.0), mode,
            self.loss_code, self.num_outputs, self.has_bias, shared_data,
        )

    def _run(self, mode: int, thetas, inputs, targets, weights, vectors=None, shared_data: bool = False):
        """_launch on contiguous copies: the engine hands over views (slices, expands)."""
        operands = [t if t is None else t.contiguous() for t in (thetas, inputs, targets, weights, vectors)]
        return self._launch(mode, *operands, shared_data=shared_data)

    def node_grads(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._run(kernel.MODE_GRAD, thetas, inputs, targets, weights)

    def test_grads(self, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = test
        return self._run(kernel.MODE_GRAD, thetas, x, y, mean_weights(x.shape[:-1], thetas), shared_data=True)

    def _curvature_products(
        self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        return self._run(kernel.MODE_HVP, thetas, inputs, targets, mean_weights(inputs.shape[:-1], thetas), vectors)

    def per_sample_dots(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self._run(kernel.MODE_DOTS, thetas, inputs, targets, mean_weights(inputs.shape[:-1], thetas), vectors)



def _stacked_csr(mixings: list[torch.Tensor], transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of several rounds' W (or W^T) in one set of arrays: rowptr (R, N+1) indexes col and val."""
    parts = [CSRMixing.from_mixing(W, transpose=transpose) for W in mixings]
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.col.numel())
    rowptr = torch.stack([part.rowptr + offset for part, offset in zip(parts, offsets)])
    return rowptr.contiguous(), torch.cat([p.col for p in parts]), torch.cat([p.val for p in parts])


def _chain_flags(loss: int, num_outputs: int, has_bias: bool, sender: bool, curvature: bool, hops: int) -> dict:
    return dict(
        HOPS=hops, SENDER=sender, CURVATURE=curvature, LOSS=loss, HAS_BIAS=has_bias,
        BLOCK_B=BLOCK_B, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, K_PAD=max(16, triton.next_power_of_2(num_outputs)),
    )


@triton_op("dicekern::linear_head_adjoint_chain", mutates_args={})
def _adjoint_chain_op(
    thetas: torch.Tensor, theta0: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, q: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    loss: int, num_outputs: int, has_bias: bool, sender: bool, curvature: bool,
) -> torch.Tensor:
    hops = thetas.shape[0] - 1
    n, d = thetas.shape[1:]
    batch, features = inputs.shape[2:4]
    m = x_test.shape[-2]
    per_node = x_test.dim() == 4  # (hops+1, N, M, F) test features of each node, or (M, F) shared
    stride_ts, stride_tn = (x_test[0].numel(), x_test[0, 0].numel()) if per_node else (0, 0)
    flags = _chain_flags(loss, num_outputs, has_bias, sender, curvature, hops)
    out = new_output((m, n, batch), thetas)
    buffers = torch.empty(m, 2, n, d, dtype=thetas.dtype, device=thetas.device)
    scratch = torch.empty(m, batch, flags["K_PAD"], dtype=thetas.dtype, device=thetas.device)
    wrap_triton(chain_kernel.linear_head_adjoint_chain_kernel)[(m,)](
        out, buffers, scratch, thetas, theta0, inputs, targets, coefs, rowptr, col, val, q, x_test, y_test,
        n, batch, features, num_outputs, d, inputs[0].numel(), targets[0].numel(), targets[0, 0].numel(), y_test[0].numel(),
        stride_ts, stride_tn, **flags,
    )
    return out


@triton_op("dicekern::linear_head_forward_chain", mutates_args={})
def _forward_chain_op(
    thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    loss: int, num_outputs: int, has_bias: bool, sender: bool, curvature: bool,
) -> torch.Tensor:
    hops = thetas.shape[0] - 1
    n, d = thetas.shape[1:]
    batch, features = inputs.shape[2:4]
    flags = _chain_flags(loss, num_outputs, has_bias, sender, curvature, hops)
    out = new_output((hops + 1, n, n), thetas)
    buffers = torch.empty(n, 2, n, d, dtype=thetas.dtype, device=thetas.device)
    scratch = torch.empty(n, batch, flags["K_PAD"], dtype=thetas.dtype, device=thetas.device)
    wrap_triton(chain_kernel.linear_head_forward_chain_kernel)[(n,)](
        out, buffers, scratch, thetas, inputs, targets, coefs, rowptr, col, val, displacements, scaled_test_grads,
        n, batch, features, num_outputs, d, inputs[0].numel(), targets[0].numel(), targets[0, 0].numel(), **flags,
    )
    return out


def _chain_operands(objective: LinearHeadObjective, rounds, thetas: torch.Tensor, transpose: bool) -> tuple:
    """Stacked batches, -lr/B per round and node and the rounds' CSR mixing, checked against thetas (hops+1, N, D)."""
    require_triton_device(thetas.device)
    hops = thetas.shape[0] - 1
    damping = rounds[: max(hops, 1)]
    inputs = torch.stack([r.inputs for r in damping]).contiguous()
    targets = torch.stack([r.targets for r in damping]).contiguous()
    n, batch = inputs.shape[1:3]
    check_operand("thetas", thetas.contiguous(), thetas, (hops + 1, n, objective.layout.dim))
    check_operand("inputs", inputs, thetas, (len(damping), n, batch, objective.num_features))
    coefs = torch.stack([-r.lr / batch for r in damping]).to(dtype=thetas.dtype, device=thetas.device).contiguous()  # (rounds, N)
    return (inputs, targets, coefs) + _stacked_csr([r.W for r in damping], transpose=transpose)


def adjoint_chain_per_test(
    objective: LinearHeadObjective, rounds, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
    *, sender: bool, curvature: bool,
) -> torch.Tensor:
    """(M, N, B) DICE-E of every sample against every test point's own loss, in one launch.

    Args:
        rounds: the chain's rounds t..t+hops (the first max(hops, 1) carry batches).
        thetas: (hops+1, N, D): [0] the hop-0 test-gradient point, [s] theta^{t+s}.
        test: (inputs, targets); inputs (M, F) shared, or (hops+1, N, M, F) per hop and node.
        q: (N,) node weights.
    """
    operands = _chain_operands(objective, rounds, thetas, transpose=True)
    x_test, y_test = (t.contiguous() for t in test)
    lead = tuple(thetas.shape[:2]) if x_test.dim() == 4 else ()
    check_operand("test inputs", x_test, thetas, lead + (x_test.shape[-2], objective.num_features))
    check_operand("q", q.contiguous(), thetas, (thetas.shape[1],))
    return torch.ops.dicekern.linear_head_adjoint_chain(
        thetas.contiguous(), rounds[0].params.contiguous(), *operands, q.contiguous(), x_test, y_test,
        objective.loss_code, objective.num_outputs, objective.has_bias, sender, curvature,
    )


def forward_chain(
    objective: LinearHeadObjective, rounds, thetas: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    *, sender: bool, curvature: bool,
) -> torch.Tensor:
    """(hops+1, N_source, N_receiver) influence of every node's whole batch, in one launch.

    Args:
        thetas: (hops+1, N, D), [s] theta^{t+s} (the damping points; [0] is unused).
        displacements: (N, D) every node's Delta of its whole batch.
        scaled_test_grads: (hops+1, N, D) q_k g_k^{(s)}.
    """
    operands = _chain_operands(objective, rounds, thetas, transpose=False)
    check_operand("displacements", displacements.contiguous(), thetas, tuple(thetas.shape[1:]))
    check_operand("scaled_test_grads", scaled_test_grads.contiguous(), thetas, tuple(thetas.shape))
    return torch.ops.dicekern.linear_head_forward_chain(
        thetas.contiguous(), *operands, displacements.contiguous(), scaled_test_grads.contiguous(),
        objective.loss_code, objective.num_outputs, objective.has_bias, sender, curvature,
    )

