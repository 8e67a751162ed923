"""One recorded round, and the checks every round goes through, wherever it comes from: the
recorder, a saved run, or rounds derived from another run (last-layer mode).

A round t holds every node's params at its start, and when its local step is to be explained, the
batch, learning rate, optimizer state (at the start of the round) and the W applied after the step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from dicekern.core.checks import check_batch, check_finite, check_mixing
from dicekern.core.losses import ClosedFormLoss
from dicekern.curvature.batchnorm import BufferLayout
from dicekern.curvature.round import Buffers, test_point
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.core.optim import OptimizerSpec, State, check_lr


@dataclass(frozen=True)
class Round:
    """One recorded round t.

    Attributes:
        params: (N, D) every node's flat model at the start of round t.
        inputs: (N, B, ...) the mini-batch each node used in round t, or None for params only.
        targets: (N, B, ...) matching targets, or None.
        lr: (N,) every node's learning rate in round t, or None.
        W: (N, N) row-stochastic mixing matrix applied after the local update, or None.
        state: the optimizer state at the start of round t (blocks (N, D), counters (N,)); empty
            for a stateless optimizer, None when not recorded.
        buffers: a BatchNorm model's running statistics and counters at the start of round t;
            None for a model without BatchNorm.
    """

    params: torch.Tensor
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    W: torch.Tensor | None = None
    state: State | None = None
    buffers: Buffers | None = None

    @property
    def has_batch(self) -> bool:
        return self.inputs is not None

    def point(self) -> torch.Tensor:
        """Where every node's test loss is taken: params (N, D), or for a BatchNorm model params and
        running statistics (N, D + D_b)."""
        return test_point(self.params, self.buffers)


@dataclass(frozen=True)
class BatchLayout:
    """What every batch and test set of a run looks like, taken from its first batch.

    Attributes:
        input_shape, input_dtype: one sample's inputs.
        target_shape, target_dtype: one sample's targets.
        outputs: K, the size of the model's last output axis (for the label checks).
    """

    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    target_shape: tuple[int, ...]
    target_dtype: torch.dtype
    outputs: int

    @classmethod
    def of(cls, objective: TorchFuncBackend, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> BatchLayout:
        """From one node's batch x (B, ...), y (B, ...) and its params theta (D,): one forward of one sample."""
        try:
            out = objective.outputs(theta, x[:1])
        except (RuntimeError, TypeError, IndexError) as error:
            raise ValueError(f"the model cannot take inputs of shape {tuple(x.shape[1:])} and dtype {x.dtype} per sample: {error}") from None
        return cls(tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype, out.shape[-1] if out.dim() > 1 else 1)

    def check(self, loss_fn: object, x: torch.Tensor, y: torch.Tensor, *, lead: int, what: str) -> None:
        """x, y (*lead axes, ...) hold samples of this layout, and labels the loss can take."""
        for name, t, shape, dtype in (("inputs", x, self.input_shape, self.input_dtype), ("targets", y, self.target_shape, self.target_dtype)):
            if tuple(t.shape[lead:]) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{what} {name} hold samples of shape {tuple(t.shape[lead:])} and dtype {t.dtype}; the run's "
                    f"first batch has {shape} and {dtype}"
                )
        check_labels(loss_fn, y, self.outputs, what)


def check_labels(loss_fn: object, targets: torch.Tensor, outputs: int, what: str) -> None:
    """Targets in the range a ``dk.losses`` loss takes (other losses are not inspected)."""
    if not isinstance(loss_fn, ClosedFormLoss) or targets.numel() == 0:
        return
    if loss_fn.kind == "softmax_cross_entropy":
        if targets.is_floating_point() or not (targets.min() >= 0 and targets.max() < outputs):
            raise ValueError(f"{what} targets must be class indices in [0, {outputs}) for softmax_cross_entropy, got values "
                             f"{targets.min().item()}..{targets.max().item()} of dtype {targets.dtype}")
    elif loss_fn.kind == "binary_logistic":
        if not targets.is_floating_point() or not (targets.min() >= 0 and targets.max() <= 1):
            raise ValueError(f"{what} targets must be floats in [0, 1] for binary_logistic")
    elif not targets.is_floating_point() or targets.shape[-1] != outputs:
        raise ValueError(f"{what} targets must be floats of {outputs} outputs per sample for squared_error, got shape {tuple(targets.shape)}")


def check_buffers(buffers: object, layout: BufferLayout, flat: torch.Tensor, *, where: str) -> Buffers | None:
    """A BatchNorm model's buffers, name -> (N, *shape) as ``dk.stack_buffers`` gives them, as
    Buffers in params' dtype and device; None for a model without BatchNorm (which takes none)."""
    if not layout:
        if buffers:
            raise ValueError(f"{where}: the model has no BatchNorm layers, but buffers {sorted(buffers)} were given")
        return None
    if buffers is None:
        raise ValueError(f"{where}: the model's BatchNorm layers {list(layout.modules)} keep running statistics: record them, "
                         f"buffers=dk.stack_buffers(models) (or pass the live models)")
    if not isinstance(buffers, Mapping):
        raise TypeError(f"{where}: buffers must be a mapping name -> Tensor (N, *shape), got {type(buffers).__name__}")
    unknown, missing = sorted(set(buffers) - set(layout.names)), [n for n in layout.names if n not in buffers]
    if unknown or missing:
        raise ValueError(f"{where}: buffers must be the BatchNorm buffers {list(layout.names)}; unknown: {unknown}, missing: {missing}")
    n = flat.shape[0]
    floats = len(layout.modules) * 2
    for i, name in enumerate(layout.names):
        value = buffers[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: buffers[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        running = i < floats
        shape = (n, layout.channels[i // 2]) if running else (n,)
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: buffers[{name!r}] has shape {tuple(value.shape)}, expected {shape}")
        if value.device != flat.device or (running and value.dtype != flat.dtype) or (not running and (value.is_floating_point() or value.dtype == torch.bool)):
            expected = f"{flat.dtype}" if running else "an integer dtype"
            raise ValueError(f"{where}: buffers[{name!r}] is {value.dtype} on {value.device}, expected {expected} on {flat.device}")
        check_finite(f"{where} buffers[{name!r}]", value)
        if (value < 0).any() and (not running or name.endswith("running_var")):
            raise ValueError(f"{where}: buffers[{name!r}] has negative entries")
    return Buffers(*layout.flatten(buffers))


def check_round(
    optimizer: OptimizerSpec, flat: torch.Tensor, inputs: object, targets: object, lr: object, W: object, state: object,
    *, total_nodes: int, where: str, buffers: object = None, buffer_layout: BufferLayout = BufferLayout((), (), ()),
) -> Round:
    """A validated Round from params (N, D) and the round's batch, lr, W, optimizer state and, for a
    BatchNorm model (buffer_layout), its buffers.

    Params only (inputs, targets, lr and W all None) is a round that is never stepped from.
    """
    check_finite(f"{where} params", flat)
    checked_buffers = check_buffers(buffers, buffer_layout, flat, where=where)
    n = flat.shape[0]
    given = {"inputs": inputs is not None, "targets": targets is not None, "lr": lr is not None, "W": W is not None}
    if any(given.values()) and not all(given.values()):
        missing = [k for k, v in given.items() if not v]
        raise ValueError(f"{where}: give inputs, targets, lr and W together, or params only; missing {missing}")
    if not all(given.values()):
        recorded = state is not None or optimizer.stateless
        return Round(flat, state=optimizer.check_state(state, n, flat, where=f"{where} state") if recorded else None, buffers=checked_buffers)
    x, y = check_batch(inputs, targets, flat, prefix=f"{where} ")
    if x.shape[0] != n or x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{where}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be (N, B, ...) with N={n}")
    if x.shape[1] == 0:
        raise ValueError(f"{where}: inputs hold an empty batch (B = 0)")
    rates = check_lr(lr, n, flat, where=f"{where} lr")
    mixing = check_mixing(f"{where} W", W, total_nodes, flat)
    return Round(flat, x, y, rates, mixing, optimizer.check_state(state, n, flat, where=f"{where} state"), checked_buffers)


class LazyRounds(Mapping):
    """step -> read(step) for every step of ``steps``, made on first access: the rounds of a saved
    run, or rounds derived from another run's. Listing or testing steps reads nothing; the newest
    ``cache_rounds`` values are kept, so a run longer than memory can be read round by round.
    ``has_batch(step)``, when given, says whether a round carries its batch without reading it."""

    def __init__(self, steps: Iterable[int], read: Callable[[int], object], cache_rounds: int,
                 has_batch: Callable[[int], bool] | None = None):
        self._steps = tuple(sorted(steps))
        self._known = set(self._steps)
        self._read_round, self._cache_rounds = read, cache_rounds
        self._has_batch = has_batch
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self) -> Iterator[int]:
        return iter(self._steps)

    def __contains__(self, step: object) -> bool:
        return step in self._known

    def has_batch(self, step: int) -> bool:
        """Whether round step carries its batch; read from its value only without a has_batch."""
        return self._has_batch(step) if self._has_batch is not None else self[step].has_batch

    def __getitem__(self, step: int):
        if step not in self._known:
            raise KeyError(step)
        if step in self._cache:
            self._cache.move_to_end(step)
            return self._cache[step]
        value = self._read_round(step)
        self._cache[step] = value
        while len(self._cache) > self._cache_rounds:
            self._cache.popitem(last=False)
        return value
