"""dk.optim: each spec reproduces torch.optim, its linearisation is the Jacobian of its update, and
what it cannot replay is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

import dicekern as dk
from conftest import TOL, assert_close

SPECS = [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1), dk.optim.SGD(), id="sgd"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05), dk.optim.SGD(weight_decay=0.05), id="sgd-wd"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2), dk.optim.SGD(0.9, 0.2), id="momentum"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
                 dk.optim.SGD(0.8, nesterov=True, weight_decay=0.01), id="nesterov-wd"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1), dk.optim.Adam((0.8, 0.99), weight_decay=0.1), id="adam"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-6, weight_decay=0.3), dk.optim.AdamW(eps=1e-6, weight_decay=0.3), id="adamw"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.01, decoupled_weight_decay=True, weight_decay=0.3), dk.optim.AdamW(weight_decay=0.3), id="adam-decoupled"),
]


def node_models(n: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double() for _ in range(n)]


@pytest.mark.parametrize("make, spec", SPECS)
def test_spec_steps_like_torch_optim(make, spec) -> None:
    """Five steps of per-node torch optimizers (per-node lr) against the batched spec, state included."""
    n = 3
    models = node_models(n, 0)
    opts = [make(m.parameters()) for m in models]
    for k, opt in enumerate(opts):
        opt.param_groups[0]["lr"] *= 1 + k  # a different lr on every node
    assert dk.optim.from_torch(opts[0]) == spec
    layout = dk.Recorder(models[0], lambda o, y: o.sum(-1)).objective.layout
    flat = lambda: layout.flatten({name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name, _ in models[0].named_parameters()})
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        theta, state, lr = flat(), dk.optim.stack_state(opts, models), dk.optim.stack_lr(opts)
        if step == 0:
            assert all(not v.any() for v in state.values())  # no buffer, no step yet
        grads = torch.randn(n, layout.dim, generator=g, dtype=torch.float64)
        for model, opt, grad in zip(models, opts, grads):
            for p, chunk in zip(model.parameters(), layout.unflatten(grad).values()):
                p.grad = chunk.clone()
            opt.step()
        expected_theta, expected_state = flat(), dk.optim.stack_state(opts, models)
        new_theta, new_state = spec.update(theta, spec.check_state(state, n, theta), grads, lr.double())
        assert_close(new_theta, expected_theta, TOL[torch.float64].rounding)
        assert new_state.keys() == expected_state.keys()
        for name in spec.state_counters:
            assert torch.equal(new_state[name], expected_state[name])
        for name in spec.state_blocks:
            assert_close(new_state[name], expected_state[name], TOL[torch.float64].rounding)


@pytest.mark.parametrize("make, spec", SPECS)
def test_linearization_is_the_jacobian_of_the_update(make, spec) -> None:
    """tangent = torch.func.jvp of update, cotangent = its vjp, on (N, C, D) vectors."""
    n, d, c = 4, 9, 3
    g = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    theta, grad, lr = rand(n, d), rand(n, d), torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64)
    state = spec.initial_state(n, d, theta)
    for name in spec.state_blocks:
        state[name] = rand(n, d).abs() if name == "exp_avg_sq" else rand(n, d)
    for name in spec.state_counters:
        state[name] = torch.tensor([0, 1, 3, 7]) if name == "step" else torch.tensor([False, True, True, False])
    blocks = spec.state_blocks

    def f(th, bl, gr):  # outputs (theta', blocks'), the perturbable part of the step
        out, new = spec.update(th, {**state, **dict(zip(blocks, bl))}, gr, lr)
        return (out, *[new[name] for name in blocks])

    lin = spec.linearize(theta[:, None], {k: v[:, None] if k in blocks else v for k, v in state.items()}, grad[:, None], lr)
    primal = (theta, tuple(state[name] for name in blocks), grad)
    for col in range(c):
        t_theta, t_blocks, t_grad = rand(n, d), tuple(rand(n, d) for _ in blocks), rand(n, d)
        expected = jvp(f, primal, (t_theta, t_blocks, t_grad))[1]
        out_theta, out_blocks = lin.tangent(t_theta[:, None], dict(zip(blocks, [b[:, None] for b in t_blocks])), t_grad[:, None])
        assert_close(out_theta[:, 0], expected[0], TOL[torch.float64].rounding)
        for name, e in zip(blocks, expected[1:]):
            assert_close(out_blocks[name][:, 0], e, TOL[torch.float64].rounding)
        cot = (rand(n, d), *[rand(n, d) for _ in blocks])
        e_theta, e_blocks, e_grad = vjp(f, *primal)[1](cot)
        got_theta, got_blocks, got_grad = lin.cotangent(cot[0][:, None], {name: v[:, None] for name, v in zip(blocks, cot[1:])})
        assert_close(got_theta[:, 0], e_theta, TOL[torch.float64].rounding)
        assert_close(got_grad[:, 0], e_grad, TOL[torch.float64].rounding)
        for name, e in zip(blocks, e_blocks):
            assert_close(got_blocks[name][:, 0], e, TOL[torch.float64].rounding)


def test_adam_derivative_is_zero_where_the_second_moment_is_zero() -> None:
    """A coordinate whose gradient has always been 0 (v = 0): the step there is flat, not NaN."""
    spec = dk.optim.Adam()
    theta, grad = torch.ones(1, 2, dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    state = spec.initial_state(1, 2, theta)
    lin = spec.linearize(theta, state, grad, torch.tensor([0.1], dtype=torch.float64))
    d_theta, _ = lin.tangent(torch.zeros_like(theta), {k: torch.zeros_like(theta) for k in spec.state_blocks}, torch.ones_like(theta))
    assert torch.isfinite(d_theta).all() and d_theta[0, 0] != 0  # through m only: -lr m'/eps-sized
    c_theta, c_blocks, c_grad = lin.cotangent(torch.ones_like(theta), {k: torch.zeros_like(theta) for k in spec.state_blocks})
    assert all(torch.isfinite(t).all() for t in (c_theta, c_grad, *c_blocks.values()))


@pytest.mark.parametrize("make, cause", [
    (lambda p: torch.optim.RMSprop(p), "RMSprop is not supported"),
    (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad"),
    (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize"),
    (lambda p: torch.optim.AdamW(p, maximize=True), "maximize"),
    (lambda p: torch.optim.SGD(p, lr=0.1, differentiable=True), "differentiable"),
    (lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:], "momentum": 0.5}], lr=0.1), "differ in 'momentum'"),
    (lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:], "lr": 0.5}], lr=0.1), "differ in 'lr'"),
], ids=["rmsprop", "amsgrad", "maximize", "adamw-maximize", "differentiable", "groups", "group-lr"])
def test_from_torch_refuses_what_it_cannot_replay(make, cause) -> None:
    params = list(node_models(1, 0)[0].parameters())
    with pytest.raises(ValueError, match=cause):
        dk.optim.from_torch(make(params))


def test_from_torch_refuses_subclasses_and_non_optimizers() -> None:
    class Clipped(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="Clipped is not supported"):
        dk.optim.from_torch(Clipped(node_models(1, 0)[0].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        dk.optim.from_torch("adam")


def test_stack_state_refuses_mismatched_optimizers_and_models() -> None:
    models = node_models(2, 0)
    with pytest.raises(ValueError, match="optimizers differ"):
        dk.optim.stack_state([torch.optim.SGD(models[0].parameters(), lr=0.1), torch.optim.Adam(models[1].parameters())], models)
    partial = torch.optim.SGD(list(models[0].parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="not in optimizer 0"):
        dk.optim.stack_state([partial], models[:1])
    with pytest.raises(ValueError, match="one optimizer per model"):
        dk.optim.stack_state([partial], models)


@pytest.mark.parametrize("bad, error, match", [
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(dampening=2.0), ValueError, "dampening"),
    (dict(nesterov=True), ValueError, "nesterov needs momentum"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay must be a number"),
])
def test_bad_sgd_specs(bad, error, match) -> None:
    with pytest.raises(error, match=match):
        dk.optim.SGD(**bad)


def test_bad_adam_specs() -> None:
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        dk.optim.Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas must be a pair"):
        dk.optim.Adam(betas=0.9)


@pytest.mark.parametrize("lr", [0.1, np.float32(0.1), np.float64(0.1), torch.tensor(0.1), torch.tensor([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3])],
                         ids=["float", "np32", "np64", "0d", "per-node", "np-per-node"])
def test_lr_forms(lr) -> None:
    values = dk.optim.check_lr(lr, 3, torch.zeros(1, dtype=torch.float64))
    assert values.shape == (3,) and values.dtype == torch.float64
    assert torch.allclose(values, torch.as_tensor(np.asarray(lr), dtype=torch.float64).expand(3))


@pytest.mark.parametrize("lr, error, match", [
    (True, TypeError, "lr must be"), ("0.1", TypeError, "lr must be"), (-0.5, ValueError, "non-negative and finite"),
    (float("nan"), ValueError, "non-negative and finite"), (torch.tensor([0.1, 0.2]), ValueError, r"shape \(N,\) = \(3,\)"),
])
def test_bad_lr(lr, error, match) -> None:
    with pytest.raises(error, match=match):
        dk.optim.check_lr(lr, 3, torch.zeros(1, dtype=torch.float64))


def test_adam_needs_a_positive_eps_and_from_torch_ignores_group_names() -> None:
    with pytest.raises(ValueError, match="eps must be > 0"):
        dk.optim.Adam(eps=0.0)
    model = node_models(1, 0)[0]
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named[:2]], "param_names": [n for n, _ in named[:2]]},
              {"params": [p for _, p in named[2:]], "param_names": [n for n, _ in named[2:]]}]
    assert dk.optim.from_torch(torch.optim.SGD(groups, lr=0.1, momentum=0.5)) == dk.optim.SGD(0.5)
