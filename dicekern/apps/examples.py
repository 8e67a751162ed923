"""A ready gossip run on scikit-learn's bundled digits: for the demo, the tests, benchmarks and docs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dicekern.core import extras, topology
from dicekern.core.losses import softmax_cross_entropy
from dicekern.core.checks import check_choice, check_int
from dicekern.curvature.round import gossip_round
from dicekern.core.optim import SGD, Adam, AdamW, OptimizerSpec
from dicekern.record.modules import mix_
from dicekern.record.trajectory import Recorder, Trajectory
from dicekern import zoo
from dicekern.zoo import mlp  # the digits' model; "dicekern.apps.examples:mlp" still names it

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


# The zoo's models on the digits (8x8 grey images, 10 classes), small enough for seconds to a minute
# of 2 CPU cores: zoo.build(name, **DIGITS_MODELS[name]). The images models read a digit as a
# (1, 8, 8) image, cnn1d as a (1, 64) sequence of its pixels, the MLP as its 64 features.
# "mlp" is the bundled run's own model, trained by the stacked closed-form round (digits_run);
# the others are per-node torch modules stepped by per-node torch.optim optimizers.
DIGITS_MODELS: dict[str, dict] = {
    "resnet-bn": dict(num_classes=10, in_channels=1, width=4, blocks=[1, 1], groups=2),
    "resnet-gn": dict(num_classes=10, in_channels=1, width=4, blocks=[1, 1], groups=2),
    "vit": dict(num_classes=10, in_channels=1, image_size=8, patch=4, dim=16, depth=1, heads=2, mlp_ratio=2),
    "cnn1d": dict(num_classes=10, in_channels=1, length=64, width=8, kernel=5),
    "mlp": dict(inputs=64, classes=10),
}


def digit_shape(model: str) -> tuple[int, ...]:
    """The shape one digit takes as model's input: (1, 8, 8), (1, 64) or (64,)."""
    check_choice("model", model, list(DIGITS_MODELS))
    inputs, _ = zoo.random_data(model, 1, **DIGITS_MODELS[model])
    if inputs[0].numel() != 64:
        raise ValueError(f"DIGITS_MODELS[{model!r}] does not take 8x8 digits: its inputs are {tuple(inputs.shape[1:])}")
    return tuple(inputs.shape[1:])


def torch_optimizer(spec: OptimizerSpec, params, lr: float) -> torch.optim.Optimizer:
    """The torch.optim optimizer whose update spec replays: SGD, Adam or AdamW with spec's settings."""
    if isinstance(spec, SGD):
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, dampening=spec.dampening, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    if isinstance(spec, (Adam, AdamW)):
        kind = torch.optim.AdamW if isinstance(spec, AdamW) else torch.optim.Adam
        return kind(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    raise ValueError(f"no torch.optim optimizer replays {spec}")


def rounds_needed(step: int, hops: int, rounds: int | None = None) -> int:
    """Training rounds for a query from round step with hops hops: step + max(hops, 1) (hops 0 still
    needs round step's batch); rounds, when given, must be at least that."""
    needed = step + max(hops, 1)
    if rounds is not None and rounds < needed:
        raise ValueError(f"rounds {rounds} is too few: step {step} with hops {hops} needs rounds 0..{needed}, so rounds >= {needed}")
    return needed if rounds is None else rounds


@dataclass(frozen=True)
class DigitsRun:
    """A recorded gossip run and its test objective.

    Attributes:
        trajectory: every round 0..rounds (the last with params only).
        test: (inputs (M, *digit_shape(model)), targets (M,)) held-out digits: (M, 64) for the MLP.
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
    model: str = "mlp",
) -> DigitsRun:
    """Train a gossip run (adapt then combine) on non-IID digits and record every round.

    Args:
        model: a name of ``dk.zoo.MODELS``, built with ``DIGITS_MODELS[model]``. "mlp" (default)
            is the tanh MLP of ``hidden`` units trained by the stacked closed-form round; the
            others are per-node torch modules stepped by per-node torch.optim optimizers and
            gossiped by ``dk.mix_``, recorded with a ``dk.RunDescription`` naming the zoo factory
            (so a saved run rebuilds its model), from one initialisation as the MLP's.
        corrupt: node -> "flip" (every label replaced by a wrong one), "noise" (features drowned
            in Gaussian noise of standard deviation 1) or "free_rider" (its batches are copies of
            two of its samples): nodes whose data should hurt or not help the others.
        mislabel: node -> the fraction of its samples whose labels are replaced by wrong ones.
        exclude: digits (dataset indices) left out of every node's data, as if never collected.
        optimizer: every node's local optimizer, its state kept per node: a ``dk.optim`` spec or
            a name of ``OPTIMIZER_PRESETS`` ("sgd", "momentum", "adam"; default plain SGD).
        lr: the learning rate of every node and round; None takes the preset's (SGD 0.1).
        hidden: the MLP's hidden units (model "mlp" only).

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
        >>> run.trajectory.steps, run.trajectory.num_nodes
        ((0, 1, 2), 4)
    """
    check_choice("model", model, list(DIGITS_MODELS))
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

    if model != "mlp":
        return _module_run(model, x_all, y_all, node_indices, test_indices, mislabeled, rounds=rounds, batch_size=batch_size,
                           lr=lr, graph=graph, seed=seed, dtype=dtype, optimizer=optimizer, progress=progress)
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
        _, theta, state, _ = gossip_round(objective, spec, theta, state, inputs, targets, rates, mixing)
    recorder.record(rounds, objective.layout.unflatten(theta), state=state)
    test = (x_all[test_indices], y_all[test_indices])
    return DigitsRun(recorder.trajectory(), test, model, softmax_cross_entropy, torch.stack(batches), mislabeled)


def _module_run(name: str, x_all: torch.Tensor, y_all: torch.Tensor, node_indices: list[np.ndarray], test_indices: np.ndarray,
                mislabeled: torch.Tensor, *, rounds: int, batch_size: int, lr: float, graph: str, seed: int, dtype: torch.dtype,
                optimizer: OptimizerSpec, progress: bool) -> DigitsRun:
    """digits_run's loop for zoo model name: per-node modules (one initialisation) and torch.optim
    optimizers, each node's step on its batch, then dk.mix_; the same batches and graphs as the MLP's."""
    num_nodes = len(node_indices)
    x_all = x_all.reshape(len(x_all), *digit_shape(name))
    kwargs = DIGITS_MODELS[name]
    torch.manual_seed(seed)
    first = zoo.build(name, dtype, **kwargs)
    models = [first] + [copy.deepcopy(first) for _ in range(num_nodes - 1)]
    optimizers = [torch_optimizer(optimizer, m.parameters(), lr) for m in models]
    description = zoo.description(name, metadata={"data": "sklearn digits", "topology": graph, "seed": seed}, **kwargs)
    recorder = Recorder(first, softmax_cross_entropy, optimizer=optimizers, description=description)
    rng = np.random.default_rng(seed + 1)
    batches = []
    for t in extras.progress(range(rounds), enabled=progress, description=f"gossip training ({name})"):
        batch = torch.tensor(np.stack([rng.choice(ix, batch_size, replace=False) for ix in node_indices]))
        batches.append(batch)
        inputs, targets = x_all[batch], y_all[batch]
        mixing = TOPOLOGIES[graph](num_nodes, t).to(dtype)
        recorder.record(t, models, inputs, targets, W=mixing, optimizers=optimizers)  # the models at the start of round t
        for k, (node, opt) in enumerate(zip(models, optimizers)):  # adapt: each node's own optimizer on its batch
            opt.zero_grad()
            softmax_cross_entropy(node(inputs[k]), targets[k]).mean().backward()
            opt.step()
        mix_(models, mixing)  # combine: the params; buffers and optimizer state stay at their node
    recorder.record(rounds, models, optimizers=optimizers)
    test = (x_all[test_indices], y_all[test_indices])
    return DigitsRun(recorder.trajectory(), test, zoo.build(name, dtype, **kwargs), softmax_cross_entropy, torch.stack(batches), mislabeled)
