"""The closed-form engine against the torch.func reference, to 1e-10 in float64: every activation
and loss, every quantity of the chain, every query, hops 0..4, every optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import TOL, assert_close, random_mixing
from dicekern.curvature.round import gossip_round
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.curvature.torch_func import TorchFuncBackend

LOSSES = {"ce": (dk.losses.softmax_cross_entropy, 4), "logistic": (dk.losses.binary_logistic, 1), "squared": (dk.losses.squared_error, 3)}
ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.07), "gelu": nn.GELU, "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid, "identity": nn.Identity,
}


def mlp(activation: str, outputs: int, *, flatten: bool = False, bias: bool = True) -> nn.Module:
    act = ACTIVATIONS[activation]
    layers = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(6, 5, bias=bias), act(), nn.Linear(5, 7), act(), nn.Linear(7, outputs, bias=bias)]
    return nn.Sequential(*layers).double()


def targets(loss: dk.losses.ClosedFormLoss, outputs: int, *lead: int, g: torch.Generator) -> torch.Tensor:
    if loss.kind == "softmax_cross_entropy":
        return torch.randint(outputs, lead, generator=g)
    if loss.kind == "binary_logistic":
        return torch.rand(*lead, generator=g, dtype=torch.float64)
    return torch.randn(*lead, outputs, generator=g, dtype=torch.float64)


OBJECTIVE_CASES = [pytest.param(a, l, id=f"{a}-{l}") for a in ACTIVATIONS for l in LOSSES]


@pytest.mark.parametrize("activation, loss_name", OBJECTIVE_CASES)
def test_every_quantity_matches_torch_func(activation: str, loss_name: str) -> None:
    loss, outputs = LOSSES[loss_name]
    flatten = activation == "gelu"
    model = mlp(activation, outputs, flatten=flatten, bias=activation != "silu")
    reference, closed = TorchFuncBackend(model, loss), ClosedFormBackend(model, loss)
    g = torch.Generator().manual_seed(len(activation) + 10 * outputs)
    n, batch, columns, d = 4, 6, 3, reference.layout.dim
    thetas = torch.randn(n, d, generator=g, dtype=torch.float64)
    shape = (2, 3) if flatten else (6,)
    x = torch.randn(n, batch, *shape, generator=g, dtype=torch.float64)
    y = targets(loss, outputs, n, batch, g=g)
    weights = torch.rand(n, batch, generator=g, dtype=torch.float64)
    vectors = torch.randn(n, columns, d, generator=g, dtype=torch.float64)
    test = (torch.randn(9, *shape, generator=g, dtype=torch.float64), targets(loss, outputs, 9, g=g))
    per_point_inputs = test[0].expand(n, *test[0].shape)
    pairs = {
        "node_grads": lambda o: o.node_grads(thetas, x, y, weights),
        "test_grads": lambda o: o.test_grads(thetas, test),
        "test_point_grads": lambda o: o.test_point_grads(thetas, per_point_inputs, test[1]),
        "hvp": lambda o: o.curvature_products(thetas, x, y, vectors, "exact"),
        "ggn": lambda o: o.curvature_products(thetas, x, y, vectors, "ggn"),
        "dots": lambda o: o.per_sample_dots(thetas, x, y, vectors),
    }
    for name, quantity in pairs.items():
        expected = quantity(reference)
        assert expected.abs().max() > 0, name
        assert_close(quantity(closed), expected, TOL[torch.float64].op)


def run_of(activation: str, loss_name: str, n: int, hops: int, optimizer, seed: int):
    """A recorded run of the test MLP, fresh directed W and per-node lr every round."""
    loss, outputs = LOSSES[loss_name]
    g = torch.Generator().manual_seed(seed)
    rec = dk.Recorder(mlp(activation, outputs), loss, optimizer=optimizer, replay_check="off")
    obj, spec = rec.objective, rec.optimizer
    theta = 0.7 * torch.randn(n, obj.layout.dim, generator=g, dtype=torch.float64)
    state = spec.initial_state(n, obj.layout.dim, theta)
    for t in range(hops + 1):
        x, y = torch.randn(n, 5, 6, generator=g, dtype=torch.float64), targets(loss, outputs, n, 5, g=g)
        W, lr = random_mixing(n, g), 0.1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
        rec.record(t, obj.layout.unflatten(theta), x, y, lr=lr, W=W, state=state)
        _, theta, state, _ = gossip_round(obj, spec, theta, state, x, y, lr, W)
    rec.record(hops + 1, obj.layout.unflatten(theta), state=state)
    test = (torch.randn(7, 6, generator=g, dtype=torch.float64), targets(loss, outputs, 7, g=g))
    return rec.trajectory(), test


OPTIMIZERS = [dk.optim.SGD(), dk.optim.SGD(momentum=0.9, nesterov=True, weight_decay=0.01), dk.optim.Adam(), dk.optim.AdamW()]
QUERY_CASES = [
    pytest.param(activation, loss_name, hops, OPTIMIZERS[hops % 4], id=f"{activation}-{loss_name}-hops{hops}-{OPTIMIZERS[hops % 4].kind}")
    for hops in range(5)
    for activation, loss_name in [("tanh", "ce"), ("gelu", "squared"), ("leaky", "logistic")][hops % 3 : hops % 3 + 1] + [("silu", "ce")]
]


@pytest.mark.parametrize("activation, loss_name, hops, optimizer", QUERY_CASES)
def test_every_query_matches_the_torch_engine(activation: str, loss_name: str, hops: int, optimizer) -> None:
    n = 5
    traj, test = run_of(activation, loss_name, n, hops, optimizer, seed=hops)
    q = torch.rand(n, dtype=torch.float64) + 0.1
    options = dict(q=q / q.sum())
    queries = [
        lambda backend: dk.dice_e(traj, 0, test, hops, per_hop=True, backend=backend, **options),
        lambda backend: dk.dice_e(traj, 0, test, hops, per_test=True, backend=backend, **options),
        lambda backend: dk.cascade(traj, 0, 3, test, hops, samples=[0, 4], backend=backend, **options),
        lambda backend: dk.influence_matrix(traj, 0, test, hops, backend=backend, **options),
    ]
    if hops >= 2:
        queries.append(lambda backend: dk.dice_e(traj, 0, test, hops, curvature="ggn", backend=backend, **options))
    for query in queries:
        assert_close(query("closed_form"), query("torch"), TOL[torch.float64].op)


def test_auto_picks_the_closed_form_engine_where_it_covers_the_model() -> None:
    traj, test = run_of("tanh", "ce", 3, 1, None, seed=0)
    assert dk.plan_query(traj, 0, test, 1).backend == "closed_form" and dk.plan_query(traj, 0, test, 1, backend="torch").backend == "torch"
    custom = dk.Recorder(mlp("tanh", 4), lambda o, y: nn.functional.cross_entropy(o, y, reduction="none"), replay_check="off")
    r = traj[0]
    custom.record(0, traj.params(0), r.inputs, r.targets, r.lr, r.W)
    custom.record(1, traj.params(1))
    assert dk.plan_query(custom.trajectory(), 0, (r.inputs[0], r.targets[0]), 1).backend == "torch"
    with pytest.raises(ValueError, match="backend='closed_form' cannot run this query: the loss is not one of dk.losses"):
        dk.dice_e(custom.trajectory(), 0, (r.inputs[0], r.targets[0]), 1, backend="closed_form")


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Linear(6, 4), nn.Softplus(), nn.Linear(4, 3)), "module 1 is a Softplus"),
    (nn.Sequential(nn.Linear(6, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 3)), "approximate='tanh'"),
    (nn.Sequential(nn.Linear(6, 4), nn.Flatten(), nn.Linear(4, 3)), "nn.Flatten is supported only as the first module"),
    (nn.Sequential(nn.Tanh()), "has no nn.Linear"),
], ids=["softplus", "gelu-tanh", "late-flatten", "no-linear"])
def test_models_outside_the_engine_are_named(model, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        ClosedFormBackend(model, dk.losses.softmax_cross_entropy)
