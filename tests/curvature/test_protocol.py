"""The curvature-backend protocol: declared capabilities, no inherited methods, dispatch by capability."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import TOL, assert_close, cross_entropy, random_run
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.curvature.protocol import Capabilities, CurvatureBackend
from dicekern.curvature.select import BACKEND_CLASSES, select_backend
from dicekern.curvature.torch_func import TorchFuncBackend

PROTOCOL_METHODS = ["unsupported", "node_grads", "per_sample_grads", "test_grads", "test_point_grads", "curvature_products", "per_sample_dots"]
MLP = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
CNN = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(BACKEND_CLASSES))
def test_every_backend_declares_itself_and_writes_every_method_itself(name: str) -> None:
    backend = BACKEND_CLASSES[name]
    assert isinstance(backend.capabilities, Capabilities) and backend.capabilities.name == name
    assert object in backend.__mro__[1:] and len(backend.__mro__) == 2, f"{backend.__name__} inherits from {backend.__mro__[1:]}"
    missing = [m for m in PROTOCOL_METHODS if m not in vars(backend)]
    assert not missing, f"{backend.__name__} does not define {missing} itself"
    for method in PROTOCOL_METHODS[1:]:  # the same signature as the protocol's
        assert inspect.signature(getattr(backend, method)) == inspect.signature(getattr(CurvatureBackend, method)), method


def test_backends_satisfy_the_protocol_at_run_time() -> None:
    for backend in (TorchFuncBackend(MLP, dk.losses.softmax_cross_entropy), ClosedFormBackend(MLP, dk.losses.softmax_cross_entropy)):
        assert isinstance(backend, CurvatureBackend)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_logistic", "squared_error"])
def test_the_closed_form_computes_every_protocol_method_as_the_reference(loss: str) -> None:
    """Fresh random inputs, float64, N=3 nodes, B=7, C=2 columns, M=5 test points."""
    g = torch.Generator().manual_seed(len(loss))
    outputs = 1 if loss == "binary_logistic" else 4
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, outputs)).double()
    loss_fn = getattr(dk.losses, loss)
    reference, closed_form = TorchFuncBackend(model, loss_fn), ClosedFormBackend(model, loss_fn)
    d = reference.layout.dim

    def targets(*lead: int) -> torch.Tensor:
        if loss == "softmax_cross_entropy":
            return torch.randint(outputs, lead, generator=g)
        if loss == "binary_logistic":
            return torch.rand(*lead, generator=g, dtype=torch.float64).round()
        return torch.randn(*lead, outputs, generator=g, dtype=torch.float64)

    params = torch.randn(3, d, generator=g, dtype=torch.float64)
    x, y = torch.randn(3, 7, 6, generator=g, dtype=torch.float64), targets(3, 7)
    weights, vectors = torch.rand(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 2, d, generator=g, dtype=torch.float64)
    test = (torch.randn(5, 6, generator=g, dtype=torch.float64), targets(5))
    calls = {
        "node_grads": (params, x, y, weights), "per_sample_grads": (params, x, y), "test_grads": (params, test),
        "test_point_grads": (params, test[0].expand(3, *test[0].shape), test[1]),
        "curvature_products exact": (params, x, y, vectors, "exact"), "curvature_products ggn": (params, x, y, vectors, "ggn"),
        "per_sample_dots": (params, x, y, vectors),
    }
    for call, args in calls.items():
        method = call.split()[0]
        assert_close(getattr(closed_form, method)(*args), getattr(reference, method)(*args), TOL[torch.float64].op)


def test_a_named_backend_that_cannot_run_the_query_says_what_is_missing(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend='closed_form' cannot run this query: module 0 is a Conv1d"):
        select_backend("closed_form", CNN, dk.losses.softmax_cross_entropy, (1, 10), CPU, torch.float64)
    with pytest.raises(ValueError, match="backend='closed_form' cannot run this query: the loss is not one of dk.losses"):
        select_backend("closed_form", MLP, cross_entropy, (6,), CPU, torch.float64)
    with pytest.raises(ValueError, match="backend 'closed_form' computes in torch.float32, torch.float64, not torch.float16"):
        select_backend("closed_form", MLP, dk.losses.softmax_cross_entropy, (6,), CPU, torch.float16)
    with pytest.raises(ValueError, match="put an nn.Flatten first"):
        select_backend("closed_form", MLP, dk.losses.softmax_cross_entropy, (2, 3), CPU, torch.float64)
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(ValueError, match="backend=.triton. cannot run this query: module 1 is a Softplus"):
            select_backend("triton", nn.Sequential(nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 4)), dk.losses.softmax_cross_entropy,
                           (6,), CPU, torch.float64)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="backend='triton' cannot run this query: .*TRITON_INTERPRET=1"):
            select_backend("triton", MLP, dk.losses.softmax_cross_entropy, (6,), CPU, torch.float64)
    assert select_backend("torch", CNN, cross_entropy, (1, 10), CPU, torch.float64).name == "torch"


def test_auto_takes_the_fastest_capable_backend_and_says_why_it_passed_others_over() -> None:
    chosen = select_backend("auto", MLP, dk.losses.softmax_cross_entropy, (6,), CPU, torch.float64)
    assert (chosen.name, chosen.fallback) == ("closed_form", None)
    chosen = select_backend("auto", CNN, dk.losses.softmax_cross_entropy, (1, 10), CPU, torch.float64)
    assert chosen.name == "torch" and chosen.fallback == "closed_form: module 0 is a Conv1d: only nn.Linear, Tanh, ReLU, LeakyReLU, " \
        "GELU, SiLU, Sigmoid, Identity and a leading nn.Flatten"
    if importlib.util.find_spec("triton") is not None:  # the device is only a descriptor here: nothing runs
        cuda = torch.device("cuda")
        assert select_backend("auto", MLP, dk.losses.softmax_cross_entropy, (6,), cuda, torch.float64).name == "triton"
        distrusted = select_backend("auto", MLP, dk.losses.softmax_cross_entropy, (6,), cuda, torch.float64, trusted=lambda b: b is not BACKEND_CLASSES["triton"])
        assert distrusted.name == "closed_form" and distrusted.fallback == "triton: its self-check on cuda in torch.float64 failed"


def test_plan_query_shows_the_backend_and_the_fallback() -> None:
    run = random_run(4, rounds=3, seed=2, loss_fn=dk.losses.softmax_cross_entropy)
    plan = dk.plan_query(run.trajectory, 0, run.test, 2)
    assert (plan.backend, plan.fallback, len(plan.window), plan.hops) == ("closed_form", None, 3, 2)
    assert dk.plan_query(run.trajectory, 0, run.test, 2, backend="torch").backend == "torch"
    cnn = random_run(4, rounds=3, seed=2, loss_fn=dk.losses.softmax_cross_entropy,
                     model=nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 3)))
    plan = dk.plan_query(cnn.trajectory, 0, cnn.test, 1)
    assert plan.backend == "torch" and plan.fallback.startswith("closed_form: module 0 is a Unflatten")
