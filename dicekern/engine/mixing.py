"""Mixers: W^tau (or its transpose) on the node axis of chain vectors (rows, C, D).

A mixer is called as ``mixer(index, vectors, transpose)`` with the index of the round inside the
chain's window. Implementations: dense here, Triton in ``dicekern.bindings.gossip_mix``, across
processes in ``dicekern.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Mixer = Callable[[int, torch.Tensor, bool], torch.Tensor]


class DenseMixer:
    """W @ V with each round's dense (N, N) W."""

    def __init__(self, mixings: Sequence[torch.Tensor]):
        self._mixings = mixings

    def __call__(self, index: int, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        W = self._mixings[index]
        return torch.einsum("ki,icd->kcd", W.T if transpose else W, vectors)
