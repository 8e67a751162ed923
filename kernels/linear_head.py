"""Closed-form gradients, curvature products and per-sample scores of a linear head, batched over rows.

A node's flat parameters are A (K, F) row-major, then the bias (K,) when HAS_BIAS. The curvature of
a linear model is J^T H_o J exactly, with H_o the loss Hessian in the K outputs, so every product
reduces to per-sample K-vectors: x_b^T V (the JVP), H_o u, and sum_b u_b x_b^T (the pullback).
"""

import triton
import triton.language as tl

MODE_GRAD = 0  # out = sum_b w_b grad loss_b(theta)
MODE_HVP = 1  # out = coef sum_b J_b^T H_o J_b v (coef = 1/B: the batch-mean Hessian times v)
MODE_DOTS = 2  # out_b = grad loss_b(theta)^T v
LOSS_SOFTMAX_CE = 0
LOSS_LOGISTIC = 1
LOSS_SQUARED = 2


@triton.jit
def _affine(p_a, p_x, o_b, m_b, F, K, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr):
    """[BLOCK_B, K_PAD] rows x_b A^T + bias, A and bias flat at p_a."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    b_acc = tl.zeros([BLOCK_B, K_PAD], dtype=p_a.dtype.element_ty)
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + tl.arange(0, BLOCK_F)
        m_f = o_f < F
        b_x = tl.load(p_x + o_b[:, None] * F + o_f[None, :], mask=m_b[:, None] & m_f[None, :], other=0.0)
        b_a = tl.load(p_a + o_k[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(b_x, b_a, input_precision="ieee")  # [BLOCK_B, BLOCK_F] @ [BLOCK_F, K_PAD]
    if HAS_BIAS:
        b_acc += tl.load(p_a + K * F + o_k, mask=m_k, other=0.0)[None, :]
    return b_acc


@triton.jit
def _softmax(b_o, m_k):
    b_z = tl.where(m_k[None, :], b_o, float("-inf"))
    b_e = tl.where(m_k[None, :], tl.exp(b_z - tl.max(b_z, axis=1)[:, None]), 0.0)
    return b_e / tl.sum(b_e, axis=1)[:, None]


@triton.jit
def _loss_grad(b_o, p_y, o_b, m_b, K, LOSS: tl.constexpr, K_PAD: tl.constexpr):
    """[BLOCK_B, K_PAD] d loss_b / d outputs."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    if LOSS == 0:
        b_y = tl.load(p_y + o_b, mask=m_b, other=0)
        b_r = _softmax(b_o, m_k) - tl.where(o_k[None, :] == b_y[:, None], 1.0, 0.0)
    elif LOSS == 1:
        b_y = tl.load(p_y + o_b, mask=m_b, other=0.0)
        b_r = 1.0 / (1.0 + tl.exp(-b_o)) - b_y[:, None]
    else:
        b_y = tl.load(p_y + o_b[:, None] * K + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        b_r = 2.0 * (b_o - b_y) / K
    return tl.where(m_b[:, None] & m_k[None, :], b_r, 0.0)


@triton.jit
def _loss_hvp(b_o, b_u, m_b, K, LOSS: tl.constexpr, K_PAD: tl.constexpr):
    """[BLOCK_B, K_PAD] H_o u per sample, H_o the loss Hessian in the outputs."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    if LOSS == 0:
        b_p = _softmax(b_o, m_k)
        b_pu = b_p * b_u
        b_h = b_pu - b_p * tl.sum(b_pu, axis=1)[:, None]
    elif LOSS == 1:
        b_s = 1.0 / (1.0 + tl.exp(-b_o))
        b_h = b_s * (1.0 - b_s) * b_u
    else:
        b_h = 2.0 * b_u / K
    return tl.where(m_b[:, None] & m_k[None, :], b_h, 0.0)


@triton.jit
def _sample_vectors(
    p_scratch, p_dots, p_theta, p_v, p_x, p_y, p_w, coef, B, F, K,
    MODE: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr,
):
    """Phase 1, one node: a K-vector per sample into scratch [B, K_PAD] (GRAD: w_b r_b; HVP:
    coef H_o J v), or DOTS: coef r_b^T J v into p_dots [B]."""
    o_k = tl.arange(0, K_PAD)
    for b0 in range(0, B, BLOCK_B):
        o_b = b0 + tl.arange(0, BLOCK_B)
        m_b = o_b < B
        b_o = _affine(p_theta, p_x, o_b, m_b, F, K, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
        if MODE == 0:
            b_vec = _loss_grad(b_o, p_y, o_b, m_b, K, LOSS, K_PAD) * tl.load(p_w + o_b, mask=m_b, other=0.0)[:, None]
        else:
            b_jv = _affine(p_v, p_x, o_b, m_b, F, K, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)  # J v, [BLOCK_B, K_PAD]
            if MODE == 1:
                b_vec = coef * _loss_hvp(b_o, b_jv, m_b, K, LOSS, K_PAD)
            else:
                b_r = _loss_grad(b_o, p_y, o_b, m_b, K, LOSS, K_PAD)
                tl.store(p_dots + o_b, coef * tl.sum(b_r * b_jv, axis=1), mask=m_b)
        if MODE != 2:
            tl.store(p_scratch + o_b[:, None] * K_PAD + o_k[None, :], b_vec, mask=m_b[:, None])


@triton.jit
def _pullback(
    p_out, p_base, p_scratch, p_x, B, F, K,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr,
):
    """Phase 2, one node: out = base + sum_b vec_b x_b^T (bias: + sum_b vec_b); p_out may be p_base."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + tl.arange(0, BLOCK_F)
        m_f = o_f < F
        m_kf = m_k[:, None] & m_f[None, :]
        if HAS_BASE:
            b_acc = tl.load(p_base + o_k[:, None] * F + o_f[None, :], mask=m_kf, other=0.0)
        else:
            b_acc = tl.zeros([K_PAD, BLOCK_F], dtype=p_out.dtype.element_ty)
        for b0 in range(0, B, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            b_vec = tl.load(p_scratch + o_b[:, None] * K_PAD + o_k[None, :], mask=m_b[:, None], other=0.0)
            b_x = tl.load(p_x + o_b[:, None] * F + o_f[None, :], mask=m_b[:, None] & m_f[None, :], other=0.0)
            b_acc += tl.dot(tl.trans(b_vec), b_x, input_precision="ieee")  # [K_PAD, BLOCK_B] @ [BLOCK_B, BLOCK_F]
        tl.store(p_out + o_k[:, None] * F + o_f[None, :], b_acc, mask=m_kf)
    if HAS_BIAS:
        if HAS_BASE:
            b_bias = tl.load(p_base + K * F + o_k, mask=m_k, other=0.0)
        else:
            b_bias = tl.zeros([K_PAD], dtype=p_out.dtype.element_ty)
        for b0 in range(0, B, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B)
            b_vec = tl.load(p_scratch + o_b[:, None] * K_PAD + o_k[None, :], mask=(o_b < B)[:, None], other=0.0)
            b_bias += tl.sum(b_vec, axis=0)
        tl.store(p_out + K * F + o_k, b_bias, mask=m_k)


@triton.jit
def _damp_node(
    p_vec, p_theta, p_x, p_y, p_scratch, coef, B, F, K,
    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr,
):
    """vec <- vec + coef H(theta) vec in place, for one node (coef = -lr/B damps)."""
    _sample_vectors(p_scratch, p_scratch, p_theta, p_vec, p_x, p_y, p_y, coef, B, F, K, 1, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
    tl.debug_barrier()  # phase 1 has read all of vec and written scratch before phase 2 overwrites vec
    _pullback(p_vec, p_vec, p_scratch, p_x, B, F, K, True, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
    tl.debug_barrier()


@triton.jit
def linear_head_fwd_kernel(
    p_out, p_scratch, p_theta, p_v, p_x, p_y, p_w,
    p_coef, B, F, K, D, C, stride_x, stride_y, stride_w,
    MODE: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr,
):
    """Row r = (node r // C, column r % C): GRAD, HVP or DOTS of that node's theta and data.

    coef (HVP: 1/B, DOTS: a scale) comes through a pointer: a Python float argument would arrive
    as float32.
    """
    i_r = tl.program_id(0).to(tl.int64)
    i_n = i_r // C
    p_theta += i_n * D
    p_x += i_n * stride_x
    p_y += i_n * stride_y
    p_w += i_n * stride_w
    p_v += i_r * D
    p_scratch += i_r * B * K_PAD
    _sample_vectors(p_scratch, p_out + i_r * B, p_theta, p_v, p_x, p_y, p_w, tl.load(p_coef), B, F, K, MODE, LOSS, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
    if MODE != 2:
        tl.debug_barrier()  # phase 1's scratch writes must be visible to the whole program
        _pullback(p_out + i_r * D, p_v, p_scratch, p_x, B, F, K, False, HAS_BIAS, BLOCK_B, BLOCK_F, K_PAD)
