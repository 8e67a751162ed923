"""The whole DICE chain of a linear head in one launch: one program per objective column.

Each program walks every hop over every node (mix through CSR, damp by I - lr H, accumulate) with
two (N, D) buffers of its own, so no grid-wide synchronisation is needed and the kernels also run
in Triton's interpreter. Flat node vectors are A (K, F) row-major then the bias (K,).
"""

import triton
import triton.language as tl

from dicekern.kernels.linear_head import _affine, _damp_node, _loss_grad, _sample_vectors


@triton.jit
def _mix_nodes(p_dst, p_src, p_rowptr, p_col, p_val, N, D, BLOCK_D: tl.constexpr):
    """dst[k] = sum_{j in row k} M[k, j] src[j] for every node k."""
    for k in range(0, N):
        start = tl.load(p_rowptr + k)
        end = tl.load(p_rowptr + k + 1)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_acc = tl.zeros([BLOCK_D], dtype=p_dst.dtype.element_ty)
            for e in range(start, end):
                j = tl.load(p_col + e).to(tl.int64)
                b_acc += tl.load(p_val + e) * tl.load(p_src + j * D + o_d, mask=m_d, other=0.0)
            tl.store(p_dst + k * D + o_d, b_acc, mask=m_d)


@triton.jit
def _point_residual(p_theta, p_xm, p_ym, F, K, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr):
    """[K_PAD] d loss / d outputs of one test point at theta (a block of 16 rows, one valid)."""
    o_b = tl.arange(0, 16)
    m_b = o_b < 1
    b_o = _affine(p_theta, p_xm, o_b, m_b, F, K, HAS_BIAS, 16, BLOCK_F, K_PAD)
    return tl.sum(_loss_grad(b_o, p_ym, o_b, m_b, K, LOSS, K_PAD), axis=0)


@triton.jit
def _add_outer(p_vec, b_r, p_xm, F, K, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr):
    """vec (+)= r x_m^T (the gradient of one test point's loss: rank one), bias part (+)= r."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + tl.arange(0, BLOCK_F)
        m_f = o_f < F
        p_blk = p_vec + o_k[:, None] * F + o_f[None, :]
        b_new = b_r[:, None] * tl.load(p_xm + o_f, mask=m_f, other=0.0)[None, :]  # [K_PAD, BLOCK_F]
        if ACCUMULATE:
            b_new += tl.load(p_blk, mask=m_k[:, None] & m_f[None, :], other=0.0)
        tl.store(p_blk, b_new, mask=m_k[:, None] & m_f[None, :])
    if HAS_BIAS:
        b_bias = b_r
        if ACCUMULATE:
            b_bias += tl.load(p_vec + K * F + o_k, mask=m_k, other=0.0)
        tl.store(p_vec + K * F + o_k, b_bias, mask=m_k)


@triton.jit
def _dot_flat(p_u, p_v, D, BLOCK_D: tl.constexpr):
    b_acc = tl.zeros([BLOCK_D], dtype=p_u.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_acc += tl.load(p_u + o_d, mask=o_d < D, other=0.0) * tl.load(p_v + o_d, mask=o_d < D, other=0.0)
    return tl.sum(b_acc, axis=0)


@triton.jit
def linear_head_adjoint_chain_kernel(
    p_out, p_buf, p_scratch, p_thetas, p_theta0, p_x, p_y, p_coef, p_rowptr, p_col, p_val, p_q, p_xt, p_yt,
    N, B, F, K, D, stride_xr, stride_yr, stride_yn, stride_yt, stride_ts, stride_tn,
    HOPS: tl.constexpr, SENDER: tl.constexpr, CURVATURE: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """out[m, j, b] = Delta_j(z_b)^T (q_j g_{m,j}^{(0)} + ((W^t)^T lambda_m^{(1)})_j) for test point m.

    p_thetas (HOPS+1, N, D): [0] the direct point, [s] theta^{t+s}; p_x, p_y, p_coef (-lr_k/B per
    round and node) and the CSR of (W^{t+s})^T (rowptr absolute into col/val) for rounds s = 0..max(HOPS,1)-1. Test point m
    at hop s and node k is p_xt + s stride_ts + k stride_tn + m F (strides 0 for a shared test set).
    """
    i_m = tl.program_id(0).to(tl.int64)
    p_a = p_buf + i_m * 2 * N * D
    p_b = p_a + N * D
    p_scratch += i_m * B * K_PAD
    p_xm = p_xt + i_m * F
    p_ym = p_yt + i_m * stride_yt
    for k in range(0, N):  # lambda^{(HOPS)} = q g^{(HOPS)}, or the direct term alone when HOPS = 0
        p_xmk = p_xm + HOPS * stride_ts + k * stride_tn
        b_r = tl.load(p_q + k) * _point_residual(p_thetas + (HOPS * N + k) * D, p_xmk, p_ym, F, K, LOSS, HAS_BIAS, BLOCK_F, K_PAD)
        _add_outer(p_a + k * D, b_r, p_xmk, F, K, False, HAS_BIAS, BLOCK_F, K_PAD)
    for i in tl.static_range(HOPS, 0, -1):  # lambda^{(i-1)} from lambda^{(i)} through round i-1
        s = i - 1
        tl.debug_barrier()
        p_theta_s = p_thetas + s * N * D
        p_xs = p_x + s * stride_xr
        p_ys = p_y + s * stride_yr
        p_coef_s = p_coef + s * N
        p_rowptr_s = p_rowptr + s * (N + 1)
        if CURVATURE and not SENDER and s > 0:
            for k in range(0, N):
                _damp_node(p_a + k * D, p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, p_scratch, tl.load(p_coef_s + k), B, F, K, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
        _mix_nodes(p_b, p_a, p_rowptr_s, p_col, p_val, N, D, BLOCK_D)
        tl.debug_barrier()
        for k in range(0, N):
            if CURVATURE and SENDER and s > 0:
                _damp_node(p_b + k * D, p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, p_scratch, tl.load(p_coef_s + k), B, F, K, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
            p_xmk = p_xm + s * stride_ts + k * stride_tn
            b_r = tl.load(p_q + k) * _point_residual(p_theta_s + k * D, p_xmk, p_ym, F, K, LOSS, HAS_BIAS, BLOCK_F, K_PAD)
            _add_outer(p_b + k * D, b_r, p_xmk, F, K, True, HAS_BIAS, BLOCK_F, K_PAD)
        p_a, p_b = p_b, p_a
    tl.debug_barrier()
    for j in range(0, N):
        _sample_vectors(p_scratch, p_out + (i_m * N + j) * B, p_theta0 + j * D, p_a + j * D, p_x + j * B * F,
                        p_y + j * stride_yn, p_y, tl.load(p_coef + j), B, F, K, 2, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)


@triton.jit
def linear_head_forward_chain_kernel(
    p_out, p_buf, p_scratch, p_thetas, p_x, p_y, p_coef, p_rowptr, p_col, p_val, p_disp, p_g,
    N, B, F, K, D, stride_xr, stride_yr, stride_yn,
    HOPS: tl.constexpr, SENDER: tl.constexpr, CURVATURE: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """out[s, j, k] = q_k g_k^{(s)T} delta^{(s)}_k for the whole batch of source j (every element written).

    p_g (HOPS+1, N, D): q-scaled test gradients; p_disp (N, D): every node's Delta; p_thetas,
    p_x, p_y, p_coef and the CSR of W^{t+s} as in the adjoint kernel.
    """
    i_j = tl.program_id(0).to(tl.int64)
    p_a = p_buf + i_j * 2 * N * D
    p_b = p_a + N * D
    p_scratch += i_j * B * K_PAD
    b_direct = _dot_flat(p_g + i_j * D, p_disp + i_j * D, D, BLOCK_D)
    for k in range(0, N):  # hop 0 reaches the source only
        tl.store(p_out + i_j * N + k, tl.where(k == i_j, b_direct, 0.0))
    if HOPS > 0:
        for k in range(0, N):  # delta^{(0)} = e_j Delta_j
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                b_v = tl.load(p_disp + i_j * D + o_d, mask=o_d < D, other=0.0)
                tl.store(p_a + k * D + o_d, tl.where(k == i_j, b_v, 0.0), mask=o_d < D)
    for s in tl.static_range(0, HOPS):  # delta^{(s+1)} from delta^{(s)} through round s
        tl.debug_barrier()
        p_theta_s = p_thetas + s * N * D
        p_xs = p_x + s * stride_xr
        p_ys = p_y + s * stride_yr
        p_coef_s = p_coef + s * N
        if CURVATURE and SENDER and s > 0:
            for k in range(0, N):
                _damp_node(p_a + k * D, p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, p_scratch, tl.load(p_coef_s + k), B, F, K, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
        _mix_nodes(p_b, p_a, p_rowptr + s * (N + 1), p_col, p_val, N, D, BLOCK_D)
        tl.debug_barrier()
        for k in range(0, N):
            if CURVATURE and not SENDER and s > 0:
                _damp_node(p_b + k * D, p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, p_scratch, tl.load(p_coef_s + k), B, F, K, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
            tl.store(p_out + ((s + 1) * N + i_j) * N + k, _dot_flat(p_g + ((s + 1) * N + k) * D, p_b + k * D, D, BLOCK_D))
        p_a, p_b = p_b, p_a
