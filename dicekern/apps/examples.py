"""A ready gossip run on scikit-learn's bundled digits: for the demo, the tests, benchmarks and docs."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dicekern.core import extras, topology
from dicekern.core.losses import softmax_cross_entropy
from dicekern.core.checks import check_choice, check_int
from dicekern.record.description import rebuildable
from dicekern.curvature.round import gossip_round
from dicekern.core.optim import SGD, Adam, OptimizerSpec
from dicekern.record.trajectory import Recorder, Trajectory

TEST_SIZE = 200  # held-out digits of the bundled run's test objective


def square_torus(n: int) -> torch.Tensor:
    """The most nearly square rows x cols torus of n nodes, both sides >= 3."""
    sides = [(rows, n // rows) for rows in range(3, int(n**0.5) + 1) if n % rows == 0]
    if not sides:
        raise ValueError(f"a torus needs N = rows x cols with both >= 3 (9, 12, 15, 16, ...), got N = {n}")
    return topology.torus(*sides[-1])


TOPOLOGIES: dict[str, Callable[[int, int], torch.Tensor]] = {
    "exponential": lambda n, t: topology.exponential(n),
    "one_peer_exponential": lambda n, t: topology.one_peer_exponential(n, t),
    "ring": lambda n, t: topology.ring(n),
    "torus": lambda n, t: square_torus(n),
    "complete": lambda n, t: topology.complete(n),
}


# every node's local optimizer for the bundled digits, with a learning rate at which it trains well
OPTIMIZER_PRESETS: dict[str, tuple[OptimizerSpec, float]] = {
    "sgd": (SGD(), 0.1),
    "momentum": (SGD(momentum=0.9), 0.05),
    "adam": (Adam(), 0.005),
}


def rounds_needed(step: int, hops: int, rounds: int | None = None) -> int:
    """Training rounds for a query from round step with hops hops: step + max(hops, 1) (hops 0 still
    needs round step's batch); rounds, when given, must be at least that."""
    needed = step + max(hops, 1)
    if rounds is not None and rounds < needed:
        raise ValueError(f"rounds {rounds} is too few: step {step} with hops {hops} needs rounds 0..{needed}, so rounds >= {needed}")
    return needed if rounds is None else rounds


@rebuildable
def mlp(inputs: int = 64, hidden: int = 32, classes: int = 10) -> nn.Module:
    """inputs-hidden-classes tanh MLP."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))


@dataclass(frozen=True)
class DigitsRun:
    """A recorded gossip run and its test objective.

    Attributes:
        trajectory: every round 0..rounds (the last with params only).
        test: (inputs (M, 64), targets (M,)) held-out digits.
        model, loss_fn: the architecture and per-sample loss the run used.
        sample_ids: (rounds, N, B) the digit (index into the dataset) of every batch entry.
        mislabeled: (n,) True for the digits whose label the run corrupted.
    """

    trajectory: Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample_ids: torch.Tensor
    mislabeled: torch.Tensor


def digits_split(num_nodes: int, *, seed: int = 0, test_size: int = TEST_SIZE) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Non-IID split of digits: labels sorted into 2 * num_nodes shards, two shards per node.

    Returns:
        (node_indices, features (n, 64) in [0, 1], labels (n,), test_indices (test_size,)).
    """
    load_digits = extras.optional("sklearn.datasets", "the bundled digits", "apps").load_digits
    features, labels = load_digits(return_X_y=True)
    features = features / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_indices, train = order[:test_size], order[test_size:]
    train = train[np.argsort(labels[train], kind="stable")]
    shards = np.array_split(train, 2 * num_nodes)
    pairing = rng.permutation(2 * num_nodes)
    node_indices = [np.concatenate([shards[pairing[2 * k]], shards[pairing[2 * k + 1]]]) for k in range(num_nodes)]
    return node_indices, features, labels, test_indices


def digits_run(
    num_nodes: int = 16,
    rounds: int = 20,
    *,
    batch_size: int = 16,
    lr: float | None = None,
    graph: str = "exponential",
    hidden: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    test_size: int = TEST_SIZE,
    corrupt: dict[int, str] | None = None,
    mislabel: dict[int, float] | None = None,
    exclude: Collection[int] = (),
    optimizer: OptimizerSpec | str = "sgd",
    progress: bool = False,
) -> DigitsRun:
    """Train a gossip run (adapt then combine) on non-IID digits and record every round.

    Args:
        corrupt: node -> "flip" (every label replaced by a wrong one), "noise" (features drowned
            in Gaussian noise of standard deviation 1) or "free_rider" (its batches are copies of
            two of its samples): nodes whose data should hurt or not help the others.
        mislabel: node -> the fraction of its samples whose labels are replaced by wrong ones.
        exclude: digits (dataset indices) left out of every node's data, as if never collected.
        optimizer: every node's local optimizer, its state kept per node: a ``dk.optim`` spec or
            a name of ``OPTIMIZER_PRESETS`` ("sgd", "momentum", "adam"; default plain SGD).
        lr: the learning rate of every node and round; None takes the preset's (SGD 0.1).

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
        >>> run.trajectory.steps, run.trajectory.num_nodes
        ((0, 1, 2), 4)
    """
    num_nodes = check_int("num_nodes", num_nodes, minimum=2)
    rounds = check_int("rounds", rounds, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_choice("graph", graph, list(TOPOLOGIES))
    if isinstance(optimizer, str):
        check_choice("optimizer", optimizer, list(OPTIMIZER_PRESETS))
        optimizer, preset_lr = OPTIMIZER_PRESETS[optimizer]
    else:
        preset_lr = OPTIMIZER_PRESETS["sgd"][1]
    lr = preset_lr if lr is None else lr
    split, features, labels, test_indices = digits_split(num_nodes, seed=seed, test_size=test_size)
    excluded = np.asarray(sorted(exclude), dtype=np.int64)
    node_indices = [ix[~np.isin(ix, excluded)] for ix in split]
    smallest = min(len(ix) for ix in node_indices)
    if batch_size > smallest:
        raise ValueError(f"batch_size {batch_size} exceeds the smallest node's {smallest} samples")
    x_all = torch.tensor(features, dtype=dtype)
    y_all = torch.tensor(labels, dtype=torch.long)
    mislabeled = torch.zeros(len(y_all), dtype=torch.bool)

    def flip(ix: torch.Tensor, rng: np.random.Generator) -> None:
        y_all[ix] = (y_all[ix] + torch.as_tensor(rng.integers(1, 10, len(ix)))) % 10
        mislabeled[ix] = True

    def check_node(node: object, what: str) -> int:
        if not 0 <= check_int(what, node) < num_nodes:
            raise ValueError(f"{what} names node {node}, but the nodes are 0..{num_nodes - 1}")
        return node

    corruption = np.random.default_rng(seed + 2)  # drawn over every digit of the node, so exclude leaves the rest as they were
    for node, kind in (corrupt or {}).items():
        check_choice(f"corrupt[{node}]", kind, ["flip", "noise", "free_rider"])
        every = split[check_node(node, "corrupt")]
        if kind == "flip":
            flip(torch.as_tensor(every), corruption)
        elif kind == "noise":
            x_all[every] += torch.as_tensor(corruption.normal(size=(len(every), x_all.shape[1])), dtype=dtype)
        else:
            node_indices[node] = np.resize(node_indices[node][:2], len(node_indices[node]))
    labelling = np.random.default_rng(seed + 3)
    for node, fraction in (mislabel or {}).items():
        if not 0 <= fraction <= 1:
            raise ValueError(f"mislabel[{node}] must be a fraction in [0, 1], got {fraction}")
        every = split[check_node(node, "mislabel")]
        chosen = labelling.choice(every, round(fraction * len(every)), replace=False)
        flip(torch.as_tensor(chosen), labelling)

    torch.manual_seed(seed)
    model = mlp(hidden=hidden).to(dtype)
    recorder = Recorder(model, softmax_cross_entropy, optimizer=optimizer)
    objective, spec = recorder.objective, recorder.optimizer
    init = objective.layout.flatten({n: p.detach()[None] for n, p in model.named_parameters()})
    theta = init.expand(num_nodes, -1).clone()
    state = spec.initial_state(num_nodes, objective.layout.dim, theta)
    rates = torch.full((num_nodes,), lr, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    batches = []
    for t in extras.progress(range(rounds), enabled=progress, description="gossip training"):
        batch = torch.tensor(np.stack([rng.choice(ix, batch_size, replace=False) for ix in node_indices]))
        batches.append(batch)
        inputs, targets = x_all[batch], y_all[batch]
        mixing = TOPOLOGIES[graph](num_nodes, t).to(dtype)
        recorder.record(t, objective.layout.unflatten(theta), inputs, targets, lr=rates, W=mixing, state=state)
        _, theta, state = gossip_round(objective, spec, theta, state, inputs, targets, rates, mixing)
    recorder.record(rounds, objective.layout.unflatten(theta), state=state)
    test = (x_all[test_indices], y_all[test_indices])
    return DigitsRun(recorder.trajectory(), test, model, softmax_cross_entropy, torch.stack(batches), mislabeled)
