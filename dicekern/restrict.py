"""Last-layer mode: influence through the final nn.Linear only, on each node's own features.

An approximation: the feature extractor of every node is held at its recorded parameters, so a
removed sample moves only the last layer's weights, and curvature is that layer's Hessian block.
It turns any ``nn.Sequential`` ending in ``nn.Linear`` into a linear head, which the closed-form
Triton kernels run. The exact full-model DICE-E remains ``dice_e`` on the original trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from dicekern.checks import check_finite, check_test
from dicekern.trajectory import Recorder, Trajectory


@dataclass(frozen=True)
class PerNodeTest:
    """A test objective seen through each node's own feature extractor, round by round.

    Attributes:
        features: step -> (N, M, F) test features under node k's extractor at that round.
        targets: (M, ...) test targets.
    """

    features: dict[int, torch.Tensor]
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

    Args:
        traj: recorded with an ``nn.Sequential`` whose last module is ``nn.Linear``.
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
    extractor, head = model[:-1], model[-1]
    head_prefix = f"{len(model) - 1}."
    x_test, y_test = check_test(test, traj[traj.steps[0]].params)
    # features move between rounds, which this mode deliberately ignores: no replay check
    recorder = Recorder(head, traj.objective.loss_fn, optimizer=traj.optimizer, mix_state=traj.mix_state, replay_check="off")
    head_columns = torch.cat([torch.arange(c.start, c.stop) for name, c in traj.objective.layout.slices() if name.startswith(head_prefix)])
    blocks = traj.optimizer.state_blocks
    features: dict[int, torch.Tensor] = {}

    def embed(extractor_params: dict[str, torch.Tensor], x: torch.Tensor, per_node: bool) -> torch.Tensor:
        """(N, M, F) features of x ((N, M, ...) per node, or (M, ...) shared) under each node's extractor."""
        if not extractor_params:  # a parameter-free extractor gives every node the same features
            shared = extractor(x)
            return shared if per_node else shared.expand(traj.num_nodes, *shared.shape)
        return vmap(lambda p, xs: functional_call(extractor, p, (xs,)), in_dims=(0, 0 if per_node else None))(extractor_params, x)

    for t in traj.steps:
        params = traj.params(t)
        rnd = traj[t]
        state = None if rnd.state is None else {k: v[:, head_columns] if k in blocks else v for k, v in rnd.state.items()}
        head_params = {n.removeprefix(head_prefix): p for n, p in params.items() if n.startswith(head_prefix)}
        extractor_params = {n: p for n, p in params.items() if not n.startswith(head_prefix)}
        features[t] = embed(extractor_params, x_test, per_node=False)
        if rnd.has_batch:
            recorder.record(t, head_params, embed(extractor_params, rnd.inputs, per_node=True), rnd.targets, lr=rnd.lr, W=rnd.W, state=state)
        else:
            recorder.record(t, head_params, state=state)
    return recorder.trajectory(), PerNodeTest(features, y_test)
