"""Recording a gossip training run: what DICE needs of every round, and nothing more."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dicekern.checks import check_batch, check_finite, check_int, check_mixing
from dicekern.objective import LossFn, NodeObjective


@dataclass(frozen=True)
class Round:
    """One recorded round t.

    Attributes:
        params: (N, D) every node's flat model at the start of round t.
        inputs: (N, B, ...) the mini-batch each node used in round t, or None for params only.
        targets: (N, B, ...) matching targets, or None.
        lr: the SGD learning rate of round t, or None.
        W: (N, N) row-stochastic mixing matrix applied after the local update, or None.
    """

    params: torch.Tensor
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    lr: float | None = None
    W: torch.Tensor | None = None

    @property
    def has_batch(self) -> bool:
        return self.inputs is not None


@dataclass(frozen=True)
class VerifyReport:
    """Largest difference between recorded params at t+1 and a replay of round t."""

    max_abs_mismatch: float
    max_rel_mismatch: float
    worst_step: int
    worst_param: str
    rounds_checked: int
    rtol: float

    @property
    def ok(self) -> bool:
        """True when the run is plain SGD + gossip up to rtol (relative to the largest parameter)."""
        return self.max_rel_mismatch <= self.rtol


class Trajectory:
    """The recorded rounds of one run, keyed by step. Built by ``Recorder.trajectory()``."""

    def __init__(self, objective: NodeObjective, rounds: Mapping[int, Round]):
        self.objective = objective
        self._rounds = rounds  # a dict in memory, or rounds read lazily from disk
        self._steps = tuple(sorted(rounds))

    @property
    def steps(self) -> tuple[int, ...]:
        return self._steps

    @property
    def num_nodes(self) -> int:
        return self._first.params.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._first.params.dtype

    @property
    def device(self) -> torch.device:
        return self._first.params.device

    @property
    def _first(self) -> Round:
        if not self._steps:
            raise ValueError("the trajectory is empty: record at least one round")
        return self._rounds[self._steps[0]]

    def __contains__(self, step: int) -> bool:
        return step in self._rounds

    def __getitem__(self, step: int) -> Round:
        if step not in self._rounds:
            raise ValueError(f"round {step} is not in the trajectory (recorded: {self._describe_steps()})")
        return self._rounds[step]

    def params(self, step: int) -> dict[str, torch.Tensor]:
        """Every node's model at the start of round ``step``: name -> (N, *shape)."""
        return self.objective.layout.unflatten(self[step].params)

    def window(self, step: int, hops: int) -> tuple[Round, ...]:
        """Rounds step..step+hops, checked to hold what a hops-hop query from ``step`` needs.

        Rounds step..step+hops-1 (and step itself when hops=0) need their batch, lr and W;
        round step+hops needs params only.
        """
        step = check_int("step", step)
        hops = check_int("hops", hops, minimum=0)
        needed = range(step, step + hops + 1)
        missing = [t for t in needed if t not in self._rounds]
        if missing:
            raise ValueError(
                f"round {missing[0]} is missing from the trajectory: hops={hops} from step {step} needs "
                f"rounds {step}..{step + hops} (recorded: {self._describe_steps()})"
            )
        rounds = [self._rounds[t] for t in needed]
        for t, rnd in zip(needed[: max(hops, 1)], rounds):
            if not rnd.has_batch:
                raise ValueError(
                    f"round {t} was recorded with params only, but hops={hops} from step {step} "
                    f"needs its inputs, targets, lr and W"
                )
        return tuple(rounds)

    def verify(self, rtol: float | None = None) -> VerifyReport:
        """Replay every round t whose successor t+1 is recorded and compare with params at t+1.

        A trainer that is not plain SGD + gossip (momentum, weight decay, clipping, another W)
        shows up as a large mismatch. rtol defaults to 1e-10 in float64, 1e-4 otherwise.
        """
        if rtol is None:
            rtol = 1e-10 if self.dtype == torch.float64 else 1e-4
        checked, worst = 0, (-1.0, 0.0, 0, "")
        for t in self._steps:
            if t + 1 not in self._rounds or not self._rounds[t].has_batch:
                continue
            rnd, nxt = self._rounds[t], self._rounds[t + 1]
            _, replayed = self.objective.gossip_round(rnd.params, rnd.inputs, rnd.targets, rnd.lr, rnd.W)
            diff = (replayed - nxt.params).abs()
            scale = nxt.params.abs().max().clamp_min(torch.finfo(self.dtype).tiny)
            abs_err = diff.max().item()
            if abs_err > worst[0]:
                column = int(diff.max(dim=0).values.argmax())
                worst = (abs_err, (abs_err / scale).item(), t, self._param_of_column(column))
            checked += 1
        if checked == 0:
            raise ValueError(
                "nothing to verify: no round t with its batch is followed by a recorded round t+1 "
                f"(recorded: {self._describe_steps()})"
            )
        return VerifyReport(worst[0], worst[1], worst[2], worst[3], checked, rtol)

    def save(self, directory: str | os.PathLike) -> None:
        """Write every round as safetensors plus a checksummed manifest (see dicekern.storage)."""
        from dicekern.storage import save_trajectory  # storage builds on this module

        save_trajectory(self, directory)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: nn.Module, loss_fn: LossFn, *, device: torch.device | str = "cpu", cache_rounds: int = 8
    ) -> Trajectory:
        """Open a saved run lazily; model and loss_fn must be those it was recorded with.

        Example:
            >>> import tempfile, dicekern as dk
            >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
            >>> folder = tempfile.mkdtemp()
            >>> run.trajectory.save(folder)
            >>> dk.Trajectory.load(folder, run.model, run.loss_fn).steps
            (0, 1, 2)
        """
        from dicekern.storage import load_trajectory

        return load_trajectory(directory, model, loss_fn, device=device, cache_rounds=cache_rounds)

    def _param_of_column(self, column: int) -> str:
        layout = self.objective.layout
        end = 0
        for name, size in zip(layout.names, layout.sizes):
            end += size
            if column < end:
                return name
        raise IndexError(column)

    def _describe_steps(self) -> str:
        steps = self.steps
        if not steps:
            return "none"
        if list(steps) == list(range(steps[0], steps[-1] + 1)):
            return f"{steps[0]}..{steps[-1]}"
        return ", ".join(map(str, steps))


class Recorder:
    """Records a gossip run round by round, for ``dice_e``, ``cascade`` and ``dice_gt``.

    Args:
        model: the architecture (its own parameter values are ignored). Must be deterministic:
            put dropout or batch-norm layers in eval mode.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses; a node's batch loss
            is their mean. It must work under ``torch.func.vmap`` (e.g. ``reduction="none"``).
        window: keep only the newest ``window`` rounds (None keeps all). A query with ``hops``
            hops needs ``hops + 1`` consecutive rounds.
        total_nodes: the size of W when params hold only a block of the nodes (one process's share,
            see ``dicekern.distributed``); None means params hold every node.

    Example:
        >>> import torch, dicekern as dk
        >>> model = torch.nn.Linear(3, 2)
        >>> loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
        >>> rec = dk.Recorder(model, loss)
        >>> params = {n: p.detach().expand(4, *p.shape).clone() for n, p in model.named_parameters()}
        >>> rec.record(0, params, torch.randn(4, 5, 3), torch.randint(2, (4, 5)), lr=0.1,
        ...            W=dk.topology.ring(4))
        >>> rec.trajectory().steps
        (0,)
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, window: int | None = None, total_nodes: int | None = None):
        self.objective = NodeObjective(model, loss_fn)
        self.window = None if window is None else check_int("window", window, minimum=1)
        self.total_nodes = None if total_nodes is None else check_int("total_nodes", total_nodes, minimum=1)
        self._rounds: dict[int, Round] = {}
        self._checked_loss_shape = False

    def record(
        self,
        step: int,
        params: Mapping[str, torch.Tensor],
        inputs: object = None,
        targets: object = None,
        lr: float | None = None,
        W: object = None,
    ) -> None:
        """Record round ``step``: every node's params at its start, and the batch, lr and W it used.

        Args:
            step: the round index t.
            params: name -> (N, *shape), names as in ``model.named_parameters()``.
            inputs: (N, B, ...) mini-batch of every node in round t.
            targets: (N, B, ...) targets of that batch.
            lr: SGD learning rate of round t.
            W: (N, N) row-stochastic, W[k, j] = weight node k gives node j's half-step model.
                The last round a query needs may carry params only.
        """
        step = check_int("step", step)
        if step in self._rounds:
            raise ValueError(f"round {step} is already recorded")
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> Tensor (N, *shape), got {type(params).__name__}")
        flat = self.objective.layout.flatten(params)
        check_finite("params", flat)
        if self._rounds and flat.shape[0] != self._node_count():
            raise ValueError(f"params hold N={flat.shape[0]} nodes, earlier rounds hold N={self._node_count()}")
        if self._rounds and (flat.dtype, flat.device) != self._dtype_device():
            raise ValueError(f"params are {flat.dtype} on {flat.device}, earlier rounds {self._dtype_device()}")

        given = {"inputs": inputs is not None, "targets": targets is not None, "lr": lr is not None, "W": W is not None}
        if any(given.values()) and not all(given.values()):
            missing = [k for k, v in given.items() if not v]
            raise ValueError(f"round {step}: give inputs, targets, lr and W together, or params only; missing {missing}")
        if not all(given.values()):
            self._store(step, Round(flat))
            return

        n = flat.shape[0]
        x, y = check_batch(inputs, targets, flat, prefix="")
        if x.shape[0] != n or x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
            raise ValueError(
                f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be (N, B, ...) with N={n}"
            )
        if x.shape[1] == 0:
            raise ValueError("inputs hold an empty batch (B = 0)")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < float(lr) < float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        mixing = check_mixing("W", W, n if self.total_nodes is None else self.total_nodes, flat)
        if not self._checked_loss_shape:
            self._check_loss_shape(flat[0], x[0], y[0])
        self._store(step, Round(flat, x, y, float(lr), mixing))

    def trajectory(self) -> Trajectory:
        """A snapshot of what is recorded so far."""
        return Trajectory(self.objective, dict(self._rounds))

    def _store(self, step: int, rnd: Round) -> None:
        self._rounds[step] = rnd
        if self.window is not None:
            newest = max(self._rounds)
            for old in [t for t in self._rounds if t <= newest - self.window]:
                del self._rounds[old]

    def _node_count(self) -> int:
        return next(iter(self._rounds.values())).params.shape[0]

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(iter(self._rounds.values())).params
        return p.dtype, p.device

    def _check_loss_shape(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        losses = self.objective.per_sample_losses(theta, x, y)
        if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return per-sample losses of shape (B,) = ({x.shape[0]},), got {shape}; "
                f"use reduction='none'"
            )
        self._checked_loss_shape = True
