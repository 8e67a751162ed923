"""Recording from trainers whose optimizer step and gossip are separate calls, with BlueFog-style weights."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import dicekern as dk
from conftest import cross_entropy


def gossip(models: list[nn.Module], self_weights, src_weights) -> None:
    """A hand-written neighbor_allreduce: x_k <- self_weight x_k + sum_src src_weight x_src."""
    with torch.no_grad():
        before = [[p.clone() for p in m.parameters()] for m in models]
        for k, model in enumerate(models):
            for i, p in enumerate(model.parameters()):
                p.copy_(self_weights[k] * before[k][i] + sum(w * before[src][i] for src, w in src_weights[k].items()))


def test_separate_optimizer_and_gossip_record_a_verifiable_run() -> None:
    """The recipe: record params before optimizer.step(), and the W built from the weights gossip applied."""
    torch.manual_seed(0)
    n, b = 4, 6
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double() for _ in range(n)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2) for m in models]
    rec = dk.Recorder(models[0], cross_entropy)
    names = [name for name, _ in models[0].named_parameters()]
    stacked = lambda: {nm: torch.stack([dict(m.named_parameters())[nm].detach() for m in models]) for nm in names}
    for t in range(3):
        # time-varying weights: node k averages with k+1+t (mod n)
        src_weights = [{(k + 1 + t) % n: 0.4} for k in range(n)]
        self_weights = [0.6] * n
        x, y = torch.randn(n, b, 3, dtype=torch.float64), torch.randint(3, (n, b))
        rec.record(t, stacked(), x, y, lr=0.2, W=dk.adapters.from_bluefog_weights(self_weights, src_weights))
        for k, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            cross_entropy(model(x[k]), y[k]).mean().backward()
            opt.step()
        gossip(models, self_weights, src_weights)
    rec.record(3, stacked())
    report = rec.trajectory().verify()
    assert report.ok and report.rounds_checked == 3


def test_bluefog_conventions() -> None:
    W = dk.topology.from_graph(nx.path_graph(4, create_using=nx.DiGraph), "uniform")  # not column-stochastic
    torch.testing.assert_close(dk.adapters.from_bluefog_matrix(W.T), W)
    with pytest.raises(ValueError, match="not row-stochastic"):
        dk.adapters.from_bluefog_matrix(W)  # passing dicekern's W where BlueFog's [src, dst] is expected
    sent = dk.adapters.from_bluefog_weights([0.5, 0.5], [{1: 1.0}, {0: 0.25}], [{1: 2.0}, {0: 0.5}])  # W[0,1] = 1.0 * 0.5
    torch.testing.assert_close(sent, torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="src 1 does not send to 0"):
        dk.adapters.from_bluefog_weights([0.5, 0.5], [{1: 0.5}, {0: 0.5}], [{}, {}])
    with pytest.raises(ValueError, match="sources must be other nodes"):
        dk.adapters.from_bluefog_weights([0.5, 0.5], [{0: 0.5}, {0: 0.5}])
