"""Launchers of the MLP kernels (``dicekern::mlp``, ``dicekern::mlp_adjoint_chain``,
``dicekern::mlp_forward_chain``) for the models of ``dicekern.bindings.plan.mlp_plan``; the
objective built on them is ``dicekern.curvature.triton.TritonBackend``. Importing this module
imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from dicekern.bindings.launch import check_operand, new_output, require_triton_device
from dicekern.bindings.plan import CURVATURE_MODES, MLPPlan
from dicekern.bindings.gossip_mix import CSRMixing
from dicekern.kernels import codes
from dicekern.kernels import mlp as kernel

BLOCK_B, BW, BLOCK_D = 16, 32, 128  # samples, width blocks, flat-vector blocks


def _scratch(plan: MLPPlan) -> int:
    """Elements of one program's scratch: 4L + 4 tiles [BLOCK_B, WMAX]."""
    return (4 * (len(plan.widths) - 1) + 4) * BLOCK_B * plan.wmax


@triton_op("dicekern::mlp", mutates_args={})
def _mlp_op(
    params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor,
    coef: torch.Tensor, widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor,
    mode: int, loss: int, act: int, wmax: int, scratch_size: int, shared_data: bool,
) -> torch.Tensor:
    n, d = params.shape
    batch, features = inputs.shape[-2:]
    columns = vectors.shape[1] if mode != codes.MODE_GRAD else 1
    rows = n * columns
    out = new_output((n, columns, batch) if mode == codes.MODE_DOTS else (n, columns, d) if mode != codes.MODE_GRAD else (n, d), params)
    scratch = torch.empty(rows * scratch_size, dtype=params.dtype, device=params.device)
    per_node = lambda t: 0 if shared_data else t[0].numel()
    wrap_triton(kernel.mlp_node_kernel)[(rows,)](
        p_out=out, p_scratch=scratch, p_theta=params, p_v=vectors, p_x=inputs, p_y=targets, p_w=weights, p_coef=coef,
        p_widths=widths, p_woff=woff, p_boff=boff, L=widths.numel() - 1, B=batch, F=features, D=d, C=columns,
        stride_x=per_node(inputs), stride_y=per_node(targets), stride_w=per_node(weights), SCRATCH=scratch_size,
        MODE=mode, LOSS=loss, ACT=act, BLOCK_B=BLOCK_B, BW=BW, WMAX=wmax, BLOCK_D=BLOCK_D,
    )
    return out


def mlp_node(
    plan: MLPPlan, mode: int, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
    vectors: torch.Tensor | None = None, *, coef: float = 1.0, shared_data: bool = False,
) -> torch.Tensor:
    """``dicekern::mlp`` on contiguous copies (the engine hands over views: slices, expands), after checks.

    Args:
        mode: codes.MODE_GRAD (out (N, D)), MODE_HVP or MODE_GGN (out (N, C, D)), MODE_DOTS (out (N, C, B)).
        params: (N, D); inputs (N, B, ...) or, with shared_data, (B, ...) for every node; targets
            likewise (..., K) for squared_error; weights (N, B) or (B,); vectors (N, C, D).
    """
    require_triton_device(params.device)
    params, targets, weights = params.contiguous(), targets.contiguous(), weights.contiguous()
    lead = () if shared_data else (params.shape[0],)
    inputs = inputs.reshape(*lead, inputs.shape[len(lead)], -1).contiguous()
    n = params.shape[0]
    check_operand("params", params, params, (n, plan.dim))
    batch = inputs.shape[-2]
    check_operand("inputs", inputs, params, lead + (batch, plan.widths[0]))
    target_shape = lead + (batch,) + ((plan.widths[-1],) if plan.loss == codes.LOSS_SQUARED else ())
    target_dtype = torch.int64 if plan.loss == codes.LOSS_SOFTMAX_CE else params.dtype
    check_operand("targets", targets, params, target_shape, dtype=target_dtype)
    check_operand("weights", weights, params, lead + (batch,))
    vectors = params.new_empty(n, 0, plan.dim) if vectors is None else vectors.contiguous()
    check_operand("vectors", vectors, params, (n, vectors.shape[1], plan.dim))
    scalars = params.new_tensor([coef, plan.slope])
    return torch.ops.dicekern.mlp(params, inputs, targets, weights, vectors, scalars, *plan.tensors(params.device),
                                  mode, plan.loss, plan.activation, plan.wmax, _scratch(plan), shared_data)


def _stacked_csr(mixings: list[torch.Tensor], transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of several rounds' W (or W^T) in one set of arrays: rowptr (R, N+1) indexes col and val."""
    parts = [CSRMixing.from_mixing(W, transpose=transpose) for W in mixings]
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.col.numel())
    rowptr = torch.stack([part.rowptr + offset for part, offset in zip(parts, offsets)])
    return rowptr.contiguous(), torch.cat([p.col for p in parts]), torch.cat([p.val for p in parts])


def _chain_launch(
    programs: int, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor,
    slope: torch.Tensor, loss: int, act: int, wmax: int, scratch_size: int, sender: bool, curvature: int,
) -> dict:
    """The launch arguments both chain kernels take, with the workspace of each of ``programs``
    programs: 2N + 1 vectors (D,) and its scratch."""
    hops = params.shape[0] - 1
    n, d = params.shape[1:]
    batch, features = inputs.shape[2:4]
    return dict(
        p_buf=torch.empty(programs, 2 * n + 1, d, dtype=params.dtype, device=params.device),
        p_scratch=torch.empty(programs * scratch_size, dtype=params.dtype, device=params.device),
        p_thetas=params, p_x=inputs, p_y=targets, p_coef=coefs, p_rowptr=rowptr, p_col=col, p_val=val,
        p_widths=widths, p_woff=woff, p_boff=boff, p_slope=slope, L=widths.numel() - 1, N=n, B=batch, F=features, D=d,
        stride_xr=inputs[0].numel(), stride_yr=targets[0].numel(), stride_yn=targets[0, 0].numel(), SCRATCH=scratch_size,
        HOPS=hops, SENDER=sender, CURVATURE=curvature, LOSS=loss, ACT=act, BLOCK_B=BLOCK_B, BW=BW, WMAX=wmax, BLOCK_D=BLOCK_D,
    )


@triton_op("dicekern::mlp_adjoint_chain", mutates_args={})
def _adjoint_chain_op(
    params: torch.Tensor, theta0: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, q: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor, slope: torch.Tensor,
    loss: int, act: int, wmax: int, scratch_size: int, sender: bool, curvature: int,
) -> torch.Tensor:
    n, batch = inputs.shape[1:3]
    m = x_test.shape[-2]
    per_node = x_test.dim() == 4  # (hops+1, N, M, F) test features of each node, or (M, F) shared
    stride_ts, stride_tn = (x_test[0].numel(), x_test[0, 0].numel()) if per_node else (0, 0)
    out = new_output((m, n, batch), params)
    ones = torch.ones(batch, dtype=params.dtype, device=params.device)
    shared = _chain_launch(m, params, inputs, targets, coefs, rowptr, col, val, widths, woff, boff, slope,
                           loss, act, wmax, scratch_size, sender, curvature)
    wrap_triton(kernel.mlp_adjoint_chain_kernel)[(m,)](
        p_out=out, p_theta0=theta0, p_q=q, p_xt=x_test, p_yt=y_test, p_one=ones,
        stride_yt=y_test[0].numel(), stride_ts=stride_ts, stride_tn=stride_tn, **shared,
    )
    return out


@triton_op("dicekern::mlp_forward_chain", mutates_args={})
def _forward_chain_op(
    params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, coefs: torch.Tensor,
    rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    widths: torch.Tensor, woff: torch.Tensor, boff: torch.Tensor, slope: torch.Tensor,
    loss: int, act: int, wmax: int, scratch_size: int, sender: bool, curvature: int,
) -> torch.Tensor:
    hops = params.shape[0] - 1
    n = params.shape[1]
    out = new_output((hops + 1, n, n), params)
    shared = _chain_launch(n, params, inputs, targets, coefs, rowptr, col, val, widths, woff, boff, slope,
                           loss, act, wmax, scratch_size, sender, curvature)
    wrap_triton(kernel.mlp_forward_chain_kernel)[(n,)](p_out=out, p_disp=displacements, p_g=scaled_test_grads, **shared)
    return out


def _chain_operands(plan: MLPPlan, rounds, params: torch.Tensor, transpose: bool) -> tuple:
    """Stacked batches, -lr/B per round and node, the rounds' CSR mixing, checked against params (hops+1, N, D)."""
    require_triton_device(params.device)
    hops = params.shape[0] - 1
    damping = rounds[: max(hops, 1)]
    inputs = torch.stack([r.inputs for r in damping])
    inputs = inputs.reshape(*inputs.shape[:3], -1).contiguous()
    targets = torch.stack([r.targets for r in damping]).contiguous()
    n, batch = inputs.shape[1:3]
    check_operand("params", params.contiguous(), params, (hops + 1, n, plan.dim))
    check_operand("inputs", inputs, params, (len(damping), n, batch, plan.widths[0]))
    coefs = torch.stack([-r.lr / batch for r in damping]).to(dtype=params.dtype, device=params.device).contiguous()  # (rounds, N)
    return (inputs, targets, coefs) + _stacked_csr([r.W for r in damping], transpose=transpose)


def _plan_operands(plan: MLPPlan, params: torch.Tensor) -> tuple:
    return (*plan.tensors(params.device), params.new_tensor([plan.slope]))


def _plan_flags(plan: MLPPlan, sender: bool, curvature: str) -> tuple:
    return plan.loss, plan.activation, plan.wmax, _scratch(plan), sender, CURVATURE_MODES[curvature]


def adjoint_chain_per_test(
    plan: MLPPlan, rounds, params: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
    *, sender: bool, curvature: str,
) -> torch.Tensor:
    """(M, N, B) DICE-E of every sample against every test point's own loss, in one launch.

    Args:
        rounds: the chain's rounds t..t+hops (the first max(hops, 1) carry batches).
        params: (hops+1, N, D): [0] the hop-0 test-gradient point, [s] theta^{t+s}.
        test: (inputs, targets); inputs (M, ...) shared, or (hops+1, N, M, F) per hop and node.
        q: (N,) node weights.
        curvature: "exact", "ggn" or "none".
    """
    operands = _chain_operands(plan, rounds, params, transpose=True)
    x_test, y_test = test
    x_test = (x_test if x_test.dim() == 4 else x_test.reshape(len(x_test), -1)).contiguous()
    lead = tuple(params.shape[:2]) if x_test.dim() == 4 else ()
    check_operand("test inputs", x_test, params, lead + (x_test.shape[-2], plan.widths[0]))
    check_operand("q", q.contiguous(), params, (params.shape[1],))
    return torch.ops.dicekern.mlp_adjoint_chain(
        params.contiguous(), rounds[0].params.contiguous(), *operands, q.contiguous(), x_test, y_test.contiguous(),
        *_plan_operands(plan, params), *_plan_flags(plan, sender, curvature),
    )


def forward_chain(
    plan: MLPPlan, rounds, params: torch.Tensor, displacements: torch.Tensor, scaled_test_grads: torch.Tensor,
    *, sender: bool, curvature: str,
) -> torch.Tensor:
    """(hops+1, N_source, N_receiver) influence of every node's whole batch, in one launch.

    Args:
        params: (hops+1, N, D), [s] theta^{t+s} (the damping points; [0] is unused).
        displacements: (N, D) every node's Delta of its whole batch.
        scaled_test_grads: (hops+1, N, D) q_k g_k^{(s)}.
    """
    operands = _chain_operands(plan, rounds, params, transpose=False)
    check_operand("displacements", displacements.contiguous(), params, tuple(params.shape[1:]))
    check_operand("scaled_test_grads", scaled_test_grads.contiguous(), params, tuple(params.shape))
    return torch.ops.dicekern.mlp_forward_chain(
        params.contiguous(), *operands, displacements.contiguous(), scaled_test_grads.contiguous(),
        *_plan_operands(plan, params), *_plan_flags(plan, sender, curvature),
    )
