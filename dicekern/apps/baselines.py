"""What a practitioner would try before DICE: suspicion scores of nodes and samples read off the run.

Every score is "higher is more suspicious", the direction of DICE's node scores (positive: the
node's data raised the others' test loss), so each ranks nodes or samples the same way and feeds
``dk.analysis.detection_auc`` as it is. A node's score is its mean over the rounds ``steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import vmap

from dicekern.engine.step import LocalStep
from dicekern.record.trajectory import Trajectory


def _rounds(traj: Trajectory, steps: Sequence[int]) -> list:
    if not steps:
        raise ValueError("steps must name at least one round")
    return [traj.window(t, 0)[0] for t in steps]


def training_loss(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(N,) each node's mean batch loss at its own params, averaged over the rounds.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.baselines.training_loss(run.trajectory, [0, 1]).shape
        torch.Size([4])
    """
    objective = traj.objective
    return torch.stack([vmap(objective.mean_loss)(r.params, r.inputs, r.targets) for r in _rounds(traj, steps)]).mean(0)


def _updates(traj: Trajectory, steps: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(u (N, D), W (N, N)) per round: every node's local update theta^{t+1/2} - theta^t, and the round's W."""
    result = []
    for r in _rounds(traj, steps):
        step = LocalStep(traj.objective, traj.optimizer, r.params, r.inputs, r.targets, r.lr, r.state, "exact")
        result.append((step.half_step() - r.params, r.W))
    return result


def update_norm(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(N,) the norm of each node's local update, averaged over the rounds."""
    return torch.stack([u.norm(dim=1) for u, _ in _updates(traj, steps)]).mean(0)


def _neighbours_mean(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(N, D) the mean update of each node's neighbours (either direction of an edge of W, itself excluded)."""
    linked = ((W != 0) | (W.T != 0)).to(u.dtype)
    linked.fill_diagonal_(0)
    return (linked @ u) / linked.sum(1, keepdim=True).clamp_min(1)


def update_distance(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(N,) the distance of each node's update to its neighbours' mean update (the Krum-style score),
    averaged over the rounds."""
    return torch.stack([(u - _neighbours_mean(u, W)).norm(dim=1) for u, W in _updates(traj, steps)]).mean(0)


def update_disagreement(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(N,) 1 - cosine of each node's update with its neighbours' mean update, averaged over the rounds."""
    scores = [1 - torch.nn.functional.cosine_similarity(u, _neighbours_mean(u, W), dim=1) for u, W in _updates(traj, steps)]
    return torch.stack(scores).mean(0)


def evaluation_loss(traj: Trajectory, steps: Sequence[int], test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N,) the test loss of each node's model at the end of each round (theta^{t+1}), averaged."""
    missing = [t + 1 for t in steps if t + 1 not in traj]
    if missing:
        raise ValueError(f"evaluation_loss reads theta^(t+1): round(s) {missing} are not recorded")
    return torch.stack([traj.objective.test_losses(traj[t + 1].params, test) for t in steps]).mean(0)


def sample_losses(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(R, N, B) every sample's loss at its node's params in each round."""
    objective = traj.objective
    return torch.stack([vmap(objective.per_sample_losses)(r.params, r.inputs, r.targets) for r in _rounds(traj, steps)])


def sample_grad_norms(traj: Trajectory, steps: Sequence[int]) -> torch.Tensor:
    """(R, N, B) the norm of every sample's loss gradient at its node's params in each round."""
    objective = traj.objective
    return torch.stack([objective.per_sample_grads(r.params, r.inputs, r.targets).norm(dim=-1) for r in _rounds(traj, steps)])


def by_sample(values: torch.Tensor, ids: torch.Tensor) -> dict[int, float]:
    """sample id -> the mean of values (R, N, B) over every round and node that used it (ids (R, N, B))."""
    if values.shape != ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and ids {tuple(ids.shape)} must have the same shape")
    sums, counts = {}, {}
    for sample, value in zip(ids.flatten().tolist(), values.flatten().tolist()):
        sums[sample] = sums.get(sample, 0.0) + value
        counts[sample] = counts.get(sample, 0) + 1
    return {sample: sums[sample] / counts[sample] for sample in sums}


# the node baselines as detect and benchmarks/applications.py report them: name -> score(traj, steps, test)
NODE_BASELINES: dict[str, Callable[[Trajectory, Sequence[int], tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {
    "training loss": lambda traj, steps, test: training_loss(traj, steps),
    "update norm": lambda traj, steps, test: update_norm(traj, steps),
    "update distance (Krum)": lambda traj, steps, test: update_distance(traj, steps),
    "update disagreement (1 - cos)": lambda traj, steps, test: update_disagreement(traj, steps),
    "test loss of its model": evaluation_loss,
}
