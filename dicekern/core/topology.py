"""Mixing matrices W (N, N), row-stochastic, W[k, j] = weight node k gives node j's model.

Graphs come from networkx. In a directed graph an edge u -> v means u sends its model to v,
so it fills W[v, u]. Every node keeps its own model too (the diagonal).

Example:
    >>> import dicekern as dk
    >>> dk.topology.ring(5).sum(dim=1)
    tensor([1., 1., 1., 1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from dicekern.core import extras
from dicekern.core.checks import check_choice, check_int

if TYPE_CHECKING:
    import networkx as nx

WEIGHTS = ("metropolis", "uniform")


def from_graph(graph: nx.Graph, weights: str = "metropolis", *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W for any networkx graph, nodes in ``graph.nodes`` order; self-loops of the graph are ignored.

    Args:
        graph: nx.Graph (undirected) or nx.DiGraph (u -> v: v receives from u).
        weights: "metropolis": W[k, j] = 1 / (1 + max(deg k, deg j)) on edges (in-degrees when
            directed), the rest on the diagonal; "uniform": 1 / (1 + deg k) over k and its
            in-neighbours.
    """
    nx = _networkx()
    if not isinstance(graph, nx.Graph):
        raise TypeError(f"graph must be a networkx graph, got {type(graph).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype (mixing weights are fractions), got {dtype}")
    check_choice("weights", weights, WEIGHTS)
    if graph.number_of_nodes() == 0:
        raise ValueError("graph has no nodes")
    # adjacency[k, j] = 1 when k receives from j; networkx's A[u, v] marks the edge u -> v
    adjacency = nx.to_numpy_array(graph, nodelist=list(graph.nodes), weight=None).T
    np.fill_diagonal(adjacency, 0.0)
    adjacency = (adjacency != 0).astype(np.float64)
    in_degree = adjacency.sum(axis=1)
    if weights == "uniform":
        mixing = (adjacency + np.eye(len(adjacency))) / (in_degree + 1)[:, None]
    else:
        mixing = adjacency / (1.0 + np.maximum(in_degree[:, None], in_degree[None, :]))
        mixing += np.diag(1.0 - mixing.sum(axis=1))
    return torch.tensor(mixing, dtype=dtype)


def ring(n: int, weights: str = "metropolis", *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Undirected ring of n nodes (Metropolis: 1/3 to each neighbour and itself)."""
    nx = _networkx()
    return from_graph(nx.cycle_graph(check_int("n", n, minimum=1)), weights, dtype=dtype)


def torus(rows: int, cols: int, weights: str = "metropolis", *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """2-D torus of rows x cols nodes, numbered row by row."""
    nx = _networkx()
    graph = nx.grid_2d_graph(check_int("rows", rows, minimum=1), check_int("cols", cols, minimum=1), periodic=True)
    return from_graph(nx.convert_node_labels_to_integers(graph, ordering="sorted"), weights, dtype=dtype)


def star(n: int, weights: str = "metropolis", *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Star: node 0 is the hub of n - 1 leaves."""
    nx = _networkx()
    return from_graph(nx.star_graph(check_int("n", n, minimum=1) - 1), weights, dtype=dtype)


def complete(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Complete graph: exact averaging, every entry 1/n."""
    nx = _networkx()
    return from_graph(nx.complete_graph(check_int("n", n, minimum=1)), "uniform", dtype=dtype)


def erdos_renyi(
    n: int, p: float, *, seed: int | None = None, directed: bool = False, weights: str = "metropolis", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """G(n, p) random graph; isolated nodes keep their own model."""
    nx = _networkx()
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    graph = nx.gnp_random_graph(check_int("n", n, minimum=1), p, seed=seed, directed=directed)
    return from_graph(graph, weights, dtype=dtype)


def _exponential_graph(n: int, distances: list[int]) -> nx.DiGraph:
    nx = _networkx()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((i, (i + d) % n) for i in range(n) for d in distances if d % n)
    return graph


def exponential(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Static exponential graph: node i sends to i + 2^m (mod n) for 2^m < n; uniform weights."""
    n = check_int("n", n, minimum=1)
    distances = [2**m for m in range(max(math.ceil(math.log2(n)), 0))]
    return from_graph(_exponential_graph(n, distances), "uniform", dtype=dtype)


def one_peer_exponential(n: int, step: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Time-varying one-peer exponential graph at round ``step``: node i averages 1/2 with i - 2^m.

    m cycles through 0 .. ceil(log2 n) - 1 as ``step`` grows.
    """
    n = check_int("n", n, minimum=1)
    step = check_int("step", step, minimum=0)
    period = max(math.ceil(math.log2(n)), 1)
    return from_graph(_exponential_graph(n, [2 ** (step % period)]), "uniform", dtype=dtype)


def _networkx():
    return extras.optional("networkx", "dk.topology", "apps")
