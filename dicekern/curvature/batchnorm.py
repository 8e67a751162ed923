"""BatchNorm as a function of the node state: weighted batch statistics in train mode, running
statistics in eval mode, and the running statistics' update (DICE.md, "Models with buffers").

A node's buffers are its BatchNorm layers' running_mean and running_var, flat (D_b,) in
``BufferLayout`` order, and their num_batches_tracked counters (L,). In train mode every sample b
carries a weight w_b (1 factually, 0 when removed): per channel mu = sum_b w_b sum_pos a / n_w,
sigma^2 = sum_b w_b sum_pos (a - mu)^2 / n_w with n_w = (sum_b w_b) * positions, so w_z = 0 is
exactly the forward of the batch without z. The forward does not read the buffers in train mode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
RUNNING = ("running_mean", "running_var")
COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class BufferLayout:
    """The BatchNorm layers of a model, in named_modules order.

    Attributes:
        modules: each layer's module name.
        channels: each layer's number of channels C.
        momenta: each layer's momentum, None for the cumulative average.
    """

    modules: tuple[str, ...]
    channels: tuple[int, ...]
    momenta: tuple[float | None, ...]

    @classmethod
    def of(cls, model: nn.Module) -> BufferLayout:
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
        return cls(tuple(n for n, _ in layers), tuple(m.num_features for _, m in layers), tuple(m.momentum for _, m in layers))

    def __bool__(self) -> bool:
        return bool(self.modules)

    @property
    def dim(self) -> int:
        """D_b: the running means and variances of every layer."""
        return 2 * sum(self.channels)

    @property
    def names(self) -> tuple[str, ...]:
        """Every buffer's name in ``named_buffers()``, floats then counters."""
        prefix = lambda m: f"{m}." if m else ""
        return tuple(f"{prefix(m)}{b}" for m in self.modules for b in RUNNING) + tuple(f"{prefix(m)}{COUNTER}" for m in self.modules)

    @property
    def counter_names(self) -> tuple[str, ...]:
        """The num_batches_tracked names, one per layer, in the order of the (N, L) counters."""
        return self.names[2 * len(self.modules):]

    def running_slices(self) -> list[tuple[str, slice]]:
        """(name, columns) of every running mean and variance inside the flat (N, D_b) floats."""
        sizes = [c for c in self.channels for _ in RUNNING]
        ends = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [(name, slice(a, b)) for name, a, b in zip(self.names, ends, ends[1:])]

    def flatten(self, buffers: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """name -> (N, *shape) as (floats (N, D_b), counters (N, L) int64)."""
        floats = torch.cat([buffers[name].reshape(len(buffers[name]), -1) for name, _ in self.running_slices()], dim=1)
        counters = torch.stack([buffers[name].reshape(-1) for name in self.counter_names], dim=1)
        return floats, counters.long()

    def unflatten(self, floats: torch.Tensor, counters: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(..., D_b) floats (and (..., L) counters) as name -> (..., C) views."""
        chunks = torch.split(floats, [c for c in self.channels for _ in RUNNING], dim=-1)
        named = dict(zip(self.names, chunks))
        if counters is not None:
            named.update({name: counters[..., i] for i, name in enumerate(self.counter_names)})
        return named

    def rates(self, counters: torch.Tensor) -> torch.Tensor:
        """(..., D_b) float64: each running statistic's update rate m in this step, the layer's
        momentum, or 1 / num_batches_tracked counted after the increment for momentum=None."""
        columns = []
        for i, (channels, momentum) in enumerate(zip(self.channels, self.momenta)):
            count = counters[..., i : i + 1].to(torch.float64)
            m = (count + 1).reciprocal() if momentum is None else torch.full_like(count, momentum)
            columns.append(m.expand(*count.shape[:-1], 2 * channels))
        return torch.cat(columns, dim=-1)


class _Context:
    """What the weighted BatchNorm layers of one forward read and write: the sample weights
    (None in eval mode) and, in train mode, every layer's batch statistics."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        self.statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class WeightedBatchNorm(nn.Module):
    """A BatchNorm layer with the same parameters and buffers, whose train-mode statistics weigh
    the samples by the context's weights and are handed to the context instead of the buffers."""

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, name: str, context: _Context):
        super().__init__()
        self.name, self.context, self.eps = name, context, source.eps
        if source.affine:
            self.weight, self.bias = nn.Parameter(source.weight.detach().clone()), nn.Parameter(source.bias.detach().clone())
        else:
            self.weight = self.bias = None
        for buffer in (*RUNNING, COUNTER):
            self.register_buffer(buffer, getattr(source, buffer).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.context.weights
        shape = (1, -1, *[1] * (x.dim() - 2))
        if weights is None:  # written out: the test gradient has a block for the running statistics
            out = (x - self.running_mean.reshape(shape)) * (self.running_var + self.eps).rsqrt().reshape(shape)
            return out if self.weight is None else out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.name in self.context.statistics:
            raise ValueError(f"BatchNorm layer {self.name!r} runs twice in one forward: dicekern replays each layer's statistics once")
        axes = [0, *range(2, x.dim())]
        positions = prod(x.shape[2:])
        w = weights.reshape(-1, *[1] * (x.dim() - 1))
        total = weights.sum() * positions
        count = torch.where(total > 0, total, torch.ones_like(total))  # a batch with every sample removed: no forward, see update_buffers
        mean = (w * x).sum(axes) / count
        centred = x - mean.reshape(shape)
        var = (w * centred * centred).sum(axes) / count
        self.context.statistics[self.name] = (mean, var * count / (count - 1))
        out = centred * (var + self.eps).rsqrt().reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


class WeightedModel:
    """A copy of a model whose BatchNorm layers are :class:`WeightedBatchNorm`, as pure functions
    of one node's params theta (D,) and float buffers beta (D_b,)."""

    def __init__(self, model: nn.Module, layout: BufferLayout):
        self.layout, self.context = layout, _Context()
        self.module = copy.deepcopy(model)
        for name in layout.modules:
            parent, _, leaf = name.rpartition(".")
            owner = self.module.get_submodule(parent) if parent else self.module
            setattr(owner, leaf, WeightedBatchNorm(owner.get_submodule(leaf), name, self.context))

    def train(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, statistics (D_b,)): the train-mode forward of a batch x (B, ...) with sample
        weights (B,), and every layer's (mean, unbiased variance) in buffer order."""
        self.context.weights, self.context.statistics = weights, {}
        try:
            out = torch.func.functional_call(self.module, dict(params), (x,))
            statistics = torch.cat([t for name in self.layout.modules for t in self.context.statistics[name]])
        finally:
            self.context.weights, self.context.statistics = None, {}
        return out, statistics

    def eval(self, params: Mapping[str, torch.Tensor], beta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode forward with running statistics beta (D_b,)."""
        return torch.func.functional_call(self.module, {**params, **self.layout.unflatten(beta)}, (x,))


def update_buffers(
    layout: BufferLayout, beta: torch.Tensor, counters: torch.Tensor, statistics: torch.Tensor, forward: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta' (..., D_b), counters' (..., L)): the running statistics after a train-mode forward,
    beta' = (1 - m) beta + m statistics, and every counter plus one. Where ``forward`` (...,) is
    False (every sample of the batch removed) no forward runs, and the buffers stay as they are."""
    m = layout.rates(counters).to(beta.dtype)
    return torch.where(forward[..., None], beta + m * (statistics - beta), beta), counters + forward[..., None].long()
