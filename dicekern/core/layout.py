"""Flat layout of a model's parameters: every node's model as one row of an (N, D) tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a model's parameters inside a flat vector of length D."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters: there is nothing to attribute influence to")
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """D, the number of scalar parameters of one node's model."""
        return sum(self.sizes)

    def slices(self) -> list[tuple[str, slice]]:
        """(name, columns) of every parameter inside the flat vector."""
        ends = [0]
        for size in self.sizes:
            ends.append(ends[-1] + size)
        return [(name, slice(a, b)) for name, a, b in zip(self.names, ends, ends[1:])]

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Stack a mapping name -> (N, *shape) into one (N, D) tensor (a copy).

        Raises:
            ValueError: on names that are not the model's, missing names, a node count that
                differs between parameters, or a wrong per-node shape.
        """
        unknown = sorted(set(params) - set(self.names))
        missing = [n for n in self.names if n not in params]
        if unknown or missing:
            raise ValueError(
                f"params must have exactly the model's parameter names {list(self.names)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        tensors = [params[n] for n in self.names]
        for name, t in zip(self.names, tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"params[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"params[{name!r}] must be a floating-point tensor, got {t.dtype}")
        num_nodes = {t.shape[0] if t.dim() > 0 else None for t in tensors}
        if len(num_nodes) != 1 or None in num_nodes:
            counts = {n: (tuple(t.shape)[:1] or None) for n, t in zip(self.names, tensors)}
            raise ValueError(f"params disagree on the node count N (leading dimension): {counts}")
        n = tensors[0].shape[0]
        for name, t, shape in zip(self.names, tensors, self.shapes):
            if t.shape[1:] != shape:
                raise ValueError(
                    f"params[{name!r}] has shape {tuple(t.shape)}, expected (N, *{tuple(shape)}) "
                    f"with N={n}"
                )
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"params must share one dtype and device, got {dtypes} on {devices}")
        return torch.cat([t.detach().reshape(n, -1) for t in tensors], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a (..., D) tensor as a mapping name -> (..., *shape)."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.sizes, dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}
