"""Mixing matrices: row-stochastic, non-negative, with the sparsity of their graph."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import dicekern as dk
from conftest import TOL, assert_close

MATRICES = [
    pytest.param(lambda: dk.topology.ring(7), id="ring7"),
    pytest.param(lambda: dk.topology.torus(3, 4), id="torus3x4"),
    pytest.param(lambda: dk.topology.exponential(10), id="exponential10"),
    pytest.param(lambda: dk.topology.one_peer_exponential(10, 5), id="one-peer10"),
    pytest.param(lambda: dk.topology.erdos_renyi(9, 0.3, seed=1), id="er9"),
    pytest.param(lambda: dk.topology.erdos_renyi(9, 0.3, seed=1, directed=True), id="er9-directed"),
    pytest.param(lambda: dk.topology.star(6), id="star6"),
    pytest.param(lambda: dk.topology.complete(5), id="complete5"),
    pytest.param(lambda: dk.topology.from_graph(nx.petersen_graph(), "uniform"), id="petersen-uniform"),
]


@pytest.mark.parametrize("make", MATRICES)
def test_matrices_are_row_stochastic(make) -> None:
    W = make()
    assert W.dtype == torch.float64 and (W >= 0).all()
    assert_close(W.sum(1), torch.ones(len(W), dtype=torch.float64), TOL[torch.float64].same)
    assert (W.diagonal() > 0).all()


def test_metropolis_is_symmetric_on_undirected_graphs() -> None:
    for W in (dk.topology.ring(6), dk.topology.torus(3, 3), dk.topology.erdos_renyi(8, 0.4, seed=3)):
        torch.testing.assert_close(W, W.T)
    torch.testing.assert_close(dk.topology.ring(5)[0], torch.tensor([1, 1, 0, 0, 1], dtype=torch.float64) / 3)


def test_exponential_graphs() -> None:
    W = dk.topology.exponential(16)
    assert ((W > 0).sum(1) == 5).all() and W[0, 16 - 8] == 0.2  # in-neighbours k-1, k-2, k-4, k-8
    periods = [dk.topology.one_peer_exponential(16, t) for t in range(5)]
    assert torch.equal(periods[0], periods[4]) and not torch.equal(periods[0], periods[1])
    assert periods[2][5, 1] == 0.5 and periods[2][5, 5] == 0.5


def test_directed_edges_fill_the_receivers_row() -> None:
    W = dk.topology.from_graph(nx.DiGraph([(0, 1), (1, 2)]), "uniform")
    expected = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(W, expected)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        dk.topology.ring(4, "max-degree")
    with pytest.raises(ValueError, match="n must be >= 1"):
        dk.topology.exponential(0)
    with pytest.raises(ValueError, match="p must lie"):
        dk.topology.erdos_renyi(4, 1.5)
    with pytest.raises(TypeError, match="networkx graph"):
        dk.topology.from_graph([[0, 1]])
