"""Live models in: record() from the nodes' modules and torch optimizers, stack_params, mix_."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import cross_entropy


def nodes(n: int, seed: int, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), id="momentum"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.01), id="adam"),
])
def test_recording_live_models_equals_recording_their_stacked_tensors(make_optimizer) -> None:
    n, rounds = 5, 3
    models = nodes(n, seed=0)
    opts = [make_optimizer(m.parameters()) for m in models]
    W = dk.topology.ring(n)
    live = dk.Recorder(models[0], cross_entropy, optimizer=opts, replay_check="every")
    stacked = dk.Recorder(models[0], cross_entropy, optimizer=opts, replay_check="every")
    g = torch.Generator().manual_seed(1)
    for t in range(rounds + 1):
        x, y = torch.randn(n, 6, 4, generator=g, dtype=torch.float64), torch.randint(3, (n, 6), generator=g)
        batch = (x, y) if t < rounds else ()
        kw = {"W": W} if t < rounds else {}
        live.record(t, models, *batch, optimizers=opts, **kw)
        lr = {"lr": dk.optim.stack_lr(opts)} if t < rounds else {}
        stacked.record(t, dk.stack_params(models), *batch, state=dk.optim.stack_state(opts, models), **lr, **kw)
        if t < rounds:
            for k, (model, opt) in enumerate(zip(models, opts)):
                opt.zero_grad()
                cross_entropy(model(x[k]), y[k]).mean().backward()
                opt.step()
            dk.mix_(models, W)
    a, b = live.trajectory(), stacked.trajectory()
    assert a.verify().ok and a.steps == b.steps
    for t in a.steps:
        for field in ("params", "inputs", "targets", "lr", "W"):
            assert (getattr(a[t], field) is None and getattr(b[t], field) is None) or torch.equal(getattr(a[t], field), getattr(b[t], field))
        assert a[t].state.keys() == b[t].state.keys() and all(torch.equal(a[t].state[k], b[t].state[k]) for k in a[t].state)


def test_mix_is_the_gossip_step_in_place_and_casts_w_to_the_models_dtype() -> None:
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(4)]
    for k, m in enumerate(models):
        with torch.no_grad():
            for p in (*m.parameters(), m[1].running_mean):
                p.normal_(generator=torch.Generator().manual_seed(k))
    params, buffers = dk.stack_params(models), dk.stack_buffers(models)
    W = dk.topology.exponential(4)  # float64, models float32
    dk.mix_(models, W)
    expected = {name: torch.einsum("kj,j...->k...", W.float(), value) for name, value in params.items()}
    assert all(torch.equal(dk.stack_params(models)[name], expected[name]) for name in expected)
    assert all(torch.equal(dk.stack_buffers(models)[name], buffers[name]) for name in buffers)  # buffers stay local
    dk.mix_(models, W, buffers=True)
    mixed = dk.stack_buffers(models)
    assert torch.equal(mixed["1.running_mean"], torch.einsum("kj,j...->k...", W.float(), buffers["1.running_mean"]))
    assert torch.equal(mixed["1.num_batches_tracked"], buffers["1.num_batches_tracked"])  # integer counters stay local


def test_live_models_and_optimizers_that_do_not_fit_are_refused() -> None:
    models = nodes(3, seed=0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    x, y, W = torch.randn(3, 2, 4, dtype=torch.float64), torch.randint(3, (3, 2)), dk.topology.ring(3)
    rec = dk.Recorder(models[0], cross_entropy, optimizer=opts)
    with pytest.raises(ValueError, match="pass the live models as params"):
        rec.record(0, dk.stack_params(models), x, y, W=W, optimizers=opts)
    with pytest.raises(ValueError, match="the given optimizers are SGD\\(momentum=0.0.* but this recorder replays SGD\\(momentum=0.9"):
        rec.record(0, models, x, y, W=W, optimizers=[torch.optim.SGD(m.parameters(), lr=0.1) for m in models])
    with pytest.raises(ValueError, match="models\\[2\\] differs from models\\[0\\] in '2.weight'"):
        rec.record(0, [*models[:2], nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()], x, y, W=W)
    with pytest.raises(TypeError, match="models\\[1\\] must be an nn.Module, got str"):
        dk.stack_params([models[0], "node"])
    with pytest.raises(TypeError, match="params must be a mapping name -> Tensor \\(N, \\*shape\\) or the per-node models, got Tensor"):
        rec.record(0, torch.zeros(3), x, y, W=W)
    with pytest.raises(ValueError, match="W is not row-stochastic"):
        dk.mix_(models, torch.ones(3, 3))
    assert rec.trajectory().steps == ()
