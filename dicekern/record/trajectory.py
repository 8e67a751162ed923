"""Recording a gossip training run: what DICE needs of every round (``dicekern.record.rounds``), and nothing more.

The recorder checks that recorded rounds follow from each other under the declared optimizer; a
Trajectory is the recorded rounds of one run, in memory or read lazily from disk (``dicekern.record.storage``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dicekern.record import storage
from dicekern.core.checks import check_choice, check_int
from dicekern.core.partition import Partition
from dicekern.record.description import RunDescription, check_describes, described
from dicekern.curvature.round import local_update
from dicekern.curvature.protocol import LossFn
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.core.optim import SGD, OptimizerSpec, spec_of
from dicekern.record.modules import from_live_models
from dicekern.record.rounds import BatchLayout, LazyRounds, Round, check_round


REPLAY_CHECKS = ("sampled", "every", "off")
SAMPLE_EVERY = 32  # after the first two, one transition in SAMPLE_EVERY is replayed by record()
LIKELY_CAUSES = (
    "the optimizer differs from the declared one (momentum, weight decay, Adam: pass optimizer= to the Recorder), "
    "gradient clipping or scaling, dropout or batch norm in train mode, a learning rate other than the recorded lr, "
    "a W other than the one applied, or state recorded after instead of before the step"
)


ROUNDING_UNITS = 32  # of a parameter's largest value: the rounding allowed on top of rtol x update


@dataclass(frozen=True)
class Mismatch:
    """How far a parameter (or state block) of recorded round t+1 is from the replay of round t.

    Attributes:
        relative: max |recorded - replayed| over the largest change the replayed update made.
        absolute: max |recorded - replayed|.
        excess: absolute over its tolerance, rtol x the update's largest change plus
            ROUNDING_UNITS rounding units of the largest value; above 1 is a mismatch.
        name: the parameter or state block.
    """

    relative: float
    absolute: float
    excess: float
    name: str


@dataclass(frozen=True)
class VerifyReport:
    """The worst mismatch between recorded rounds t+1 and replays of rounds t (see :class:`Mismatch`).

    Attributes:
        max_rel_mismatch, max_abs_mismatch: the relative and absolute mismatch of the worst parameter.
        worst_step, worst_param: where it is (round t+1 and the parameter's name).
    """

    max_abs_mismatch: float
    max_rel_mismatch: float
    worst_step: int
    worst_param: str
    rounds_checked: int
    rtol: float
    excess: float

    @property
    def ok(self) -> bool:
        """True when every checked round is the declared optimizer's step plus gossip, up to rtol."""
        return self.excess <= 1.0


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance of the update-relative mismatch: 1e-6 in float64, 1.2e-3 in float32."""
    return max(1e-6, min(0.1, 1e4 * torch.finfo(dtype).eps))


def replay_mismatch(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, mix_state: bool, rnd: Round, following: Round, rtol: float, mix=None,
) -> Mismatch:
    """The worst :class:`Mismatch` of round ``following`` (t+1) against the replay of round ``rnd`` (t).

    mix(W, rows) mixes the half-step rows (default W @ rows; across processes an exchange).
    """
    if mix is None:
        if rnd.W.shape[0] != rnd.params.shape[0]:
            raise ValueError(
                f"these rounds hold {rnd.params.shape[0]} of the {rnd.W.shape[0]} nodes, and a replay needs every node's "
                f"half step: replay across processes with dicekern.distributed.DistributedRecorder"
            )
        mix = lambda W, rows: W @ rows
    half, state = local_update(objective, optimizer, rnd.params, rnd.state, rnd.inputs, rnd.targets, rnd.lr)
    pairs = [(following.params, mix(rnd.W, half), mix(rnd.W, rnd.params), objective.layout.slices())]
    if following.state is not None:
        for name in optimizer.state_blocks:
            replayed = mix(rnd.W, state[name]) if mix_state else state[name]
            before = mix(rnd.W, rnd.state[name]) if mix_state else rnd.state[name]
            pairs.append((following.state[name], replayed, before, [(f"state[{name!r}]", slice(None))]))
        for name in optimizer.state_counters:
            if not torch.equal(following.state[name], state[name]):
                return Mismatch(float("inf"), float("inf"), float("inf"), f"state[{name!r}]")
    worst = Mismatch(0.0, 0.0, 0.0, "")
    for recorded, replayed, before, parts in pairs:
        for name, columns in parts:
            rec, rep, old = recorded[:, columns], replayed[:, columns], before[:, columns]
            error = (rec - rep).abs().max().item()
            update = (rep - old).abs().max().item()
            tolerance = rtol * update + ROUNDING_UNITS * torch.finfo(rep.dtype).eps * rep.abs().max().item()
            excess = error / tolerance if tolerance > 0 else (0.0 if error == 0 else float("inf"))
            relative = error / update if update > 0 else (0.0 if error == 0 else float("inf"))
            if excess > worst.excess or not worst.name:
                worst = Mismatch(relative, error, excess, name)
    return worst


class Trajectory:
    """The recorded rounds of one run, keyed by step. Built by ``Recorder.trajectory()``.

    Attributes:
        objective: the model and loss of every node.
        optimizer: the spec of every node's local step.
        mix_state: whether the optimizer state is gossiped with the params.
        description: how a save rebuilds the model and loss (see :class:`dk.RunDescription`), or None.
        saved_as: for a run opened by :meth:`load`, {"directory", "snapshot", "manifest_sha256"}:
            which save it is (a later save into the same directory publishes another snapshot).
    """

    def __init__(
        self, objective: TorchFuncBackend, rounds: Mapping[int, Round], optimizer: OptimizerSpec | None = None, *,
        mix_state: bool = False, layout: BatchLayout | None = None, description: RunDescription | None = None,
        saved_as: dict | None = None,
    ):
        self.objective = objective
        self.optimizer = SGD() if optimizer is None else optimizer
        self.mix_state = bool(mix_state)
        self.description = description
        self.saved_as = saved_as
        self._rounds = rounds  # a dict in memory, or rounds read lazily from disk
        self._steps = tuple(sorted(rounds))
        self._layout = layout

    def batch_layout(self) -> BatchLayout:
        """What the run's batches (and so its test sets) look like, from its first round with a batch."""
        if self._layout is None:
            first = next((self._rounds[t] for t in self._steps if self._rounds[t].has_batch), None)
            if first is None:
                raise ValueError("the trajectory has no round with a batch")
            self._layout = BatchLayout.of(self.objective, first.params[0], first.inputs[0], first.targets[0])
        return self._layout

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
        """Rounds step..step+hops, checked (:meth:`check_window`) to hold what a hops-hop query
        from ``step`` needs."""
        self.check_window(step, hops)
        return tuple(self._rounds[t] for t in range(step, step + hops + 1))

    def check_window(self, step: int, hops: int) -> None:
        """Raise a ValueError unless rounds step..step+hops hold what a hops-hop query from
        ``step`` needs: rounds step..step+hops-1 (and step itself when hops=0) their batch, lr, W
        and state, round step+hops its params. A saved run is checked from its manifest, unread."""
        step = check_int("step", step)
        hops = check_int("hops", hops, minimum=0)
        needed = range(step, step + hops + 1)
        if not self._steps or step < self._steps[0] or step > self._steps[-1]:  # without walking a huge range
            missing = [step]
        elif step + hops > self._steps[-1]:
            missing = [self._steps[-1] + 1]
        else:
            missing = [t for t in needed if t not in self._rounds]
        if missing:
            raise ValueError(
                f"round {missing[0]} is missing from the trajectory: hops={hops} from step {step} needs "
                f"rounds {step}..{step + hops} (recorded: {self._describe_steps()})"
            )
        for t in needed[: max(hops, 1)]:
            if not self._has_batch(t):
                raise ValueError(
                    f"round {t} was recorded with params only, but hops={hops} from step {step} "
                    f"needs its inputs, targets, lr and W"
                )

    def _has_batch(self, step: int) -> bool:
        rounds = self._rounds
        return rounds.has_batch(step) if isinstance(rounds, LazyRounds) else rounds[step].has_batch

    def verify(self, rtol: float | None = None) -> VerifyReport:
        """Replay every round t whose successor t+1 is recorded and compare with round t+1.

        The mismatch is measured against the size of each round's update (see :class:`Mismatch`),
        so an optimizer other than the declared one (momentum, weight decay, Adam), clipping or
        another W shows up even when the update is small. rtol defaults to ``default_rtol``.
        """
        if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < float("inf")):
            raise ValueError(f"rtol must be a positive number, got {rtol!r}")
        rtol = default_rtol(self.dtype) if rtol is None else float(rtol)
        checked, worst, worst_step = 0, Mismatch(-1.0, 0.0, -1.0, ""), -1
        for t in self._steps:
            if t + 1 not in self._rounds or not self._rounds[t].has_batch:
                continue
            mismatch = replay_mismatch(self.objective, self.optimizer, self.mix_state, self._rounds[t], self._rounds[t + 1], rtol)
            if mismatch.excess > worst.excess:
                worst, worst_step = mismatch, t + 1
            checked += 1
        if checked == 0:
            raise ValueError(
                "nothing to verify: no round t with its batch is followed by a recorded round t+1 "
                f"(recorded: {self._describe_steps()})"
            )
        return VerifyReport(worst.absolute, worst.relative, worst_step, worst.name, checked, rtol, worst.excess)

    def save(self, directory: str | os.PathLike, *, description: RunDescription | None = None) -> None:
        """Write every round as safetensors plus a checksummed manifest (see dicekern.record.storage),
        published whole or not at all.

        Args:
            description: how to rebuild the model and loss on load (default: the recorder's);
                checked against this run's model, loss and first batch before anything is written.
        """
        storage.save_trajectory(self, directory, description)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: nn.Module | None = None, loss_fn: LossFn | None = None, *,
        device: torch.device | str = "cpu", cache_rounds: int = 8,
    ) -> Trajectory:
        """Open a saved run lazily. A run saved with a :class:`dk.RunDescription` rebuilds its model
        and loss by importing them (never unpickling; see ``dicekern.record.description`` for what that
        trusts); otherwise, or to override them, pass the model and loss it was recorded with.

        Raises:
            ValueError: nothing saved, a malformed manifest, a model that cannot be imported or whose
                parameters differ from the saved ones; on access, a bad round, named.

        Example:
            >>> import tempfile, dicekern as dk
            >>> run = dk.examples.digits_run(num_nodes=4, rounds=2, batch_size=3)
            >>> folder = tempfile.mkdtemp()
            >>> run.trajectory.save(folder, description=dk.RunDescription("dicekern.apps.examples:mlp"))
            >>> dk.Trajectory.load(folder).steps
            (0, 1, 2)
        """
        return cls.of_saved(storage.open_run(directory, model, loss_fn, device=device, cache_rounds=cache_rounds))

    @classmethod
    def of_saved(cls, run: storage.SavedRun) -> Trajectory:
        """The trajectory of a run opened from disk (``dicekern.record.storage``); its rounds are read lazily."""
        return cls(run.objective, run.rounds, run.optimizer, mix_state=run.mix_state, description=run.description, saved_as=run.saved_as)

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
        model: the architecture (its own parameter values are ignored). Must be deterministic and
            hold no buffers: dropout in eval mode, no batch norm (GroupNorm or LayerNorm instead).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses; a node's batch loss
            is their mean. It must work under ``torch.func.vmap`` (e.g. ``reduction="none"``).
        optimizer: every node's local optimizer: a ``dk.optim`` spec, a torch.optim SGD, Adam or
            AdamW instance, or the per-node list of them. Default: plain SGD.
        mix_state: the run gossips the optimizer state with the params (torch.optim-per-node
            trainers do not: default False).
        window: keep only the newest ``window`` rounds (None keeps all). A query with ``hops``
            hops needs ``hops + 1`` consecutive rounds.
        partition: which nodes params hold when they hold only a block of them (one process's
            share, see ``dicekern.distributed``); None means params hold every node.
        description: how a saved run rebuilds the model and loss (a :class:`dk.RunDescription`),
            checked against model, loss_fn and the first batch; None saves runs that need the
            model and loss passed to ``Trajectory.load``.
        replay_check: "sampled" (default) replays the first two transitions t -> t+1 recorded and
            then one in 32 (a replay costs about one training round of all nodes), "every"
            replays all, "off" none. A recorded round t+1 that is not the declared optimizer's
            step of round t plus gossip raises a ValueError.

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

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, optimizer: object = None, mix_state: bool = False,
        window: int | None = None, partition: Partition | None = None, replay_check: str = "sampled",
        description: RunDescription | None = None,
    ):
        self.objective = TorchFuncBackend(model, loss_fn)
        self.description = described(description, self.objective)
        self.optimizer = SGD() if optimizer is None else spec_of(optimizer)
        if not isinstance(mix_state, bool):
            raise TypeError(f"mix_state must be a bool, got {type(mix_state).__name__}")
        self.mix_state = mix_state
        self.window = None if window is None else check_int("window", window, minimum=1)
        if partition is not None and not isinstance(partition, Partition):
            raise TypeError(f"partition must be a dicekern Partition, got {type(partition).__name__}")
        self._partition = partition
        self.replay_check = check_choice("replay_check", replay_check, REPLAY_CHECKS)
        self._rounds: dict[int, Round] = {}
        self._layout: BatchLayout | None = None  # of the first batch; every later batch must match it
        self._transitions_seen = 0

    def record(
        self,
        step: int,
        params: Mapping[str, torch.Tensor] | Sequence[nn.Module],
        inputs: object = None,
        targets: object = None,
        lr: object = None,
        W: object = None,
        *,
        state: Mapping[str, torch.Tensor] | None = None,
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        """Record round ``step``: every node's params at its start, and the batch, lr, W and state it used.

        Args:
            step: the round index t.
            params: the per-node models (node k's is params[k]), read now; or their stacked
                params, name -> (N, *shape), names as in ``model.named_parameters()``.
            inputs: (N, B, ...) mini-batch of every node in round t.
            targets: (N, B, ...) targets of that batch.
            lr: learning rate of round t: a number, or an (N,) tensor (one per node).
            W: (N, N) row-stochastic, W[k, j] = weight node k gives node j's half-step model.
            state: the optimizer state at the start of round t, as ``dk.optim.stack_state``
                gives it (needed with a batch for an optimizer with state; optional otherwise).
                The last round a query needs may carry params only.
            optimizers: the per-node torch optimizers (with the models as params): lr and state
                default to what they hold now. Their spec must be the recorder's.

        Raises:
            ValueError: bad input, or (see ``replay_check``) a round that does not follow from
                the previous one under the declared optimizer.
        """
        step = check_int("step", step)
        if step in self._rounds:
            raise ValueError(f"round {step} is already recorded")
        params, lr, state = from_live_models(params, inputs is not None, lr, state, optimizers, self.optimizer)
        flat = self.objective.layout.flatten(params)
        if self._rounds and flat.shape[0] != self._node_count():
            raise ValueError(f"params hold N={flat.shape[0]} nodes, earlier rounds hold N={self._node_count()}")
        if self._rounds and (flat.dtype, flat.device) != self._dtype_device():
            raise ValueError(f"params are {flat.dtype} on {flat.device}, earlier rounds {self._dtype_device()}")
        total = flat.shape[0] if self._partition is None else self._partition.num_nodes
        rnd = check_round(self.optimizer, flat, inputs, targets, lr, W, state, total_nodes=total, where=f"round {step}")
        if rnd.has_batch:
            self._check_batch(step, rnd)
        self._check_replay(step, rnd)
        self._store(step, rnd)

    @property
    def partition(self) -> Partition:
        """The nodes the recorded params hold: the given partition, or every node of the recorded rounds."""
        if self._partition is not None:
            return self._partition
        if not self._rounds:
            raise ValueError("nothing is recorded yet: the number of nodes is not known")
        return Partition.whole(self._node_count())

    def savepoint(self) -> tuple:
        """What the recorder holds now, for :meth:`rollback` (the rounds are shared, not copied)."""
        return dict(self._rounds), self._layout, self._transitions_seen

    def rollback(self, savepoint: tuple) -> None:
        """Return to a :meth:`savepoint`: every round recorded since is forgotten."""
        rounds, self._layout, self._transitions_seen = savepoint
        self._rounds = dict(rounds)

    def trajectory(self) -> Trajectory:
        """A snapshot of what is recorded so far."""
        return Trajectory(self.objective, dict(self._rounds), self.optimizer, mix_state=self.mix_state, layout=self._layout,
                          description=self.description)

    def _check_replay(self, step: int, rnd: Round) -> None:
        """Replay round step-1 and compare with rnd when the policy samples this transition."""
        previous = self._rounds.get(step - 1)
        if previous is None or not previous.has_batch or self.replay_check == "off":
            return
        seen, self._transitions_seen = self._transitions_seen, self._transitions_seen + 1
        if self.replay_check == "sampled" and seen >= 2 and seen % SAMPLE_EVERY:
            return
        rtol = default_rtol(rnd.params.dtype)
        mismatch = self._replay_mismatch(previous, rnd, rtol)
        if not mismatch.excess <= 1.0:
            raise ValueError(
                f"round {step} is not the replay of round {step - 1} under {self.optimizer} plus gossip: "
                f"{mismatch.name} differs by {mismatch.relative:.3g} of that round's update (tolerance {rtol:g} of the "
                f"update plus rounding). "
                f"Likely causes: {LIKELY_CAUSES}. Nothing was recorded for round {step}; "
                f"replay_check='off' records without this check"
            )

    def _replay_mismatch(self, previous: Round, rnd: Round, rtol: float) -> Mismatch:
        return replay_mismatch(self.objective, self.optimizer, self.mix_state, previous, rnd, rtol)

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

    def _check_batch(self, step: int, rnd: Round) -> None:
        """Every batch against the first one's layout and the loss's label range; the first batch
        also through the model and the loss: per-sample losses of shape (B,), a deterministic forward."""
        layout = self._layout or BatchLayout.of(self.objective, rnd.params[0], rnd.inputs[0], rnd.targets[0])
        layout.check(self.objective.loss_fn, rnd.inputs, rnd.targets, lead=2, what=f"round {step}")
        if self._layout is not None:
            return
        theta, x, y = rnd.params[0], rnd.inputs[0], rnd.targets[0]
        losses = self.objective.per_sample_losses(theta, x, y)
        if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return per-sample losses of shape (B,) = ({x.shape[0]},), got {shape}; "
                f"use reduction='none'"
            )
        self.objective.check_deterministic(theta, x)
        if self.description is not None:
            check_describes(self.description, self.objective, theta, x)
        self._layout = layout
