"""Level 4, beside the engine: a zoo of small, paper-shaped models for tests, benchmarks and the CLI.

``models`` holds the factories (``resnet``, ``vit``, ``cnn1d``, ``mlp``), each marked
``@rebuildable`` so that a saved run names it as ``"dicekern.zoo:resnet"`` with JSON keyword
arguments; ``data`` the random inputs that fit them. ``MODELS`` maps the command line's names to
``ZooModel(factory, kwargs, data)``; ``build``, ``random_data`` and ``description`` read it.

May import: ``dicekern.core`` and ``dicekern.record.description`` (for ``rebuildable``), and torch.
Never the engine, ``truth``, ``apps`` or ``distributed``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from dicekern.core.checks import check_choice
from dicekern.record.description import RunDescription
from dicekern.zoo.data import images, sequences, vectors
from dicekern.zoo.models import cnn1d, mlp, resnet, vit


class ZooModel(NamedTuple):
    """One entry of :data:`MODELS`.

    Attributes:
        factory: the ``@rebuildable`` model factory.
        kwargs: the entry's keyword arguments on top of the factory's defaults.
        data: the maker of fitting random data, ``data(*shape, **kwargs) -> (inputs, targets)``.
    """

    factory: Callable[..., nn.Module]
    kwargs: dict[str, Any]
    data: Callable[..., tuple[torch.Tensor, torch.Tensor]]


MODELS: dict[str, ZooModel] = {
    "resnet-bn": ZooModel(resnet, {"norm": "batch"}, images),
    "resnet-gn": ZooModel(resnet, {"norm": "group"}, images),
    "vit": ZooModel(vit, {}, images),
    "cnn1d": ZooModel(cnn1d, {}, sequences),
    "mlp": ZooModel(mlp, {}, vectors),
}


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(function).parameters.items() if p.kind == p.KEYWORD_ONLY or p.kind == p.POSITIONAL_OR_KEYWORD}


def arguments(name: str, **overrides: Any) -> dict[str, Any]:
    """Every keyword argument of model name's factory: its defaults, the entry's, then overrides.

    Example:
        >>> arguments("resnet-gn", width=4)
        {'num_classes': 10, 'in_channels': 3, 'width': 4, 'blocks': [1, 1], 'norm': 'group', 'groups': 4}
    """
    entry = MODELS[check_choice("name", name, list(MODELS))]
    accepted = _parameters(entry.factory)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise TypeError(f"{entry.factory.__name__}() takes no argument {unknown[0]!r}; it takes {list(accepted)}")
    values = {key: p.default for key, p in accepted.items()} | entry.kwargs | overrides
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}  # as JSON reads them back


def build(name: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """Model name of :data:`MODELS`, its factory called with :func:`arguments`, in dtype.

    Example:
        >>> build("cnn1d", dtype=torch.float64, width=4).__class__.__name__
        'Sequential'
    """
    return MODELS[check_choice("name", name, list(MODELS))].factory(**arguments(name, **overrides)).to(dtype)


def random_data(name: str, *shape: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (inputs (*shape, ...), targets (*shape,)) that fit ``build(name, **overrides)``.

    overrides are the model's keyword arguments (they shape the inputs and classes), and the data
    maker's own (``image_size`` for the ResNets, which accept any size).

    Example:
        >>> x, y = random_data("vit", 4, 5, image_size=8, patch=4)
        >>> tuple(x.shape), int(y.max()) < 10
        ((4, 5, 3, 8, 8), True)
    """
    entry = MODELS[check_choice("name", name, list(MODELS))]
    accepted = _parameters(entry.data)
    model_kwargs = arguments(name, **{k: v for k, v in overrides.items() if k in _parameters(entry.factory)})
    unknown = sorted(k for k in overrides if k not in model_kwargs and k not in accepted)
    if unknown:
        raise TypeError(f"random_data({name!r}) takes no argument {unknown[0]!r}: neither {entry.factory.__name__}() nor "
                        f"{entry.data.__name__}() takes it")
    chosen = {k: v for k, v in (model_kwargs | overrides).items() if k in accepted}
    return entry.data(*shape, generator=generator, dtype=dtype, **chosen)


def description(name: str, metadata: dict[str, Any] | None = None, **overrides: Any) -> RunDescription:
    """The :class:`dk.RunDescription` of ``build(name, **overrides)``: a saved run rebuilds it by import path.

    Example:
        >>> description("vit", depth=1).model
        'dicekern.zoo:vit'
    """
    factory = MODELS[check_choice("name", name, list(MODELS))].factory
    return RunDescription(f"dicekern.zoo:{factory.__name__}", arguments(name, **overrides), metadata=metadata or {})


__all__ = ["MODELS", "ZooModel", "arguments", "build", "cnn1d", "description", "images", "mlp", "random_data", "resnet",
           "sequences", "vectors", "vit"]
