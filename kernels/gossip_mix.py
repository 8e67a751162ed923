"""Gossip mixing on stacked vectors through a CSR mixing matrix."""

import triton
import triton.language as tl


@triton.jit
def gossip_mix_kernel(
    p_out, p_v, p_rowptr, p_col, p_val, p_c, p_g, p_a,
    D,
    HAS_C: tl.constexpr, HAS_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[k] = a[k] G[k] + sum_{j in row k} M[k, j] c[j] V[j]; one program per (D block, row k).

    The D blocks run on grid axis 0 (up to 2^31 - 1 programs), the rows on axis 1 (up to 65535).
    """
    i_d = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    start = tl.load(p_rowptr + i_k)
    end = tl.load(p_rowptr + i_k + 1)
    b_acc = tl.zeros([BLOCK_D], dtype=p_out.dtype.element_ty)
    for e in range(start, end):
        j = tl.load(p_col + e).to(tl.int64)
        b_w = tl.load(p_val + e)
        if HAS_C:
            b_w = b_w * tl.load(p_c + j)
        # [BLOCK_D] contiguous elements of row j per non-zero: coalesced, and each non-zero's row is
        # read once per program, the nnz(W) D reads of any CSR product; sharing a loaded row between
        # output rows would pay only where rows share columns, which sparse gossip graphs rarely do
        b_acc += b_w * tl.load(p_v + j * D + o_d, mask=m_d, other=0.0)
    if HAS_G:
        b_acc += tl.load(p_a + i_k) * tl.load(p_g + i_k * D + o_d, mask=m_d, other=0.0)
    tl.store(p_out + i_k * D + o_d, b_acc, mask=m_d)
