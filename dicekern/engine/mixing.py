"""Mixers: W^tau (or its transpose) on the node axis of chain vectors (rows, C, D).

A mixer is called as ``mixer(index, vectors, transpose)`` with the index of the round inside the
chain's window. Implementations: dense here, Triton in ``dicekern.bindings.gossip_mix``, across
processes in ``dicekern.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Mixer = Callable[[int, torch.Tensor, bool], torch.Tensor]


DENSE_ABOVE = 0.25  # fraction of non-zeros above which W is multiplied as a dense matrix


class TorchMixer:
    """W @ V with each round's W: through its non-zeros (a sparse COO matrix), O(nnz(W) C D), or
    densely where more than DENSE_ABOVE of W is non-zero."""

    def __init__(self, mixings: Sequence[torch.Tensor]):
        self._mixings = mixings
        self._operators: dict[tuple[int, bool], torch.Tensor] = {}

    def _operator(self, index: int, transpose: bool) -> torch.Tensor:
        key = (index, transpose)
        if key not in self._operators:
            W = self._mixings[index].T if transpose else self._mixings[index]
            dense = W.count_nonzero().item() > DENSE_ABOVE * W.numel()
            self._operators[key] = W.contiguous() if dense else W.to_sparse().coalesce()
        return self._operators[key]

    def __call__(self, index: int, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        n, c, d = vectors.shape
        return (self._operator(index, transpose) @ vectors.reshape(n, c * d)).view(n, c, d)
