"""What users do with DICE: proximal influence and reciprocity (Definitions 4 and 5), node scores.

Every quantity comes from one chain over all sources (``influence_matrix``), never a loop over
sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dicekern.influence import influence_matrix
from dicekern.trajectory import Trajectory


def proximal_influence(traj: Trajectory, step: int, test: tuple[torch.Tensor, torch.Tensor], *, q=None, backend: str = "auto") -> torch.Tensor:
    """Definition 4 for every edge j -> k: -lr W[k, j] q_k grad L(theta_j^t; z_j^t)^T grad L(theta_k^{t+1}; z').

    Returns:
        (N_source, N_receiver); 0 where W[k, j] = 0. It is hop 1 of ``influence_matrix``.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
        >>> dk.analysis.proximal_influence(run.trajectory, 0, run.test).shape
        torch.Size([4, 4])
    """
    return influence_matrix(traj, step, test, 1, q=q, backend=backend)[1]


@dataclass(frozen=True)
class Reciprocity:
    """Definition 5 from a (N_source, N_receiver) influence matrix, self-influence left out.

    Attributes:
        edge: (N, N) influence[j, k] / influence[k, j]; NaN where either direction is 0.
        given: (N,) sum over k != j of influence[j, k].
        received: (N,) sum over j != k of influence[j, k].
        node: (N,) given / received (NaN where nothing is received).
    """

    edge: torch.Tensor
    given: torch.Tensor
    received: torch.Tensor
    node: torch.Tensor


def reciprocity(influence: torch.Tensor) -> Reciprocity:
    """Reciprocity ratios of a node influence matrix (e.g. :func:`proximal_influence`)."""
    if influence.dim() != 2 or influence.shape[0] != influence.shape[1]:
        raise ValueError(f"influence must be a square (N_source, N_receiver) matrix, got {tuple(influence.shape)}")
    off = influence * (1 - torch.eye(len(influence), dtype=influence.dtype, device=influence.device))
    both = (off != 0) & (off.T != 0)
    nan = torch.full_like(off, float("nan"))
    edge = torch.where(both, off / torch.where(both, off.T, torch.ones_like(off)), nan)
    given, received = off.sum(1), off.sum(0)
    node = torch.where(received != 0, given / torch.where(received != 0, received, torch.ones_like(received)), torch.full_like(given, float("nan")))
    return Reciprocity(edge, given, received, node)
