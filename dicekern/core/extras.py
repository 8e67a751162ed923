"""Optional dependencies, imported when a feature first needs them, with the extra that installs them.

The engine needs torch, numpy and safetensors only. ``dicekern[apps]`` adds what the topologies,
the bundled digits, the analyses, the pictures and the command line use (networkx, scikit-learn,
scipy, matplotlib, tqdm); ``dicekern[triton]`` adds the kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


class MissingExtra(ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the extra."""

    def __init__(self, feature: str, module: str, extra: str):
        super().__init__(f"{feature} needs {module.split('.')[0]}: pip install 'dicekern[{extra}]'", name=module.split(".")[0])
        self.feature, self.module, self.extra = feature, module, extra

    def __reduce__(self):  # picklable, so it crosses process boundaries (multiprocessing, torchrun)
        return MissingExtra, (self.feature, self.module, self.extra)


def optional(module: str, feature: str, extra: str) -> ModuleType:
    """module, imported; an ImportError naming the feature and the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not (module == error.name or module.startswith(error.name + ".")):
            raise  # something the module itself imports is missing: its own error says what
        raise MissingExtra(feature, module, extra) from None


def progress(iterable: Iterable[T], *, enabled: bool, description: str, **options) -> Iterable[T]:
    """iterable with a tqdm progress bar when enabled (tqdm is imported only then)."""
    if not enabled:
        return iterable
    return optional("tqdm.auto", "a progress bar", "apps").tqdm(iterable, desc=description, **options)
