"""Last-layer mode: influence through the final nn.Linear only, on each node's own features.

An approximation: the feature extractor of every node is held at its recorded parameters, so a
removed sample moves only the last layer's weights, and curvature is that layer's Hessian block.
It turns any ``nn.Sequential`` ending in ``nn.Linear`` into a linear head, which the closed-form
engine and the MLP kernels run. Head rounds and test features are derived when a query first
reads them. The exact full-model DICE-E remains ``dice_e`` on the original trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from dicekern.core.checks import check_finite, check_test
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.record.rounds import LazyRounds, Round, check_round
from dicekern.record.trajectory import Trajectory

CACHE_ROUNDS = 8  # derived rounds (or test features) kept in memory, the least recently used dropped first


@dataclass(frozen=True)
class PerNodeTest:
    """A test objective seen through each node's own feature extractor, round by round.

    Attributes:
        features: step -> (N, M, F) test features under node k's extractor at that round; any
            mapping (``last_layer`` gives one that computes a round's features when first read).
        targets: (M, ...) test targets.
    """

    features: Mapping[int, torch.Tensor]
    targets: torch.Tensor

    def rows(self, steps: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """(len(steps), N, M, F) features of the given rounds, checked against like's (N, D) params."""
        missing = [t for t in steps if t not in self.features]
        if missing:
            raise ValueError(f"the per-node test has no features for round(s) {missing}")
        rows = torch.stack([self.features[t] for t in steps])
        if rows.dim() != 4 or rows.shape[1] != like.shape[0] or rows.shape[2] != self.targets.shape[0]:
            raise ValueError(
                f"per-node test features must be (N, M, F) = ({like.shape[0]}, {self.targets.shape[0]}, F) per round, "
                f"got {tuple(rows.shape[1:])}"
            )
        if rows.dtype != like.dtype or rows.device != like.device:
            raise ValueError(f"per-node test features are {rows.dtype} on {rows.device}; params are {like.dtype} on {like.device}")
        check_finite("per-node test features", rows)
        return rows


def last_layer(traj: Trajectory, test: tuple[torch.Tensor, torch.Tensor]) -> tuple[Trajectory, PerNodeTest]:
    """The trajectory of the final nn.Linear alone, with every node's features as its inputs.

    Nothing is computed up front: a round of the head (its params, state block and batch
    features) and a round's test features are derived from the recorded round when first read.

    Args:
        traj: recorded with an ``nn.Sequential`` whose last module is ``nn.Linear`` (index-named,
            or named through an OrderedDict).
        test: (inputs (M, ...), targets (M, ...)).

    Returns:
        (head trajectory, per-node test): pass both to ``dice_e``, ``cascade`` or
        ``influence_matrix`` in place of the originals. Its ``verify()`` does not hold: the
        features move between rounds, which this mode deliberately ignores.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> head, head_test = dk.last_layer(run.trajectory, run.test)
        >>> dk.dice_e(head, 0, head_test, 2).shape
        torch.Size([4, 5])
    """
    model = traj.objective.model
    if not isinstance(model, nn.Sequential) or len(model) < 2 or not isinstance(model[-1], nn.Linear):
        raise ValueError("last_layer needs an nn.Sequential whose last module is nn.Linear")
    if traj.objective.buffer_layout:
        raise ValueError("last_layer reads the extractor's features at every round; with BatchNorm they depend on the batch and the "
                         "running statistics, which last-layer mode does not replay: use full-model queries or GroupNorm")
    # the name in the module tree: named_children() would skip a module that appears twice
    head_name = list(model._modules)[-1]
    extractor, head = model[:-1], model[-1]  # slicing keeps the names, so the extractor's parameters keep theirs
    prefix = f"{head_name}."
    layout = traj.objective.layout
    owned = [prefix + name for name, _ in head.named_parameters()]
    found = [name for name in layout.names if name.startswith(prefix)]
    if found != owned:
        raise ValueError(
            f"last_layer needs a last nn.Linear ({head_name!r}) whose parameters are its own, but the model's parameters "
            f"under {prefix!r} are {found}, not {owned}: is it shared with (or tied to) an earlier module?"
        )
    if not traj.steps:
        raise ValueError("the trajectory is empty: record at least one round")
    # PerNodeTest holds its targets, so the test takes the run's dtype and device now: one round's params
    x_test, y_test = check_test(test, traj[traj.steps[0]].params)
    head_objective = TorchFuncBackend(head, traj.objective.loss_fn)
    columns = torch.cat([torch.arange(c.start, c.stop) for name, c in layout.slices() if name.startswith(prefix)])
    blocks = traj.optimizer.state_blocks

    def embed(params: dict[str, torch.Tensor], x: torch.Tensor, nodes: int, per_node: bool) -> torch.Tensor:
        """(N, M, F) features of x ((N, M, ...) per node, or (M, ...) shared) under each node's extractor params."""
        if not params and not per_node:  # a parameter-free extractor gives every node the same features
            shared = extractor(x)
            return shared.expand(nodes, *shared.shape)
        return vmap(lambda p, xs: functional_call(extractor, p, (xs,)), in_dims=(0, 0 if per_node else None))(params, x)

    def extractor_params(rnd: Round) -> dict[str, torch.Tensor]:
        return {n: p for n, p in layout.unflatten(rnd.params).items() if not n.startswith(prefix)}

    def head_round(step: int) -> Round:
        # features move between rounds, which this mode deliberately ignores: no replay check
        rnd = traj[step]
        flat = rnd.params[:, columns]
        state = None if rnd.state is None else {k: v[:, columns] if k in blocks else v for k, v in rnd.state.items()}
        inputs = embed(extractor_params(rnd), rnd.inputs, len(flat), per_node=True) if rnd.has_batch else None
        total = rnd.W.shape[0] if rnd.has_batch else len(flat)
        return check_round(traj.optimizer, flat, inputs, rnd.targets, rnd.lr, rnd.W, state, total_nodes=total, where=f"last-layer round {step}")

    def test_features(step: int) -> torch.Tensor:
        rnd = traj[step]
        return embed(extractor_params(rnd), x_test, len(rnd.params), per_node=False)

    head_traj = Trajectory(head_objective, LazyRounds(traj.steps, head_round, CACHE_ROUNDS), traj.optimizer, mix_state=traj.mix_state)
    return head_traj, PerNodeTest(LazyRounds(traj.steps, test_features, CACHE_ROUNDS), y_test)
