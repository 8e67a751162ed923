"""What users do with DICE: proximal influence and reciprocity (Definitions 4 and 5), node scores,
and reward shares of the nodes' contributions to the final models.

Every quantity comes from one chain over all sources (``influence_matrix``, or the whole-run
sweeps of ``node_contributions``), never a loop over sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dicekern.core import extras
from dicekern.apps.baselines import NODE_BASELINES
from dicekern.core.checks import check_int, check_node
from dicekern.engine.options import DiceOptions
from dicekern.apps.examples import digits_run
from dicekern.engine.queries import influence_matrix
from dicekern.record.trajectory import Trajectory


def pearson(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Pearson correlation of two score tensors of any equal shape, flattened."""
    return float(np.corrcoef(estimate.detach().flatten().cpu().numpy(), truth.detach().flatten().cpu().numpy())[0, 1])


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """||estimate - truth|| / ||truth|| over all entries."""
    return float((estimate - truth).norm() / truth.norm())


def agreement(estimate: torch.Tensor, truth: torch.Tensor) -> dict[str, float | None]:
    """Pearson, Spearman and relative error of an estimate against the truth (flattened), None where
    undefined: correlations of a constant input, the relative error of an all-zero truth.

    Example:
        >>> import torch, dicekern as dk
        >>> dk.analysis.agreement(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))["spearman"]
        1.0
    """
    spearmanr = extras.optional("scipy.stats", "dk.analysis.agreement", "apps").spearmanr
    e, g = estimate.detach().flatten().cpu().double(), truth.detach().flatten().cpu().double()
    varies = len(g) > 1 and bool(e.max() > e.min()) and bool(g.max() > g.min())
    return {
        "pearson": pearson(e, g) if varies else None,
        "spearman": float(spearmanr(e.numpy(), g.numpy()).statistic) if varies else None,
        "rel_error": relative_error(e, g) if g.norm() > 0 else None,
    }


def proximal_influence(
    traj: Trajectory, step: int, test: tuple[torch.Tensor, torch.Tensor], *, options: DiceOptions | None = None, **option_fields
) -> torch.Tensor:
    """Definition 4 for every edge j -> k: W[k, j] q_k grad L(theta_k^{t+1}; z')^T Delta_j, where
    Delta_j = -lr grad L(theta_j^t; z_j^t) under SGD (the optimizer's step of j's batch otherwise).

    Returns:
        (N_source, N_receiver); 0 where W[k, j] = 0. It is hop 1 of ``influence_matrix``.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
        >>> dk.analysis.proximal_influence(run.trajectory, 0, run.test).shape
        torch.Size([4, 4])
    """
    return influence_matrix(traj, step, test, 1, options=options, **option_fields)[1]


@dataclass(frozen=True)
class Shares:
    """A reward scheme's reading of node contributions (loss with a node's data minus loss without).

    Attributes:
        benefit: (N,) -contribution: how much each node's data lowered the final test loss; negative
            for a node whose data raised it.
        share: (N,) benefit / sum_k |benefit_k|: the helpful nodes' shares are positive, a harmful
            node's negative (never clipped to 0); the absolute shares sum to 1.
        harmful: the nodes whose data raised the loss (negative benefit), most harmful first.
    """

    benefit: torch.Tensor
    share: torch.Tensor
    harmful: list[int]


def shares(contributions: torch.Tensor) -> Shares:
    """Each node's share of what the nodes' data did to the final models, harmful nodes kept negative.

    Args:
        contributions: (N,) e.g. :func:`dicekern.node_contributions`: loss with node j's data
            minus loss without it, so a helpful node is negative.

    Example:
        >>> import torch, dicekern as dk
        >>> dk.analysis.shares(torch.tensor([-3.0, -1.0, 1.0])).share
        tensor([ 0.6000,  0.2000, -0.2000])
    """
    if not isinstance(contributions, torch.Tensor):
        raise TypeError(f"contributions must be a tensor, got {type(contributions).__name__}")
    if contributions.dim() != 1 or contributions.numel() == 0:
        raise ValueError(f"contributions must have shape (N,), got {tuple(contributions.shape)}")
    if not torch.isfinite(contributions).all():
        raise ValueError("contributions hold NaN or infinite values")
    benefit = -contributions.detach()
    scale = benefit.abs().sum()
    if scale == 0:
        raise ValueError("every contribution is 0: there is nothing to share")
    harmful = [int(k) for k in benefit.argsort() if benefit[k] < 0]
    return Shares(benefit, benefit / scale, harmful)


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


def node_scores(
    traj: Trajectory, steps: Sequence[int], test: tuple[torch.Tensor, torch.Tensor], hops: int, *,
    options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """(N,) how much each node's data changed the *other* nodes' test loss over hops 1..hops,
    summed over the rounds ``steps``; positive means it hurt them (a candidate anomaly).

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=4, batch_size=3)
        >>> dk.analysis.node_scores(run.trajectory, [0, 1], run.test, hops=2).shape
        torch.Size([4])
    """
    if hops < 1:
        raise ValueError("node_scores needs hops >= 1: hop 0 is a node's effect on itself")
    total = None
    for step in steps:
        matrix = influence_matrix(traj, step, test, hops, options=options, **option_fields)[1:].sum(0)
        matrix = matrix - torch.diag(matrix.diagonal())
        total = matrix.sum(1) if total is None else total + matrix.sum(1)
    if total is None:
        raise ValueError("steps must name at least one round")
    return total


def detection_auc(scores: torch.Tensor, anomalous: Sequence[int], num_nodes: int | None = None) -> float:
    """ROC AUC of ranking nodes by score (highest first) against the truly anomalous nodes."""
    roc_auc_score = extras.optional("sklearn.metrics", "dk.analysis.detection_auc", "apps").roc_auc_score
    num_nodes = len(scores) if num_nodes is None else check_int("num_nodes", num_nodes, minimum=1)
    if len(scores) != num_nodes:
        raise ValueError(f"scores hold {len(scores)} nodes, num_nodes is {num_nodes}")
    nodes = [check_node("anomalous node", node, num_nodes) for node in anomalous]
    truth = np.zeros(num_nodes, dtype=bool)
    truth[nodes] = True
    if truth.all() or not truth.any():
        raise ValueError("detection_auc needs both anomalous and normal nodes")
    return float(roc_auc_score(truth, scores.detach().cpu().numpy()))


ANOMALY_ROUNDS = 24  # training rounds of each run of the digits anomaly experiment


def anomaly_experiment(
    kind: str, seeds: Sequence[int], *, num_nodes: int = 16, corrupted: int = 3, rounds: int = ANOMALY_ROUNDS, scored_from: int = 10,
    hops: Sequence[int] = (1, 3), optimizer: str = "sgd", graph: str = "exponential", batch_size: int = 16, lr: float | None = None,
    progress: bool = False,
) -> dict:
    """Flag corrupted nodes on digits: for each seed, corrupt ``corrupted`` random nodes' data
    (``kind`` "flip" or "noise"), train, score every node with :func:`node_scores` over rounds
    scored_from.., and report the ROC AUC per number of hops, next to the AUC of every baseline
    of ``dk.baselines.NODE_BASELINES`` over the same rounds. kind: "flip", "noise" or
    "free_rider" (see ``dk.examples.digits_run``); optimizer, graph, batch_size, lr: as there.

    Returns:
        {"kind", "scored_from", "auc": {hops: [AUC per seed]}, "baseline_auc": {name: [AUC per seed]},
        "runs": [{"seed", "anomalous", "scores": {hops: [...]}, "baselines": {name: [...]}}]}.
    """
    if rounds - max(hops) < scored_from:
        raise ValueError(f"rounds {rounds} leave nothing to score from round {scored_from} with hops {max(hops)}: use rounds >= {scored_from + max(hops)}")
    results: dict = {"kind": kind, "scored_from": scored_from, "auc": {h: [] for h in hops}, "baseline_auc": {name: [] for name in NODE_BASELINES},
                     "runs": []}
    for seed in extras.progress(seeds, enabled=progress, description=f"anomaly detection ({kind})"):
        bad = sorted(int(b) for b in np.random.default_rng(seed).choice(num_nodes, corrupted, replace=False))
        run = digits_run(num_nodes, rounds, seed=seed, corrupt={b: kind for b in bad}, optimizer=optimizer, graph=graph, batch_size=batch_size, lr=lr)
        entry = {"seed": seed, "anomalous": bad, "scores": {}, "baselines": {}}
        for h in hops:
            scores = node_scores(run.trajectory, range(scored_from, rounds - h + 1), run.test, h)
            entry["scores"][h] = scores.tolist()
            results["auc"][h].append(detection_auc(scores, bad))
        for name, baseline in NODE_BASELINES.items():
            scores = baseline(run.trajectory, range(scored_from, rounds), run.test)
            entry["baselines"][name] = scores.tolist()
            results["baseline_auc"][name].append(detection_auc(scores, bad))
        results["runs"].append(entry)
    return results
