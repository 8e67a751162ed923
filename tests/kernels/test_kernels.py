"""Triton kernels against the torch reference (CPU: Triton's interpreter; CUDA when present)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import DEVICE, TOL, assert_close, random_mixing
from dicekern.bindings.gossip_mix import CSRMixing, gossip_mix

pytestmark = pytest.mark.kernels

CASES = [
    pytest.param(n, d, dtype, transpose, extras, id=f"N{n}-D{d}-{str(dtype)[6:]}-{'WT' if transpose else 'W'}-{extras}")
    for n, d in [(7, 1000), (5, 129), (1, 3)]
    for dtype in (torch.float64, torch.float32)
    for transpose in (False, True)
    for extras in ("plain", "scaled")
]


@pytest.mark.parametrize("n, d, dtype, transpose, extras", CASES)
def test_gossip_mix_matches_torch(n: int, d: int, dtype: torch.dtype, transpose: bool, extras: str) -> None:
    g = torch.Generator().manual_seed(n * d)
    W = random_mixing(n, g).to(dtype)
    V = torch.randn(n, d, generator=g, dtype=dtype)
    M = W.T if transpose else W
    mixing = CSRMixing.from_mixing(W.to(DEVICE), transpose=transpose)
    if extras == "plain":
        out = gossip_mix(V.to(DEVICE), mixing)
        expected = M @ V
    else:
        C, a = torch.rand(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
        G = torch.randn(n, d, generator=g, dtype=dtype)
        out = gossip_mix(V.to(DEVICE), mixing, scale=C.to(DEVICE), added=G.to(DEVICE), added_scale=a.to(DEVICE))
        expected = a[:, None] * G + M @ (C[:, None] * V)
    assert out.dtype == dtype
    assert_close(out.cpu(), expected, TOL[dtype].op)


def test_gossip_mix_csr_keeps_only_nonzeros() -> None:
    W = dk.topology.exponential(16)
    mixing = CSRMixing.from_mixing(W)
    assert mixing.val.numel() == 16 * 5 and torch.equal(mixing.rowptr, torch.arange(0, 81, 5))
    assert torch.equal(CSRMixing.from_mixing(W, transpose=True).rowptr, mixing.rowptr)  # in-degree = out-degree here


def test_gossip_mix_rejects_bad_input(monkeypatch) -> None:
    W = dk.topology.ring(4).to(DEVICE)
    mixing = CSRMixing.from_mixing(W)
    V = torch.randn(4, 10, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="mixing is for N=4 nodes, vectors hold N=3"):
        gossip_mix(V[:3], mixing)
    with pytest.raises(ValueError, match="float32 or float64"):
        gossip_mix(V.half(), mixing)
    with pytest.raises(ValueError, match="mixing.val is torch.float64 .* expected torch.float32"):
        gossip_mix(V.float(), mixing)
    with pytest.raises(ValueError, match="vectors must be contiguous"):
        gossip_mix(V.T.contiguous().T, mixing)
    with pytest.raises(ValueError, match="scale must have shape \\(4,\\)"):
        gossip_mix(V, mixing, scale=torch.ones(3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="given together"):
        gossip_mix(V, mixing, added=V)
    with pytest.raises(ValueError, match="not row-stochastic"):
        CSRMixing.from_mixing(2 * W)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            gossip_mix(V, mixing)


MLP_CASES = [
    pytest.param(loss, act, hidden, bias, dtype, id=f"{loss.kind}-{act.__name__}-{len(hidden)}hidden-{str(dtype)[6:]}")
    for loss, act, hidden, bias, dtype in [
        (dk.losses.softmax_cross_entropy, nn.Tanh, (37,), True, torch.float64),
        (dk.losses.binary_logistic, nn.ReLU, (37,), False, torch.float32),
        (dk.losses.squared_error, nn.GELU, (37, 20), True, torch.float64),
        (dk.losses.softmax_cross_entropy, nn.SiLU, (37,), True, torch.float32),
        (dk.losses.squared_error, nn.Sigmoid, (37,), True, torch.float64),
        (dk.losses.binary_logistic, lambda: nn.LeakyReLU(0.1), (37,), True, torch.float64),
        (dk.losses.softmax_cross_entropy, nn.Identity, (), False, torch.float32),  # the linear head
    ]
]


@pytest.mark.parametrize("loss, act, hidden, bias, dtype", MLP_CASES)
def test_mlp_kernel_matches_the_closed_form_engine(loss, act, hidden: tuple[int, ...], bias: bool, dtype: torch.dtype) -> None:
    """Gradients, test gradients, exact and Gauss-Newton products and per-sample scores: B = 20,
    F = 40 and the 37-wide layer span two blocks each."""
    from dicekern.curvature.triton import TritonBackend
    from dicekern.curvature.closed_form import ClosedFormBackend

    g = torch.Generator().manual_seed(len(hidden) + 10 * bias)
    n, batch, features, columns = 3, 20, 40, 2
    outputs = 1 if loss.kind == "binary_logistic" else 5
    widths = (features, *hidden, outputs)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([act()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    reference, kernel = ClosedFormBackend(model, loss), TritonBackend(model, loss)
    d = reference.layout.dim
    thetas = torch.randn(n, d, generator=g, dtype=dtype) / features**0.5
    x = torch.randn(n, batch, features, generator=g, dtype=dtype)
    if loss.kind == "softmax_cross_entropy":
        y = torch.randint(outputs, (n, batch), generator=g)
    elif loss.kind == "binary_logistic":
        y = torch.rand(n, batch, generator=g, dtype=dtype).round()
    else:
        y = torch.randn(n, batch, outputs, generator=g, dtype=dtype)
    weights = torch.rand(n, batch, generator=g, dtype=dtype)
    vectors = torch.randn(n, columns, d, generator=g, dtype=dtype)
    test = (x[0, :17].clone(), y[0, :17].clone())
    to = lambda *ts: [t.to(DEVICE) for t in ts]
    pairs = [
        (kernel.node_grads(*to(thetas, x, y, weights)), reference.node_grads(thetas, x, y, weights)),
        (kernel.test_grads(*to(thetas), tuple(to(*test))), reference.test_grads(thetas, test)),
        (kernel.curvature_products(*to(thetas, x, y, vectors), "exact"), reference.curvature_products(thetas, x, y, vectors, "exact")),
        (kernel.curvature_products(*to(thetas, x, y, vectors), "ggn"), reference.curvature_products(thetas, x, y, vectors, "ggn")),
        (kernel.per_sample_dots(*to(thetas, x, y, vectors)), reference.per_sample_dots(thetas, x, y, vectors)),
    ]
    for actual, expected in pairs:
        assert actual.dtype == dtype
        assert_close(actual.cpu(), expected, TOL[dtype].op)


def test_mlp_launcher_rejects_bad_operands_and_models() -> None:
    from dicekern.curvature.triton import TritonBackend

    model = nn.Linear(4, 3)
    kernel = TritonBackend(model, dk.losses.softmax_cross_entropy)
    on = dict(dtype=torch.float64, device=DEVICE)
    thetas = torch.zeros(2, 15, **on)
    x, y, w = torch.zeros(2, 5, 4, **on), torch.zeros(2, 5, dtype=torch.long, device=DEVICE), torch.full((2, 5), 0.2, **on)
    with pytest.raises(ValueError, match="inputs must have shape \\(2, 5, 4\\)"):
        kernel.node_grads(thetas, torch.zeros(2, 5, 3, **on), y, w)
    with pytest.raises(ValueError, match="targets is torch.float64 .* expected torch.int64"):
        kernel.node_grads(thetas, x, y.double(), w)
    with pytest.raises(ValueError, match="inputs is torch.float32"):
        kernel.node_grads(thetas, x.float(), y, w)
    with pytest.raises(ValueError, match="one activation between each two"):
        TritonBackend(nn.Sequential(nn.Linear(4, 3), nn.Tanh()), dk.losses.softmax_cross_entropy)
    with pytest.raises(ValueError, match="binary_logistic needs one output"):
        TritonBackend(nn.Linear(4, 2), dk.losses.binary_logistic)
    with pytest.raises(ValueError, match="wider than the kernels' 256 outputs"):
        TritonBackend(nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2)), dk.losses.squared_error)
