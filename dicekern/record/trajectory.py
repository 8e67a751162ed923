"""Recording a gossip training run: what DICE needs of every round (``dicekern.record.rounds``), and nothing more.

The recorder checks that recorded rounds follow from each other under the declared optimizer; a
Trajectory is the recorded rounds of one run, in memory or read lazily from disk (``dicekern.record.storage``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dicekern.record import storage
from dicekern.core.checks import check_choice, check_int
from dicekern.core.partition import Partition
from dicekern.record.description import RunDescription, check_describes, described
from dicekern.curvature.protocol import LossFn
from dicekern.curvature.round import local_update_and_grads
from dicekern.curvature.torch_func import TorchFuncBackend, mean_weights
from dicekern.core.optim import SGD, OptimizerSpec, State, spec_of
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
NOISE_PROBE_UNITS = 256  # rounding units by which the noise probe moves every parameter and float input
NOISE_SAFETY = 2  # the gradient's allowance: this many times its largest change under the probe, per parameter
NOISE_PROBES = (-1.0, -0.5, 0.5, 1.0)  # the gradient moves by these multiples of its allowance through the step
STEP_SAFETY = 2  # the step's allowance: this many times its largest change under those moves (Adam's saturates)


@dataclass(frozen=True)
class Mismatch:
    """How far a parameter (or state block) of recorded round t+1 is from the replay of round t.

    Attributes:
        relative: max |recorded - replayed| over the largest change the replayed update made.
        absolute: max |recorded - replayed|.
        excess: the largest ratio of |recorded - replayed| to its tolerance over the entries: rtol x
            the update's largest change, plus ROUNDING_UNITS rounding units of the largest value, plus
            the entry's allowance for the gradient's measured rounding (:func:`gradient_noise`)
            through the optimizer and the gossip; above 1 is a mismatch.
        name: the parameter or state block.
        allowance: the largest allowance for the gradient's rounding over the largest change
            the replayed update made.
        cause: what explains the mismatch when the replay can tell ("" when it cannot).
    """

    relative: float
    absolute: float
    excess: float
    name: str
    allowance: float = 0.0
    cause: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """The worst mismatch between recorded rounds t+1 and replays of rounds t (see :class:`Mismatch`).

    Attributes:
        max_rel_mismatch, max_abs_mismatch: the relative and absolute mismatch of the worst parameter.
        worst_step, worst_param: where it is (round t+1 and the parameter's name).
        cause: what explains the worst mismatch when the replay can tell (see :class:`Mismatch`).
    """

    max_abs_mismatch: float
    max_rel_mismatch: float
    worst_step: int
    worst_param: str
    rounds_checked: int
    rtol: float
    excess: float
    cause: str = ""

    @property
    def ok(self) -> bool:
        """True when every checked round is the declared optimizer's step plus gossip, up to rtol."""
        return self.excess <= 1.0


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance of the update-relative mismatch: 1e-6 in float64, 1.2e-3 in float32."""
    return max(1e-6, min(0.1, 1e4 * torch.finfo(dtype).eps))


def gradient_noise(objective: TorchFuncBackend, rnd: Round, grads: torch.Tensor | None = None) -> torch.Tensor:
    """(D,) how far another float evaluation of round ``rnd``'s node gradients may land from the replay's.

    Every parameter and float input moves by NOISE_PROBE_UNITS rounding units of its dtype, once up
    and once down (signs drawn with a fixed seed), and the second difference of every node's batch
    gradient, g(up) + g(down) - 2 g, measures what rounding does to it: its smooth change cancels,
    while the model's kinks stay. A ReLU input within rounding of 0 lands on the other side when the
    trainer evaluates in another order (per-node autograd where the replay vmaps), and its sample's
    share of the gradient appears or vanishes; the probe moves many such inputs across. Per
    parameter, NOISE_SAFETY times the largest entry over the nodes. Two evaluations of every node's
    gradient when ``grads`` (the unmoved ones) is given, three otherwise.
    """
    weights = mean_weights(rnd.inputs.shape[:2], rnd.params)
    if grads is None:
        grads = objective.node_grads(rnd.params, rnd.inputs, rnd.targets, weights)
    generator = torch.Generator().manual_seed(0)
    signs = lambda t: torch.randint(0, 2, t.shape, generator=generator).to(device=t.device, dtype=t.dtype) * 2 - 1
    float_inputs = rnd.inputs.is_floating_point()
    steps = [NOISE_PROBE_UNITS * torch.finfo(rnd.params.dtype).eps * signs(rnd.params)]
    steps.append(NOISE_PROBE_UNITS * torch.finfo(rnd.inputs.dtype).eps * signs(rnd.inputs) if float_inputs else None)
    second = -2 * grads
    for side in (1, -1):
        inputs = rnd.inputs * (1 + side * steps[1]) if float_inputs else rnd.inputs
        second = second + objective.node_grads(rnd.params * (1 + side * steps[0]), inputs, rnd.targets, weights)
    change = second.abs().amax(0)
    noise = torch.empty_like(change)
    for _, columns in objective.layout.slices():
        noise[columns] = change[columns].max()
    return NOISE_SAFETY * noise


def update_noise(
    optimizer: OptimizerSpec, rnd: Round, grads: torch.Tensor, half: torch.Tensor, state: State, noise: torch.Tensor,
) -> tuple[torch.Tensor, State]:
    """(N, D) allowances of the half step and of every state block for a gradient off by up to
    ``noise`` (D,): STEP_SAFETY times the largest change of the declared step when the gradient moves
    by NOISE_PROBES multiples of it. For SGD that is STEP_SAFETY x lr x noise (x (1 + momentum) with
    Nesterov); Adam's first step is about lr sign(g), so where the gradient is within its noise of 0
    the allowance is STEP_SAFETY x 2 lr, above any change its step can make, and elsewhere small."""
    half_noise = torch.zeros_like(half)
    state_noise = {name: torch.zeros_like(state[name]) for name in optimizer.state_blocks}
    for probe in NOISE_PROBES:
        moved_half, moved_state = optimizer.update(rnd.params, rnd.state, grads + probe * noise, rnd.lr)
        half_noise = torch.maximum(half_noise, (moved_half - half).abs())
        for name in state_noise:
            state_noise[name] = torch.maximum(state_noise[name], (moved_state[name] - state[name]).abs())
    return STEP_SAFETY * half_noise, {name: STEP_SAFETY * value for name, value in state_noise.items()}


def replay_mismatch(
    objective: TorchFuncBackend, optimizer: OptimizerSpec, mix_state: bool, rnd: Round, following: Round, rtol: float, mix=None,
    *, mix_buffers: bool = False, noise: torch.Tensor | NoiseCache | None = None,
) -> Mismatch:
    """The worst :class:`Mismatch` of round ``following`` (t+1) against the replay of round ``rnd`` (t).

    mix(W, rows) mixes the half-step rows (default W @ rows; across processes an exchange).
    mix_buffers: a BatchNorm model's running statistics are gossiped with the params; when they
    differ and the other choice would explain them, the mismatch names it as the cause.
    noise: (D,) the allowance for the gradient's rounding (:func:`gradient_noise`), a :class:`NoiseCache`
    to take it from, or None to measure it on ``rnd`` (two more evaluations of every node's gradient).
    """
    if mix is None:
        if rnd.W.shape[0] != rnd.params.shape[0]:
            raise ValueError(
                f"these rounds hold {rnd.params.shape[0]} of the {rnd.W.shape[0]} nodes, and a replay needs every node's "
                f"half step: replay across processes with dicekern.distributed.DistributedRecorder"
            )
        mix = lambda W, rows: W @ rows
    stepped, grads = local_update_and_grads(objective, optimizer, rnd.params, rnd.state, rnd.inputs, rnd.targets, rnd.lr,
                                            buffers=rnd.buffers)
    half, state = stepped.half, stepped.state
    if noise is None:
        noise = gradient_noise(objective, rnd, grads)
    elif isinstance(noise, NoiseCache):
        noise = noise.get(objective, rnd, grads)
    half_noise, state_noise = update_noise(optimizer, rnd, grads, half, state, noise)
    spread = rnd.W.abs()  # a node's allowance after gossip: sum_j |W[k, j]| allowance_j
    pairs = [(following.params, mix(rnd.W, half), mix(rnd.W, rnd.params), mix(spread, half_noise), objective.layout.slices())]
    if following.state is not None:
        for name in optimizer.state_blocks:
            replayed = mix(rnd.W, state[name]) if mix_state else state[name]
            before = mix(rnd.W, rnd.state[name]) if mix_state else rnd.state[name]
            allowed = mix(spread, state_noise[name]) if mix_state else state_noise[name]
            pairs.append((following.state[name], replayed, before, allowed, [(f"state[{name!r}]", slice(None))]))
        for name in optimizer.state_counters:
            if not torch.equal(following.state[name], state[name]):
                return Mismatch(float("inf"), float("inf"), float("inf"), f"state[{name!r}]")
    worst = _worst(pairs, rtol)
    if following.buffers is None or rnd.buffers is None:
        return worst
    layout = objective.buffer_layout
    for i, name in enumerate(layout.counter_names):
        if not torch.equal(following.buffers.counters[:, i], stepped.buffers.counters[:, i]):
            return Mismatch(float("inf"), float("inf"), float("inf"), f"buffers[{name!r}]",
                            cause="num_batches_tracked counts the train-mode forwards of each node, and the recorded count is not this round's")
    running = lambda mixed: [(following.buffers.running, mix(rnd.W, stepped.buffers.running) if mixed else stepped.buffers.running,
                              mix(rnd.W, rnd.buffers.running) if mixed else rnd.buffers.running,
                              torch.zeros_like(rnd.buffers.running), [(f"buffers[{n!r}]", c) for n, c in layout.running_slices()])]
    buffers = _worst(running(mix_buffers), rtol)
    if buffers.excess > 1.0 and _worst(running(not mix_buffers), rtol).excess <= 1.0:
        cause = ("the trainer averages the running statistics with the params (as averaging state_dict() does): declare it with "
                 "mix_buffers=True" if not mix_buffers else
                 "the trainer keeps the running statistics at their node (as averaging named_parameters() does), "
                 "but mix_buffers=True was declared")
        buffers = dataclasses.replace(buffers, cause=cause)
    return max(worst, buffers, key=lambda m: m.excess)


def _worst(pairs: list, rtol: float) -> Mismatch:
    """The worst mismatch over (recorded, replayed, before, allowance, [(name, columns)]) pairs of (N, D) rows."""
    worst = Mismatch(0.0, 0.0, 0.0, "")
    for recorded, replayed, before, allowed, parts in pairs:
        for name, columns in parts:
            rec, rep, old, allow = recorded[:, columns], replayed[:, columns], before[:, columns], allowed[:, columns]
            difference = (rec - rep).abs()
            error = difference.max().item()
            update = (rep - old).abs().max().item()
            tolerance = rtol * update + ROUNDING_UNITS * torch.finfo(rep.dtype).eps * rep.abs().max().item() + allow
            excess = torch.where(difference == 0, 0.0, difference / tolerance).max().item()  # x / 0 is inf
            relative = error / update if update > 0 else (0.0 if error == 0 else float("inf"))
            allowance = allow.max().item()
            allowance = allowance / update if update > 0 else (0.0 if allowance == 0 else float("inf"))
            if excess > worst.excess or not worst.name:
                worst = Mismatch(relative, error, excess, name, allowance)
    return worst


class NoiseCache:
    """The gradient's measured rounding (:func:`gradient_noise`) per dtype, device and batch shape:
    measured on the first round replayed, and again on a round whose replay it would refuse (the
    noise may have grown since), keeping the larger."""

    def __init__(self) -> None:
        self._noise: dict[tuple, tuple[torch.Tensor, weakref.ref]] = {}  # key -> (noise, the round last measured on)

    @staticmethod
    def _key(rnd: Round) -> tuple:
        return rnd.params.dtype, rnd.params.device, tuple(rnd.inputs.shape[1:])

    def get(self, objective: TorchFuncBackend, rnd: Round, grads: torch.Tensor | None = None) -> torch.Tensor:
        """The noise of rnd's dtype, device and batch shape, measured on rnd (at its ``grads``) if it is the first."""
        key = self._key(rnd)
        if key not in self._noise:
            self._noise[key] = (gradient_noise(objective, rnd, grads), weakref.ref(rnd))
        return self._noise[key][0]

    def measure_again(self, objective: TorchFuncBackend, rnd: Round) -> bool:
        """Measure on ``rnd`` and keep the larger noise; False when the noise was last measured on it."""
        key = self._key(rnd)
        if key in self._noise and self._noise[key][1]() is rnd:
            return False
        fresh = gradient_noise(objective, rnd)
        self._noise[key] = (torch.maximum(self._noise[key][0], fresh) if key in self._noise else fresh, weakref.ref(rnd))
        return True


class Trajectory:
    """The recorded rounds of one run, keyed by step. Built by ``Recorder.trajectory()``.

    Attributes:
        objective: the model and loss of every node.
        optimizer: the spec of every node's local step.
        mix_state: whether the optimizer state is gossiped with the params.
        mix_buffers: whether a BatchNorm model's running statistics are gossiped with the params.
        description: how a save rebuilds the model and loss (see :class:`dk.RunDescription`), or None.
        saved_as: for a run opened by :meth:`load`, {"directory", "snapshot", "manifest_sha256"}:
            which save it is (a later save into the same directory publishes another snapshot).
    """

    def __init__(
        self, objective: TorchFuncBackend, rounds: Mapping[int, Round], optimizer: OptimizerSpec | None = None, *,
        mix_state: bool = False, mix_buffers: bool = False, layout: BatchLayout | None = None,
        description: RunDescription | None = None, saved_as: dict | None = None,
    ):
        self.objective = objective
        self.optimizer = SGD() if optimizer is None else optimizer
        self.mix_state, self.mix_buffers = bool(mix_state), bool(mix_buffers)
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
        another W shows up even when the update is small. rtol defaults to ``default_rtol``; the
        allowance for the gradient's rounding is measured as ``record()`` measures it (:class:`NoiseCache`).
        """
        if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < float("inf")):
            raise ValueError(f"rtol must be a positive number, got {rtol!r}")
        rtol = default_rtol(self.dtype) if rtol is None else float(rtol)
        checked, worst, worst_step = 0, Mismatch(-1.0, 0.0, -1.0, ""), -1
        noises = NoiseCache()
        for t in self._steps:
            if t + 1 not in self._rounds or not self._rounds[t].has_batch:
                continue
            rnd, following = self._rounds[t], self._rounds[t + 1]
            mismatch = replay_mismatch(self.objective, self.optimizer, self.mix_state, rnd, following, rtol, mix_buffers=self.mix_buffers, noise=noises)
            if not mismatch.excess <= 1.0 and noises.measure_again(self.objective, rnd):
                mismatch = replay_mismatch(self.objective, self.optimizer, self.mix_state, rnd, following, rtol, mix_buffers=self.mix_buffers, noise=noises)
            if mismatch.excess > worst.excess:
                worst, worst_step = mismatch, t + 1
            checked += 1
        if checked == 0:
            raise ValueError(
                "nothing to verify: no round t with its batch is followed by a recorded round t+1 "
                f"(recorded: {self._describe_steps()})"
            )
        return VerifyReport(worst.absolute, worst.relative, worst_step, worst.name, checked, rtol, worst.excess, worst.cause)

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
        return cls(run.objective, run.rounds, run.optimizer, mix_state=run.mix_state, mix_buffers=run.mix_buffers,
                   description=run.description, saved_as=run.saved_as)

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
            hold no buffers outside BatchNorm (nn.BatchNorm1d/2d/3d in train mode): dropout in eval mode.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses; a node's batch loss
            is their mean. It must work under ``torch.func.vmap`` (e.g. ``reduction="none"``).
        optimizer: every node's local optimizer: a ``dk.optim`` spec, a torch.optim SGD, Adam or
            AdamW instance, or the per-node list of them. Default: plain SGD.
        mix_state: the run gossips the optimizer state with the params (torch.optim-per-node
            trainers do not: default False).
        mix_buffers: the run gossips a BatchNorm model's running statistics with the params (a
            trainer that averages ``state_dict()``; default False: they stay at their node, as
            with trainers that average ``named_parameters()``).
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
        mix_buffers: bool = False, window: int | None = None, partition: Partition | None = None, replay_check: str = "sampled",
        description: RunDescription | None = None,
    ):
        self.objective = TorchFuncBackend(model, loss_fn)
        self.description = described(description, self.objective)
        self.optimizer = SGD() if optimizer is None else spec_of(optimizer)
        for name, flag in (("mix_state", mix_state), ("mix_buffers", mix_buffers)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.mix_state, self.mix_buffers = mix_state, mix_buffers
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
        buffers: Mapping[str, torch.Tensor] | None = None,
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
            buffers: a BatchNorm model's buffers at the start of round t, name -> (N, *shape) as
                ``dk.stack_buffers`` gives them (read from the models when params are the models),
                every round, the last one too. None for a model without BatchNorm.
            optimizers: the per-node torch optimizers (with the models as params): lr and state
                default to what they hold now. Their spec must be the recorder's.

        Raises:
            ValueError: bad input, or (see ``replay_check``) a round that does not follow from
                the previous one under the declared optimizer.
        """
        step = check_int("step", step)
        if step in self._rounds:
            raise ValueError(f"round {step} is already recorded")
        params, lr, state, buffers = from_live_models(params, inputs is not None, lr, state, buffers, optimizers, self.optimizer)
        flat = self.objective.layout.flatten(params)
        if self._rounds and flat.shape[0] != self._node_count():
            raise ValueError(f"params hold N={flat.shape[0]} nodes, earlier rounds hold N={self._node_count()}")
        if self._rounds and (flat.dtype, flat.device) != self._dtype_device():
            raise ValueError(f"params are {flat.dtype} on {flat.device}, earlier rounds {self._dtype_device()}")
        total = flat.shape[0] if self._partition is None else self._partition.num_nodes
        rnd = check_round(self.optimizer, flat, inputs, targets, lr, W, state, total_nodes=total, where=f"round {step}",
                          buffers=buffers, buffer_layout=self.objective.buffer_layout)
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
        return Trajectory(self.objective, dict(self._rounds), self.optimizer, mix_state=self.mix_state, mix_buffers=self.mix_buffers,
                          layout=self._layout,
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
        if not mismatch.excess <= 1.0 and self._noise_cache().measure_again(self.objective, previous):
            mismatch = self._replay_mismatch(previous, rnd, rtol)  # with the gradient's rounding measured at this round
        if not mismatch.excess <= 1.0:
            how = (f"differs by {mismatch.relative:.3g} of that round's update ({mismatch.excess:.3g} times its tolerance: {rtol:g} "
                   f"of the update, {ROUNDING_UNITS} rounding units, and up to {mismatch.allowance:.3g} of the update for the "
                   f"gradient's measured rounding through the optimizer)") if math.isfinite(mismatch.excess) else "differs from the replayed value (compared exactly)"
            raise ValueError(
                f"round {step} is not the replay of round {step - 1} under {self.optimizer} plus gossip: {mismatch.name} {how}. "
                f"{'Cause: ' + mismatch.cause if mismatch.cause else 'Likely causes: ' + LIKELY_CAUSES}. Nothing was recorded for round {step}; "
                f"replay_check='off' records without this check"
            )

    def _noise_cache(self) -> NoiseCache:
        return self.__dict__.setdefault("_gradient_noise", NoiseCache())

    def _replay_mismatch(self, previous: Round, rnd: Round, rtol: float) -> Mismatch:
        return replay_mismatch(self.objective, self.optimizer, self.mix_state, previous, rnd, rtol, mix_buffers=self.mix_buffers,
                               noise=self._noise_cache())

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
