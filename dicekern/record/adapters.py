"""Mixing matrices from other libraries' conventions, built from the weights actually applied.

BlueFog stores a topology's matrix as W[src, dst] and a gossip call as per-node dictionaries;
dicekern's W[k, j] is the weight receiver k gives sender j (rows sum to 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dicekern.core.checks import as_tensor, check_mixing


def from_bluefog_matrix(W_src_dst: object) -> torch.Tensor:
    """dicekern's W from a BlueFog-style matrix indexed [src, dst] (its transpose), checked.

    Example:
        >>> import torch, dicekern as dk
        >>> dk.adapters.from_bluefog_matrix(torch.tensor([[0.5, 1.0], [0.5, 0.0]], dtype=torch.float64))
        tensor([[0.5000, 0.5000],
                [1.0000, 0.0000]], dtype=torch.float64)
    """
    W = as_tensor("W_src_dst", W_src_dst)
    like = W if W.is_floating_point() else W.double()
    return check_mixing("the transposed BlueFog matrix", W.T, W.shape[0] if W.dim() == 2 else 0, like)


def from_bluefog_weights(
    self_weights: Sequence[float],
    src_weights: Sequence[Mapping[int, float]],
    dst_weights: Sequence[Mapping[int, float]] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """W of one ``neighbor_allreduce`` round from the weights every node passed to it.

    Node k computes self_weights[k] x_k + sum over src of src_weights[k][src] times what src
    sent, and src sends dst_weights[src][k] x_src (x_src itself without dst_weights). So
    W[k, k] = self_weights[k] and W[k, src] = src_weights[k][src] * dst_weights[src][k].

    Args:
        self_weights: (N,) each node's weight on its own model.
        src_weights: per node k, {src: weight} over the nodes it receives from.
        dst_weights: per node src, {dst: scale} of what it sends, or None.

    Raises:
        ValueError: a weight for a neighbour that did not send, or a W that is not row-stochastic.
    """
    n = len(self_weights)
    if len(src_weights) != n or (dst_weights is not None and len(dst_weights) != n):
        raise ValueError(f"self_weights, src_weights and dst_weights must all have one entry per node (N={n})")
    W = torch.zeros(n, n, dtype=dtype)
    for k in range(n):
        W[k, k] = self_weights[k]
        for src, weight in src_weights[k].items():
            if not 0 <= src < n or src == k:
                raise ValueError(f"node {k} lists src {src}: sources must be other nodes in [0, {n})")
            scale = 1.0
            if dst_weights is not None:
                if k not in dst_weights[src]:
                    raise ValueError(f"node {k} weighs src {src}, but src {src} does not send to {k} (its dst_weights)")
                scale = dst_weights[src][k]
            W[k, src] = weight * scale
    return check_mixing("W from the BlueFog weights", W, n, W)
