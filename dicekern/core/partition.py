"""Which nodes a process holds, and how its mixes exchange rows: the one object the engine gets of distribution."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dicekern.core.checks import check_int

Mixer = Callable[[int, torch.Tensor, bool], torch.Tensor]  # (round index in the window, vectors (rows, C, D), transpose)


@dataclass(frozen=True)
class Partition:
    """This process's share of the nodes.

    Attributes:
        nodes: the global indices of the rows this process holds (a contiguous block).
        num_nodes: N of the whole run (the size of W).
        exchange: builds the mixer of a window's W's (a list of (N, N)) that exchanges rows with the
            other processes; None when one process holds every node (the engine mixes locally).
    """

    nodes: range
    num_nodes: int
    exchange: Callable[[Sequence[torch.Tensor]], Mixer] | None = None

    def __post_init__(self) -> None:
        check_int("num_nodes", self.num_nodes, minimum=1)
        if not isinstance(self.nodes, range) or self.nodes.step != 1 or not 0 <= self.nodes.start < self.nodes.stop <= self.num_nodes:
            raise ValueError(f"nodes must be a non-empty range of 0..{self.num_nodes}, got {self.nodes!r}")
        if self.exchange is None and len(self.nodes) != self.num_nodes:
            raise ValueError("a partition that holds only some of the nodes needs an exchange for its mixes")

    @classmethod
    def whole(cls, num_nodes: int) -> Partition:
        """One process holds every node."""
        return cls(range(num_nodes), num_nodes)

    @property
    def is_whole(self) -> bool:
        return len(self.nodes) == self.num_nodes
