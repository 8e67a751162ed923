"""Launchers of the MLP kernels (``dicekern::mlp``, ``dicekern::mlp_adjoint_chain``,
``dicekern::mlp_forward_chain``) and the objective built on them; the models they cover are those
of ``dicekern.bindings.plan.mlp_plan``. Importing this module imports triton: on CPU set
``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

from dicekern.bindings.dispatch import check_operand, new_output, require_triton_device
from dicekern.bindings.plan import MLPPlan, mlp_plan
from dicekern.bindings.gossip_mix import CSRMixing
from dicekern.kernels import codes
from dicekern.kernels import mlp as kernel
from dicekern.objectives.torch_func import Curvature, LossFn, NodeObjective, mean_weights

BLOCK_B, BW, BLOCK_D = 16, 32, 128  # samples, width blocks, flat-vector blocks
CURVATURE_MODES = {"exact": codes.MODE_HVP, "ggn": codes.MODE_GGN, "none": 0}


def _scratch(plan: MLPPlan) -> int:
    """Elements of one program's scratch: 4L + 4 tiles [BLOCK_B, WMAX]."""
    return (4 * (len(plan.widths) - 1) + 4) * BLOCK_B * plan.wmax


@triton_op("dicekern::mlp", mutates_args={})
def _mlp_op(
    thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor,
    coef: torch.Tensor, widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor,
    mode: int, loss: int, act: int, wmax: int, scratch_size: int, shared_data: bool,
) -> torch.Tensor:
    n, d = thetas.shape
    batch, features = inputs.shape[-2:]
    columns = vectors.shape[1] if mode != codes.MODE_GRAD else 1
    rows = n * columns
    out = new_output((n, columns, batch) if mode == codes.MODE_DOTS else (n, columns, d) if mode != codes.MODE_GRAD else (n, d), thetas)
    scratch = torch.empty(rows * scratch_size, dtype=thetas.dtype, device=thetas.device)
    per_node = lambda t: 0 if shared_data else t[0].numel()
    wrap_triton(kernel.mlp_fwd_kernel)[(rows,)](
        out, scratch, thetas, vectors, inputs, targets, weights, coef, widths, woff, boff,
        widths.numel() - 1, batch, features, d, columns, per_node(inputs), per_node(targets), per_node(weights), scratch_size,
        MODE=mode, LOSS=loss, ACT=act, BLOCK_B=BLOCK_B, BW=BW, WMAX=wmax, BLOCK_D=BLOCK_D,
    )
    return out


class MLPKernelObjective(NodeObjective):
    """Gradients, curvature products and per-sample dots of an MLP the kernels cover, computed by them.

    Same interface and results as :class:`NodeObjective`. Shapes: inputs (N, B, F) (flattened
    when the model starts with nn.Flatten), targets (N, B) (or (N, B, K) for squared_error).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        plan = mlp_plan(model, loss_fn)
        if isinstance(plan, str):
            raise ValueError(f"the MLP kernels cannot run this model: {plan}")
        super().__init__(model, loss_fn)
        self.plan = plan
        self.num_features, self.num_outputs = plan.widths[0], plan.widths[-1]

    def _launch(self, mode: int, thetas, inputs, targets, weights, vectors=None, coef: float = 1.0, shared_data: bool = False) -> torch.Tensor:
        """The kernel on contiguous copies (the engine hands over views: slices, expands), after checks."""
        require_triton_device(thetas.device)
        thetas, targets, weights = thetas.contiguous(), targets.contiguous(), weights.contiguous()
        lead = () if shared_data else (thetas.shape[0],)
        inputs = inputs.reshape(*lead, inputs.shape[len(lead)], -1).contiguous()
        n, d = thetas.shape
        check_operand("thetas", thetas, thetas, (n, self.layout.dim))
        batch = inputs.shape[-2]
        check_operand("inputs", inputs, thetas, lead + (batch, self.num_features))
        target_shape = lead + (batch,) + ((self.num_outputs,) if self.plan.loss == codes.LOSS_SQUARED else ())
        target_dtype = torch.int64 if self.plan.loss == codes.LOSS_SOFTMAX_CE else thetas.dtype
        check_operand("targets", targets, thetas, target_shape, dtype=target_dtype)
        check_operand("weights", weights, thetas, lead + (batch,))
        vectors = thetas.new_empty(n, 0, d) if vectors is None else vectors.contiguous()
        check_operand("vectors", vectors, thetas, (n, vectors.shape[1], d))
        scalars = thetas.new_tensor([coef, self.plan.slope])
        return torch.ops.dicekern.mlp(thetas, inputs, targets, weights, vectors, scalars, *self.plan.tensors(thetas.device),
                                      mode, self.plan.loss, self.plan.activation, self.plan.wmax, _scratch(self.plan), shared_data)

    def node_grads(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._launch(codes.MODE_GRAD, thetas, inputs, targets, weights)

    def test_grads(self, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = test
        return self._launch(codes.MODE_GRAD, thetas, x, y, mean_weights((len(x),), thetas), shared_data=True)

    def _curvature_products(
        self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        weights = mean_weights(inputs.shape[:2], thetas)
        return self._launch(CURVATURE_MODES[kind], thetas, inputs, targets, weights, vectors, 1.0 / inputs.shape[1])

    def per_sample_dots(self, thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self._launch(codes.MODE_DOTS, thetas, inputs, targets, mean_weights(inputs.shape[:2], thetas), vectors)


def _stacked_csr(mixings: list[torch.Tensor], transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of several rounds' W (or W^T) in one set of arrays: rowptr (R, N+1) indexes col and val."""
    parts = [CSRMixing.from_mixing(W, transpose=transpose) for W in mixings]
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.col.numel())
    rowptr = torch.stack([part.rowptr + offset for part, offset in zip(parts, offsets)])
    return rowptr.contiguous(), torch.cat([p.col for p in parts]), torch.cat([p.val for p in parts])


@triton_op("dicekern::mlp_adjoint_chain", mutates_args={})
def _adjoint_chain_op(
    thetas: torch.Tensor, theta0: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, q: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor, slope: torch.Tensor,
    loss: int, act: int, wmax: int, scratch_size: int, sender: bool, curvature: int,
) -> torch.Tensor:
    hops = thetas.shape[0] - 1
    n, d = thetas.shape[1:]
    batch, features = inputs.shape[2:4]
    m = x_test.shape[-2]
    per_node = x_test.dim() == 4  # (hops+1, N, M, F) test features of each node, or (M, F) shared
    stride_ts, stride_tn = (x_test[0].numel(), x_test[0, 0].numel()) if per_node else (0, 0)
    out = new_output((m, n, batch), thetas)
    buffers = torch.empty(m, 2 * n + 1, d, dtype=thetas.dtype, device=thetas.device)
    scratch = torch.empty(m * scratch_size, dtype=thetas.dtype, device=thetas.device)
    ones = torch.ones(batch, dtype=thetas.dtype, device=thetas.device)
    wrap_triton(kernel.mlp_adjoint_chain_kernel)[(m,)](
        out, buffers, scratch, thetas, theta0, inputs, targets, coefs, rowptr, col, val, q, x_test, y_test, ones,
        widths, woff, boff, slope, widths.numel() - 1, n, batch, features, d,
        inputs[0].numel(), targets[0].numel(), targets[0, 0].numel(), y_test[0].numel(), stride_ts, stride_tn, scratch_size,
        HOPS=hops, SENDER=sender, CURVATURE=curvature, LOSS=loss, ACT=act, BLOCK_B=BLOCK_B, BW=BW, WMAX=wmax, BLOCK_D=BLOCK_D,
    )
    return out


@triton_op("dicekern::mlp_forward_chain", mutates_args={})
def _forward_chain_op(
    thetas: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor, slope: torch.Tensor,
    loss: int, act: int, wmax: int, scratch_size: int, sender: bool, curvature: int,
) -> torch.Tensor:
    hops = thetas.shape[0] - 1
    n, d = thetas.shape[1:]
    batch, features = inputs.shape[2:4]
    out = new_output((hops + 1, n, n), thetas)
    buffers = torch.empty(n, 2 * n + 1, d, dtype=thetas.dtype, device=thetas.device)
    scratch = torch.empty(n * scratch_size, dtype=thetas.dtype, device=thetas.device)
    wrap_triton(kernel.mlp_forward_chain_kernel)[(n,)](
        out, buffers, scratch, thetas, inputs, targets, coefs, rowptr, col, val, displacements, scaled_test_grads,
        widths, woff, boff, slope, widths.numel() - 1, n, batch, features, d,
        inputs[0].numel(), targets[0].numel(), targets[0, 0].numel(), scratch_size,
        HOPS=hops, SENDER=sender, CURVATURE=curvature, LOSS=loss, ACT=act, BLOCK_B=BLOCK_B, BW=BW, WMAX=wmax, BLOCK_D=BLOCK_D,
    )
    return out


def _chain_operands(objective: MLPKernelObjective, rounds, thetas: torch.Tensor, transpose: bool) -> tuple:
    """Stacked batches, -lr/B per round and node, the rounds' CSR mixing, checked against thetas (hops+1, N, D)."""
    require_triton_device(thetas.device)
    hops = thetas.shape[0] - 1
    damping = rounds[: max(hops, 1)]
    inputs = torch.stack([r.inputs for r in damping])
    inputs = inputs.reshape(*inputs.shape[:3], -1).contiguous()
    targets = torch.stack([r.targets for r in damping]).contiguous()
    n, batch = inputs.shape[1:3]
    check_operand("thetas", thetas.contiguous(), thetas, (hops + 1, n, objective.layout.dim))
    check_operand("inputs", inputs, thetas, (len(damping), n, batch, objective.num_features))
    coefs = torch.stack([-r.lr / batch for r in damping]).to(dtype=thetas.dtype, device=thetas.device).contiguous()  # (rounds, N)
    return (inputs, targets, coefs) + _stacked_csr([r.W for r in damping], transpose=transpose)


def _plan_operands(objective: MLPKernelObjective, thetas: torch.Tensor) -> tuple:
    plan = objective.plan
    return (*plan.tensors(thetas.device), thetas.new_tensor([plan.slope]))


def _plan_flags(objective: MLPKernelObjective, sender: bool, curvature: str) -> tuple:
    plan = objective.plan
    return plan.loss, plan.activation, plan.wmax, _scratch(plan), sender, CURVATURE_MODES[curvature]


def adjoint_chain_per_test(
    objective: MLPKernelObjective, rounds, thetas: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
    *, sender: bool, curvature: str,
) -> torch.Tensor:
    """(M, N, B) DICE-E of every sample against every test point's own loss, in one launch.

    Args:
        rounds: the chain's rounds t..t+hops (the first max(hops, 1) carry batches).
        thetas: (hops+1, N, D): [0] the hop-0 test-gradient point, [s] theta^{t+s}.
        test: (inputs, targets); inputs (M, ...) shared, or (hops+1, N, M, F) per hop and node.
        q: (N,) node weights.
        curvature: "exact", "ggn" or "none".
    """
    operands = _chain_operands(objective, rounds, thetas, transpose=True)
    x_test, y_test = test
    x_test = (x_test if x_test.dim() == 4 else x_test.reshape(len(x_test), -1)).contiguous()
    lead = tuple(thetas.shape[:2]) if x_test.dim() == 4 else ()
    check_operand("test inputs", x_test, thetas, lead + (x_test.shape[-2], objective.num_features))
    check_operand("q", q.contiguous(), thetas, (thetas.shape[1],))
    return torch.ops.dicekern.mlp_adjoint_chain(
        thetas.contiguous(), rounds[0].params.contiguous(), *operands, q.contiguous(), x_test, y_test.contiguous(),
        *_plan_operands(objective, thetas), *_plan_flags(objective, sender, curvature),
    )


def forward_chain(
    objective: MLPKernelObjective, rounds, thetas: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    *, sender: bool, curvature: str,
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
    return torch.ops.dicekern.mlp_forward_chain(
        thetas.contiguous(), *operands, displacements.contiguous(), scaled_test_grads.contiguous(),
        *_plan_operands(objective, thetas), *_plan_flags(objective, sender, curvature),
    )
