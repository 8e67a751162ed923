"""MLP kernels: forward, backward and R-op passes of Linear-[act]-...-Linear stacks, per program row;
and the whole DICE chain in one launch, one program per objective column. Codes: kernels/codes.py.

A model is L linear layers; every layer but the last is followed by the activation ACT. Layer l
maps widths[l] to widths[l+1] features; its weight (out, in) sits row-major at woff[l] of the flat
parameter vector, its bias at boff[l] (-1: none). Each program keeps one block of BLOCK_B samples
of one node in a private scratch region of 4L + 4 tiles [BLOCK_B, WMAX]: the layers' outputs A,
pre-activations Z, their R-op twins RA and RZ, and two cotangent tiles with their R twins.
Matmuls run on [BLOCK_B, BW] x [BW, BW] blocks.

Losses (codes LOSS_*): softmax cross-entropy, binary logistic, squared error, on output tiles
[BLOCK_B, WMAX]. Modes of ``mlp_node_kernel`` (one program per node and column):
  GRAD  out = coef sum_b w_b grad loss_b
  HVP   out = coef sum_b H_b v          (exact Hessian; coef = 1/B: the batch mean)
  GGN   out = coef sum_b J_b^T H_o J_b v
  DOTS  out_b = coef grad loss_b^T v
"""

import triton
import triton.language as tl

from dicekern.kernels import codes

# the codes as compile-time constants, so that the kernels compare names, not literals
MODE_GRAD, MODE_HVP, MODE_DOTS, MODE_GGN = (tl.constexpr(c) for c in (codes.MODE_GRAD, codes.MODE_HVP, codes.MODE_DOTS, codes.MODE_GGN))
NO_CURVATURE = tl.constexpr(codes.NO_CURVATURE)
LOSS_SOFTMAX_CE, LOSS_LOGISTIC, LOSS_SQUARED = (tl.constexpr(c) for c in (codes.LOSS_SOFTMAX_CE, codes.LOSS_LOGISTIC, codes.LOSS_SQUARED))
ACT_IDENTITY, ACT_TANH, ACT_RELU, ACT_LEAKY, ACT_GELU, ACT_SILU, ACT_SIGMOID = (
    tl.constexpr(c)
    for c in (codes.ACT_IDENTITY, codes.ACT_TANH, codes.ACT_RELU, codes.ACT_LEAKY, codes.ACT_GELU, codes.ACT_SILU, codes.ACT_SIGMOID)
)

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _softmax(b_o, m_k):
    b_z = tl.where(m_k[None, :], b_o, float("-inf"))
    b_e = tl.where(m_k[None, :], tl.exp(b_z - tl.max(b_z, axis=1)[:, None]), 0.0)
    return b_e / tl.sum(b_e, axis=1)[:, None]


@triton.jit
def _load_tile(p, stride, o_r, m_r, o_c, m_c):
    """The [rows, cols] tile at p + row * stride + col, zero outside the masks m_r (rows), m_c (cols)."""
    return tl.load(p + o_r[:, None] * stride + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _loss_grad(b_o, p_y, o_b, m_b, K, LOSS: tl.constexpr, K_PAD: tl.constexpr):
    """[BLOCK_B, K_PAD] d loss_b / d outputs; samples o_b of the targets at p_y."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    if LOSS == LOSS_SOFTMAX_CE:
        b_y = tl.load(p_y + o_b, mask=m_b, other=0)
        b_r = _softmax(b_o, m_k) - tl.where(o_k[None, :] == b_y[:, None], 1.0, 0.0)
    elif LOSS == LOSS_LOGISTIC:
        b_y = tl.load(p_y + o_b, mask=m_b, other=0.0)
        b_r = 1.0 / (1.0 + tl.exp(-b_o)) - b_y[:, None]
    else:
        tl.static_assert(LOSS == LOSS_SQUARED, "unknown LOSS code")
        b_y = _load_tile(p_y, K, o_b, m_b, o_k, m_k)
        b_r = 2.0 * (b_o - b_y) / K
    return tl.where(m_b[:, None] & m_k[None, :], b_r, 0.0)


@triton.jit
def _loss_hvp(b_o, b_u, m_b, K, LOSS: tl.constexpr, K_PAD: tl.constexpr):
    """[BLOCK_B, K_PAD] H_o u per sample, H_o the loss Hessian in the outputs."""
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    if LOSS == LOSS_SOFTMAX_CE:
        b_p = _softmax(b_o, m_k)
        b_pu = b_p * b_u
        b_h = b_pu - b_p * tl.sum(b_pu, axis=1)[:, None]
    elif LOSS == LOSS_LOGISTIC:
        b_s = 1.0 / (1.0 + tl.exp(-b_o))
        b_h = b_s * (1.0 - b_s) * b_u
    else:
        tl.static_assert(LOSS == LOSS_SQUARED, "unknown LOSS code")
        b_h = 2.0 * b_u / K
    return tl.where(m_b[:, None] & m_k[None, :], b_h, 0.0)


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    """(sigma(z), sigma'(z), sigma''(z)), the derivatives as torch's autograd defines them."""
    if ACT == ACT_TANH:
        e = tl.exp(-2.0 * tl.abs(z))  # no overflow for large |z|
        t = tl.where(z < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
        return t, 1.0 - t * t, -2.0 * t * (1.0 - t * t)
    elif ACT == ACT_RELU or ACT == ACT_LEAKY:
        pos = z > 0
        return tl.where(pos, z, slope * z), tl.where(pos, 1.0, slope + 0.0 * z), 0.0 * z
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT_HALF))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        return z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)
    elif ACT == ACT_SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        return z * s, s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == ACT_SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s, s * (1.0 - s), s * (1.0 - s) * (1.0 - 2.0 * s)
    else:
        tl.static_assert(ACT == ACT_IDENTITY, "unknown ACT code")
        return z, 1.0 + 0.0 * z, 0.0 * z


@triton.jit
def _layer(p_widths, p_woff, p_boff, p_x, stride_x, p_s, l, TILE: tl.constexpr, WMAX: tl.constexpr):
    """Layer l's (inputs, outputs, weight offset, bias offset (-1: none), input block pointer, its
    row stride): the input block is the batch itself for l = 0, else A[l-1]."""
    n_in = tl.load(p_widths + l)
    n_out = tl.load(p_widths + l + 1)
    w_off = tl.load(p_woff + l)
    b_off = tl.load(p_boff + l)
    s_in = stride_x + 0 * l
    p_in = p_x + 0 * l
    if l > 0:
        p_in = p_s + (l - 1) * TILE
        s_in = 0 * stride_x + WMAX
    return n_in, n_out, w_off, b_off, p_in, s_in


@triton.jit
def _forward(p_theta, p_v, p_x, stride_x, p_s, p_widths, p_woff, p_boff, L, slope, m_b, R_OP: tl.constexpr,
             ACT: tl.constexpr, BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr):
    """Z and A (with R_OP also RZ and RA along the direction p_v) of one sample block, every layer.

    Tiles: A[l] = layer l's output at l, Z[l] at L + l, RA[l] at 2L + l, RZ[l] at 3L + l.
    """
    o_b = tl.arange(0, BLOCK_B)
    TILE: tl.constexpr = BLOCK_B * WMAX
    for l in range(0, L):
        n_in, n_out, w_off, b_off, p_in, s_in = _layer(p_widths, p_woff, p_boff, p_x, stride_x, p_s, l, TILE, WMAX)
        p_rin = p_s + (2 * L + l - 1) * TILE
        hidden = l < L - 1
        for o0 in range(0, n_out, BW):
            o_o = o0 + tl.arange(0, BW)
            m_o = o_o < n_out
            b_z = tl.zeros([BLOCK_B, BW], dtype=p_theta.dtype.element_ty)
            b_rz = tl.zeros([BLOCK_B, BW], dtype=p_theta.dtype.element_ty)
            for i0 in range(0, n_in, BW):
                o_i = i0 + tl.arange(0, BW)
                m_i = o_i < n_in
                b_a = _load_tile(p_in, s_in, o_b, m_b, o_i, m_i)
                m_w = m_i[:, None] & m_o[None, :]
                b_w = tl.load(p_theta + w_off + o_o[None, :] * n_in + o_i[:, None], mask=m_w, other=0.0)  # [BW in, BW out]
                b_z += tl.dot(b_a, b_w, input_precision="ieee")  # [BLOCK_B, BW in] @ [BW in, BW out]
                if R_OP:
                    b_rz += tl.dot(b_a, tl.load(p_v + w_off + o_o[None, :] * n_in + o_i[:, None], mask=m_w, other=0.0), input_precision="ieee")
                    if l > 0:
                        b_ra = _load_tile(p_rin, WMAX, o_b, m_b, o_i, m_i)
                        b_rz += tl.dot(b_ra, b_w, input_precision="ieee")
            m_bias = m_o & (o_o * 0 + b_off >= 0)
            b_z += tl.load(p_theta + b_off + o_o, mask=m_bias, other=0.0)[None, :]
            p_tile = o_b[:, None] * WMAX + o_o[None, :]
            m_tile = m_b[:, None] & m_o[None, :]
            tl.store(p_s + (L + l) * TILE + p_tile, b_z, mask=m_tile)
            b_out, b_d1, _ = _act(b_z, ACT, slope)
            tl.store(p_s + l * TILE + p_tile, tl.where(hidden, b_out, b_z), mask=m_tile)
            if R_OP:
                b_rz += tl.load(p_v + b_off + o_o, mask=m_bias, other=0.0)[None, :]
                tl.store(p_s + (3 * L + l) * TILE + p_tile, b_rz, mask=m_tile)
                tl.store(p_s + (2 * L + l) * TILE + p_tile, tl.where(hidden, b_d1 * b_rz, b_rz), mask=m_tile)
        tl.debug_barrier()


@triton.jit
def _cotangents(p_g, p_rg, p_z, p_rz, p_tile, m_tile, hidden, EXACT: tl.constexpr, ACT: tl.constexpr, slope):
    """(gz, R gz): the cotangent of a layer's output through its activation, and its R-op."""
    b_z = tl.load(p_z + p_tile, mask=m_tile, other=0.0)
    _, b_d1, b_d2 = _act(b_z, ACT, slope)
    b_d1 = tl.where(hidden, b_d1, 1.0)
    b_g = tl.load(p_g + p_tile, mask=m_tile, other=0.0)
    b_gz = b_g * b_d1
    b_rgz = b_gz
    if EXACT:
        b_rgz = tl.load(p_rg + p_tile, mask=m_tile, other=0.0) * b_d1 + tl.where(hidden, b_d2, 0.0) * b_g * tl.load(p_rz + p_tile, mask=m_tile, other=0.0)
    return b_gz, b_rgz


@triton.jit
def _backward(p_out, coef, p_theta, p_v, p_x, stride_x, p_s, p_widths, p_woff, p_boff, L, slope, m_b, EXACT: tl.constexpr,
              ACT: tl.constexpr, BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr):
    """out += coef x the parameter gradient of the output cotangent in tile G; with EXACT, of RG
    through the R-op instead (the exact Hessian product). Every layer, one sample block."""
    o_b = tl.arange(0, BLOCK_B)
    TILE: tl.constexpr = BLOCK_B * WMAX
    p_g, p_gin = p_s + 4 * L * TILE, p_s + (4 * L + 1) * TILE
    p_rg, p_rgin = p_s + (4 * L + 2) * TILE, p_s + (4 * L + 3) * TILE
    for k in range(0, L):
        l = L - 1 - k
        n_in, n_out, w_off, b_off, p_in, s_in = _layer(p_widths, p_woff, p_boff, p_x, stride_x, p_s, l, TILE, WMAX)
        p_z, p_rz, p_ra = p_s + (L + l) * TILE, p_s + (3 * L + l) * TILE, p_s + (2 * L + l - 1) * TILE
        hidden = l < L - 1
        # parameter gradients: out[w] += coef sum_b src[b, o] a[b, i] (+ gz^T ra with EXACT), bias += coef sum_b src
        for o0 in range(0, n_out, BW):
            o_o = o0 + tl.arange(0, BW)
            m_o = o_o < n_out
            p_tile = o_b[:, None] * WMAX + o_o[None, :]
            m_tile = m_b[:, None] & m_o[None, :]
            b_gz, b_src = _cotangents(p_g, p_rg, p_z, p_rz, p_tile, m_tile, hidden, EXACT, ACT, slope)
            for i0 in range(0, n_in, BW):
                o_i = i0 + tl.arange(0, BW)
                m_i = o_i < n_in
                b_a = _load_tile(p_in, s_in, o_b, m_b, o_i, m_i)
                b_dw = tl.dot(tl.trans(b_src), b_a, input_precision="ieee")  # [BW out, BLOCK_B] @ [BLOCK_B, BW in]
                if EXACT:
                    if l > 0:
                        b_ra = _load_tile(p_ra, WMAX, o_b, m_b, o_i, m_i)
                        b_dw += tl.dot(tl.trans(b_gz), b_ra, input_precision="ieee")
                p_w = p_out + w_off + o_o[:, None] * n_in + o_i[None, :]
                m_w = m_o[:, None] & m_i[None, :]
                tl.store(p_w, tl.load(p_w, mask=m_w, other=0.0) + coef * b_dw, mask=m_w)
            m_bias = m_o & (o_o * 0 + b_off >= 0)
            tl.store(p_out + b_off + o_o, tl.load(p_out + b_off + o_o, mask=m_bias, other=0.0) + coef * tl.sum(b_src, axis=0), mask=m_bias)
        # cotangents of the layer's input: g_in = gz W (and rg_in = rgz W + gz V)
        if l > 0:
            for i0 in range(0, n_in, BW):
                o_i = i0 + tl.arange(0, BW)
                m_i = o_i < n_in
                b_gin = tl.zeros([BLOCK_B, BW], dtype=p_theta.dtype.element_ty)
                b_rgin = tl.zeros([BLOCK_B, BW], dtype=p_theta.dtype.element_ty)
                for o0 in range(0, n_out, BW):
                    o_o = o0 + tl.arange(0, BW)
                    m_o = o_o < n_out
                    p_tile = o_b[:, None] * WMAX + o_o[None, :]
                    b_gz, b_rgz = _cotangents(p_g, p_rg, p_z, p_rz, p_tile, m_b[:, None] & m_o[None, :], hidden, EXACT, ACT, slope)
                    m_w = m_o[:, None] & m_i[None, :]
                    b_w = tl.load(p_theta + w_off + o_o[:, None] * n_in + o_i[None, :], mask=m_w, other=0.0)  # [BW out, BW in]
                    b_gin += tl.dot(b_gz, b_w, input_precision="ieee")
                    if EXACT:
                        b_rgin += tl.dot(b_rgz, b_w, input_precision="ieee")
                        b_rgin += tl.dot(b_gz, tl.load(p_v + w_off + o_o[:, None] * n_in + o_i[None, :], mask=m_w, other=0.0), input_precision="ieee")
                p_tile = o_b[:, None] * WMAX + o_i[None, :]
                m_tile = m_b[:, None] & m_i[None, :]
                tl.store(p_gin + p_tile, b_gin, mask=m_tile)
                if EXACT:
                    tl.store(p_rgin + p_tile, b_rgin, mask=m_tile)
            tl.debug_barrier()
            p_g, p_gin = p_gin, p_g  # the cotangents of layer l-1's output
            p_rg, p_rgin = p_rgin, p_rg
    tl.debug_barrier()


@triton.jit
def _output_terms(p_s, p_y, p_w, coef, K, L, m_b, b0, MODE: tl.constexpr, LOSS: tl.constexpr,
                  BLOCK_B: tl.constexpr, WMAX: tl.constexpr):
    """At the output tile A[L-1]: GRAD: G = w_b dloss/da; HVP: G = coef dloss/da, RG = coef H_o RA;
    GGN: G = coef H_o RA. Returns the per-sample dots coef dloss/da . RA (for DOTS)."""
    TILE: tl.constexpr = BLOCK_B * WMAX
    o_b = tl.arange(0, BLOCK_B)
    o_k = tl.arange(0, WMAX)
    p_tile = o_b[:, None] * WMAX + o_k[None, :]
    m_tile = m_b[:, None] & (o_k < K)[None, :]
    b_o = tl.load(p_s + (L - 1) * TILE + p_tile, mask=m_tile, other=0.0)
    b_grad = _loss_grad(b_o, p_y, b0 + o_b, m_b, K, LOSS, WMAX)
    b_ra = b_o * 0.0  # RA is written only by the modes that run the R-op
    if MODE != MODE_GRAD:
        b_ra = tl.load(p_s + (3 * L - 1) * TILE + p_tile, mask=m_tile, other=0.0)
    b_dots = coef * tl.sum(b_grad * b_ra, axis=1)
    if MODE == MODE_GRAD:
        tl.store(p_s + 4 * L * TILE + p_tile, b_grad * tl.load(p_w + b0 + o_b, mask=m_b, other=0.0)[:, None], mask=m_tile)
    elif MODE == MODE_HVP:
        tl.store(p_s + 4 * L * TILE + p_tile, coef * b_grad, mask=m_tile)
        tl.store(p_s + (4 * L + 2) * TILE + p_tile, coef * _loss_hvp(b_o, b_ra, m_b, K, LOSS, WMAX), mask=m_tile)
    elif MODE == MODE_GGN:
        tl.store(p_s + 4 * L * TILE + p_tile, coef * _loss_hvp(b_o, b_ra, m_b, K, LOSS, WMAX), mask=m_tile)
    tl.debug_barrier()
    return b_dots


@triton.jit
def _node_pass(p_out, coef, p_theta, p_v, p_x, p_y, p_w, B, F, p_s, p_widths, p_woff, p_boff, L, slope, D,
               MODE: tl.constexpr, ACCUMULATE: tl.constexpr, LOSS: tl.constexpr, ACT: tl.constexpr,
               BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr, BLOCK_D: tl.constexpr):
    """One node's batch (B samples of F features at p_x, targets at p_y, weights at p_w), all
    sample blocks: GRAD, HVP and GGN add coef x their vector to out (D,), zeroed first unless
    ACCUMULATE; DOTS writes coef grad loss_b . v to out (B,)."""
    K = tl.load(p_widths + L)
    if MODE != MODE_DOTS and not ACCUMULATE:
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            tl.store(p_out + o_d, tl.zeros([BLOCK_D], dtype=p_out.dtype.element_ty), mask=o_d < D)
        tl.debug_barrier()
    # GRAD scales by coef in the backward pass; the other modes put coef into the output cotangents
    out_coef = coef
    back_coef = coef
    if MODE == MODE_GRAD:
        out_coef = 1.0 + 0.0 * coef
    else:
        back_coef = 1.0 + 0.0 * coef
    for b0 in range(0, B, BLOCK_B):
        m_b = b0 + tl.arange(0, BLOCK_B) < B
        _forward(p_theta, p_v, p_x + b0 * F, F, p_s, p_widths, p_woff, p_boff, L, slope, m_b, MODE != MODE_GRAD, ACT, BLOCK_B, BW, WMAX)
        b_dots = _output_terms(p_s, p_y, p_w, out_coef, K, L, m_b, b0, MODE, LOSS, BLOCK_B, WMAX)
        if MODE == MODE_DOTS:
            tl.store(p_out + b0 + tl.arange(0, BLOCK_B), b_dots, mask=m_b)
        else:
            _backward(p_out, back_coef, p_theta, p_v, p_x + b0 * F, F, p_s, p_widths, p_woff, p_boff, L, slope, m_b,
                      MODE == MODE_HVP, ACT, BLOCK_B, BW, WMAX)


@triton.jit
def mlp_node_kernel(
    p_out, p_scratch, p_theta, p_v, p_x, p_y, p_w, p_coef, p_widths, p_woff, p_boff,
    L, B, F, D, C, stride_x, stride_y, stride_w, SCRATCH,
    MODE: tl.constexpr, LOSS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row r = (node r // C, column r % C): MODE's quantity of that node's theta, data and column.

    coef (p_coef[0]) and the LeakyReLU slope (p_coef[1]) come through a pointer: a Python float
    would arrive as float32.
    """
    i_r = tl.program_id(0).to(tl.int64)
    i_n = i_r // C
    D = i_r * 0 + D  # int64
    coef = tl.load(p_coef)
    slope = tl.load(p_coef + 1)
    if MODE == MODE_DOTS:
        p_o = p_out + i_r * B
    else:
        p_o = p_out + i_r * D
    _node_pass(p_o, coef, p_theta + i_n * D, p_v + i_r * D, p_x + i_n * stride_x, p_y + i_n * stride_y, p_w=p_w + i_n * stride_w,
               B=B, F=F, p_s=p_scratch + i_r * SCRATCH, p_widths=p_widths, p_woff=p_woff, p_boff=p_boff, L=L, slope=slope, D=D,
               MODE=MODE, ACCUMULATE=False, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)


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
    tl.debug_barrier()


@triton.jit
def _add_flat(p_dst, p_src, D, BLOCK_D: tl.constexpr):
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        tl.store(p_dst + o_d, tl.load(p_dst + o_d, mask=m_d, other=0.0) + tl.load(p_src + o_d, mask=m_d, other=0.0), mask=m_d)
    tl.debug_barrier()


@triton.jit
def _dot_flat(p_u, p_v, D, BLOCK_D: tl.constexpr):
    b_acc = tl.zeros([BLOCK_D], dtype=p_u.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_acc += tl.load(p_u + o_d, mask=o_d < D, other=0.0) * tl.load(p_v + o_d, mask=o_d < D, other=0.0)
    return tl.sum(b_acc, axis=0)


@triton.jit
def _damp(p_vec, p_tmp, coef, p_theta, p_x, p_y, B, F, p_s, p_widths, p_woff, p_boff, L, slope, D,
          CURVATURE: tl.constexpr, LOSS: tl.constexpr, ACT: tl.constexpr,
          BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr, BLOCK_D: tl.constexpr):
    """vec <- vec + coef sum_b H_b vec at one node (coef = -lr/B: (I - lr H) vec); CURVATURE is
    the mode of the product, MODE_HVP (exact) or MODE_GGN (Gauss-Newton)."""
    tl.static_assert(CURVATURE == MODE_HVP or CURVATURE == MODE_GGN, "a damped product needs a curvature mode")
    # p_w: sample weights are read by MODE_GRAD only, so any pointer stands in
    _node_pass(p_tmp, coef, p_theta, p_vec, p_x, p_y, p_w=p_y, B=B, F=F, p_s=p_s, p_widths=p_widths, p_woff=p_woff, p_boff=p_boff,
               L=L, slope=slope, D=D, MODE=CURVATURE, ACCUMULATE=False, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX,
               BLOCK_D=BLOCK_D)
    _add_flat(p_vec, p_tmp, D, BLOCK_D)


@triton.jit
def mlp_adjoint_chain_kernel(
    p_out, p_buf, p_scratch, p_thetas, p_theta0, p_x, p_y, p_coef, p_rowptr, p_col, p_val, p_q, p_xt, p_yt, p_one,
    p_widths, p_woff, p_boff, p_slope, L, N, B, F, D, stride_xr, stride_yr, stride_yn, stride_yt, stride_ts, stride_tn, SCRATCH,
    HOPS: tl.constexpr, SENDER: tl.constexpr, CURVATURE: tl.constexpr, LOSS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[m, j, b] = Delta_j(z_b)^T (q_j g_{m,j}^{(0)} + ((W^t)^T lambda_m^{(1)})_j) for test point m.

    p_thetas (HOPS+1, N, D): [0] the direct point, [s] theta^{t+s}; p_x, p_y, p_coef (-lr_k/B per
    round and node) and the CSR of (W^{t+s})^T for rounds s = 0..max(HOPS,1)-1. Test point m at hop
    s and node k is p_xt + s stride_ts + k stride_tn + m F (strides 0 for a shared test set).
    CURVATURE: NO_CURVATURE, MODE_HVP (exact) or MODE_GGN (Gauss-Newton). Each program owns 2N + 1 vectors (D,).
    """
    i_m = tl.program_id(0).to(tl.int64)
    D = i_m * 0 + D  # int64: node offsets k D and (HOPS N + k) D may pass 2^31
    B = i_m * 0 + B  # int64: batch offsets k B F may pass 2^31
    p_a = p_buf + i_m * (2 * N + 1) * D
    p_b = p_a + N * D
    p_tmp = p_b + N * D
    p_s = p_scratch + i_m * SCRATCH
    slope = tl.load(p_slope)
    p_xm = p_xt + i_m * F
    p_ym = p_yt + i_m * stride_yt
    # A test point's gradient is a node pass over a batch of one: tl.dot needs tiles of at least 16
    # rows, so 15 of BLOCK_B rows are masked padding. Packing several points into one tile would
    # break the one-column-per-program layout that keeps each chain's vectors private; at batch 16
    # the padded pass costs about half of one damped product's passes.
    for k in range(0, N):  # lambda^{(HOPS)} = q g^{(HOPS)}, or the direct term alone when HOPS = 0
        _node_pass(p_a + k * D, tl.load(p_q + k), p_thetas + (HOPS * N + k) * D, p_a, p_xm + HOPS * stride_ts + k * stride_tn, p_ym,
                   p_w=p_one, B=1, F=F, p_s=p_s, p_widths=p_widths, p_woff=p_woff, p_boff=p_boff, L=L, slope=slope, D=D,
                   MODE=MODE_GRAD, ACCUMULATE=False, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
    for i in tl.static_range(HOPS, 0, -1):  # lambda^{(i-1)} from lambda^{(i)} through round i-1
        s = i - 1
        p_theta_s = p_thetas + s * N * D
        p_xs = p_x + s * stride_xr
        p_ys = p_y + s * stride_yr
        p_coef_s = p_coef + s * N
        if CURVATURE != NO_CURVATURE and not SENDER and s > 0:
            for k in range(0, N):
                _damp(p_a + k * D, p_tmp, tl.load(p_coef_s + k), p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, B, F, p_s,
                      p_widths, p_woff, p_boff, L, slope, D,
                      CURVATURE=CURVATURE, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
        _mix_nodes(p_b, p_a, p_rowptr + s * (N + 1), p_col, p_val, N, D, BLOCK_D)
        for k in range(0, N):
            if CURVATURE != NO_CURVATURE and SENDER and s > 0:
                _damp(p_b + k * D, p_tmp, tl.load(p_coef_s + k), p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, B, F, p_s,
                      p_widths, p_woff, p_boff, L, slope, D,
                      CURVATURE=CURVATURE, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
            _node_pass(p_b + k * D, tl.load(p_q + k), p_theta_s + k * D, p_b, p_xm + s * stride_ts + k * stride_tn, p_ym,
                       p_w=p_one, B=1, F=F, p_s=p_s, p_widths=p_widths, p_woff=p_woff, p_boff=p_boff, L=L, slope=slope, D=D,
                       MODE=MODE_GRAD, ACCUMULATE=True, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
        p_a, p_b = p_b, p_a
    for j in range(0, N):
        _node_pass(p_out + (i_m * N + j) * B, tl.load(p_coef + j), p_theta0 + j * D, p_a + j * D, p_x + j * B * F, p_y + j * stride_yn,
                   p_w=p_one, B=B, F=F, p_s=p_s, p_widths=p_widths, p_woff=p_woff, p_boff=p_boff, L=L, slope=slope, D=D,
                   MODE=MODE_DOTS, ACCUMULATE=False, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)


@triton.jit
def mlp_forward_chain_kernel(
    p_out, p_buf, p_scratch, p_thetas, p_x, p_y, p_coef, p_rowptr, p_col, p_val, p_disp, p_g,
    p_widths, p_woff, p_boff, p_slope, L, N, B, F, D, stride_xr, stride_yr, stride_yn, SCRATCH,
    HOPS: tl.constexpr, SENDER: tl.constexpr, CURVATURE: tl.constexpr, LOSS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BW: tl.constexpr, WMAX: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[s, j, k] = q_k g_k^{(s)T} delta^{(s)}_k for the whole batch of source j (every element written).

    p_g (HOPS+1, N, D): q-scaled test gradients; p_disp (N, D): every node's Delta; p_thetas, p_x,
    p_y, p_coef and the CSR of W^{t+s} as in the adjoint kernel.
    """
    i_j = tl.program_id(0).to(tl.int64)
    D = i_j * 0 + D  # int64: node offsets k D and (HOPS N + k) D may pass 2^31
    B = i_j * 0 + B  # int64: batch offsets k B F may pass 2^31
    p_a = p_buf + i_j * (2 * N + 1) * D
    p_b = p_a + N * D
    p_tmp = p_b + N * D
    p_s = p_scratch + i_j * SCRATCH
    slope = tl.load(p_slope)
    b_direct = _dot_flat(p_g + i_j * D, p_disp + i_j * D, D, BLOCK_D)
    for k in range(0, N):  # hop 0 reaches the source only
        tl.store(p_out + i_j * N + k, tl.where(k == i_j, b_direct, 0.0))
    if HOPS > 0:
        for k in range(0, N):  # delta^{(0)} = e_j Delta_j
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                b_v = tl.load(p_disp + i_j * D + o_d, mask=o_d < D, other=0.0)
                tl.store(p_a + k * D + o_d, tl.where(k == i_j, b_v, 0.0), mask=o_d < D)
        tl.debug_barrier()
    for s in tl.static_range(0, HOPS):  # delta^{(s+1)} from delta^{(s)} through round s
        p_theta_s = p_thetas + s * N * D
        p_xs = p_x + s * stride_xr
        p_ys = p_y + s * stride_yr
        p_coef_s = p_coef + s * N
        if CURVATURE != NO_CURVATURE and SENDER and s > 0:
            for k in range(0, N):
                _damp(p_a + k * D, p_tmp, tl.load(p_coef_s + k), p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, B, F, p_s,
                      p_widths, p_woff, p_boff, L, slope, D,
                      CURVATURE=CURVATURE, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
        _mix_nodes(p_b, p_a, p_rowptr + s * (N + 1), p_col, p_val, N, D, BLOCK_D)
        for k in range(0, N):
            if CURVATURE != NO_CURVATURE and not SENDER and s > 0:
                _damp(p_b + k * D, p_tmp, tl.load(p_coef_s + k), p_theta_s + k * D, p_xs + k * B * F, p_ys + k * stride_yn, B, F, p_s,
                      p_widths, p_woff, p_boff, L, slope, D,
                      CURVATURE=CURVATURE, LOSS=LOSS, ACT=ACT, BLOCK_B=BLOCK_B, BW=BW, WMAX=WMAX, BLOCK_D=BLOCK_D)
            tl.store(p_out + ((s + 1) * N + i_j) * N + k, _dot_flat(p_g + ((s + 1) * N + k) * D, p_b + k * D, D, BLOCK_D))
        p_a, p_b = p_b, p_a
