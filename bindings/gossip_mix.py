"""Launcher of the gossip mixing kernel, registered as ``dicekern::gossip_mix``.

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op, wrap_triton

from dicekern.bindings.launch import check_operand, new_output, require_triton_device
from dicekern.core.checks import check_mixing
from dicekern.kernels.gossip_mix import gossip_mix_kernel

BLOCK_D = 128
MAX_ROWS = 65535  # CUDA's limit on grid axis 1, where the rows go


@dataclass(frozen=True)
class CSRMixing:
    """A mixing matrix M (N, N) in CSR: rowptr (N+1,), col (nnz,) int64, val (nnz,)."""

    rowptr: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @classmethod
    def from_mixing(cls, W: torch.Tensor, *, transpose: bool = False) -> CSRMixing:
        """CSR of W, or of W^T (the adjoint chain's mix), from a row-stochastic (N, N) W."""
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
        like = torch.empty(0, dtype=W.dtype if W.is_floating_point() else torch.float64, device=W.device)
        W = check_mixing("W", W, W.shape[0], like)
        M = W.T if transpose else W
        rows, cols = M.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(rows, minlength=M.shape[0])
        rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(rowptr.contiguous(), cols.contiguous(), M[rows, cols].contiguous())


def gossip_mix(
    vectors: torch.Tensor,
    mixing: CSRMixing,
    *,
    scale: torch.Tensor | None = None,
    added: torch.Tensor | None = None,
    added_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = added_scale ⊙ added + M · (scale ⊙ vectors), all nodes at once.

    Args:
        vectors: V (N, D), contiguous, float32 or float64.
        mixing: M as CSR (``CSRMixing.from_mixing(W)`` or ``(W, transpose=True)``).
        scale: C (N,), a per-row scale of V before mixing.
        added, added_scale: G (N, D) and a (N,), given together: e.g. q-scaled test gradients.

    Returns:
        (N, D), same dtype and device as vectors.
    """
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        raise ValueError(f"vectors must be a 2-D (N, D) tensor, got {getattr(vectors, 'shape', type(vectors))}")
    if vectors.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vectors must be float32 or float64, got {vectors.dtype}")
    require_triton_device(vectors.device)
    n, d = vectors.shape
    check_operand("vectors", vectors, vectors, (n, d))
    if mixing.num_nodes != n:
        raise ValueError(f"mixing is for N={mixing.num_nodes} nodes, vectors hold N={n}")
    if n > MAX_ROWS:
        raise ValueError(f"the mixing kernel takes at most {MAX_ROWS} nodes (a CUDA grid axis), got N={n}")
    check_operand("mixing.val", mixing.val, vectors, tuple(mixing.val.shape))
    if scale is not None:
        check_operand("scale", scale, vectors, (n,))
    if (added is None) != (added_scale is None):
        raise ValueError("added and added_scale must be given together")
    if added is not None:
        check_operand("added", added, vectors, (n, d))
        check_operand("added_scale", added_scale, vectors, (n,))
    return torch.ops.dicekern.gossip_mix(vectors, mixing.rowptr, mixing.col, mixing.val, scale, added, added_scale)


@triton_op("dicekern::gossip_mix", mutates_args={})
def _gossip_mix_op(
    vectors: torch.Tensor,
    rowptr: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    scale: torch.Tensor | None,
    added: torch.Tensor | None,
    added_scale: torch.Tensor | None,
) -> torch.Tensor:
    n, d = vectors.shape
    out = new_output(tuple(vectors.shape), vectors)
    unused = vectors  # any valid pointer for a pointer the constexpr flags switch off
    wrap_triton(gossip_mix_kernel)[(triton.cdiv(d, BLOCK_D), n)](
        p_out=out, p_v=vectors, p_rowptr=rowptr, p_col=col, p_val=val,
        p_c=unused if scale is None else scale,
        p_g=unused if added is None else added,
        p_a=unused if added_scale is None else added_scale,
        D=d,
        HAS_C=scale is not None, HAS_G=added is not None, BLOCK_D=BLOCK_D,
    )
    return out


class ColumnMixer:
    """Mixes (N, C, D) chain vectors with each round's W or W^T through the kernel, CSR cached."""

    def __init__(self, mixings: list[torch.Tensor]):
        self._mixings = mixings
        self._csr: dict[tuple[int, bool], CSRMixing] = {}

    def __call__(self, index: int, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        key = (index, transpose)
        if key not in self._csr:
            self._csr[key] = CSRMixing.from_mixing(self._mixings[index], transpose=transpose)
        n, c, d = vectors.shape
        return gossip_mix(vectors.reshape(n, c * d).contiguous(), self._csr[key]).view(n, c, d)
