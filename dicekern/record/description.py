"""How a saved run rebuilds its model and loss: import paths and JSON, never pickle.

Trust model: a description names code, it does not contain any. Loading a described run imports
the module it names (the factory's, and the loss's when that is given by import path), which runs
the module's top-level code exactly as ``import`` would, from the interpreter's own ``sys.path``;
the run's folder is never added to it. It then calls only what its author marked with
:func:`rebuildable`, so a forged run folder cannot make dicekern call any other function of the
environment (``subprocess``, ``os``, ...) with arguments of its choosing. What remains trusted:
the installed modules, whose import runs their code, and the marked factories.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dicekern.core import losses
from dicekern.core.losses import ClosedFormLoss
from dicekern.curvature.torch_func import TorchFuncBackend

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
LOSS_NAMES = {loss.kind: loss for loss in (losses.softmax_cross_entropy, losses.binary_logistic, losses.squared_error)}
MARK = "__dicekern_rebuildable__"


def rebuildable(function: Callable) -> Callable:
    """Mark a model factory or a per-sample loss as one that a saved run may name by import path.

    Example:
        >>> import dicekern as dk
        >>> from torch import nn
        >>> @dk.rebuildable
        ... def build(width: int) -> nn.Module:
        ...     return nn.Linear(width, 2)
        >>> build(3).out_features
        2
    """
    if not callable(function):
        raise TypeError(f"rebuildable marks a function, got {type(function).__name__}")
    setattr(function, MARK, True)
    return function


def _check_not_the_script(module_name: str, path: str, what: str) -> None:
    """Importing the script being run (``python train.py``) by its module name would run it again."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script is None or module_name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return  # import_module reports it
    if spec is not None and spec.origin and Path(spec.origin).resolve() == Path(script).resolve():
        raise ValueError(f"{what} {path!r} lives in the script being run ({script}); importing it would run the script "
                         f"again: move it to a module of its own")


def _check_json(name: str, value: object) -> dict[str, Any]:
    """A JSON object of plain values (finite numbers), copied so later changes to value do not leak in."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name} must be a mapping with string keys, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must hold only JSON values (strings, finite numbers, booleans, None, lists, dicts): {error}") from None


def import_object(path: str, what: str) -> Any:
    """The object at ``"package.module:attribute"``; a ValueError naming the path when it cannot be imported."""
    if not isinstance(path, str) or not IMPORT_PATH.fullmatch(path):
        raise ValueError(f"{what} must be an import path 'package.module:attribute', got {path!r}")
    module_name, attributes = path.split(":")
    _check_not_the_script(module_name, path, what)
    try:
        value = importlib.import_module(module_name)
    except Exception as error:  # the module's own code may raise anything while it imports
        raise ValueError(f"cannot import {what} {path!r}: {type(error).__name__}: {error}") from None
    for attribute in attributes.split("."):
        if not hasattr(value, attribute):
            raise ValueError(f"cannot import {what} {path!r}: {module_name} has no attribute {attributes!r}")
        value = getattr(value, attribute)
    if not getattr(value, MARK, False):
        raise ValueError(f"{what} {path!r} is not marked with @dk.rebuildable: a saved run may name only the factories and "
                         f"losses their authors marked, so that a run folder cannot make dicekern call other code")
    return value


@dataclass(frozen=True)
class RunDescription:
    """How to rebuild a run's model and loss, and what else its author wants kept with it.

    Attributes:
        model: import path ``"package.module:factory"`` of a function marked with
            :func:`rebuildable` that returns the nn.Module (its parameter values do not matter:
            the recorded ones are used).
        model_kwargs: JSON keyword arguments of the factory.
        loss: a ``dk.losses`` name ("softmax_cross_entropy", "binary_logistic", "squared_error")
            or the import path of a per-sample loss marked with :func:`rebuildable`; None for a
            ``dk.losses`` loss, which the recorder names itself.
        metadata: free-form JSON kept with the run (topology, seed, dataset, ...).

    Example:
        >>> import dicekern as dk
        >>> description = dk.RunDescription("dicekern.apps.examples:mlp", {"hidden": 32}, metadata={"seed": 0})
        >>> description.build_model()[0].out_features
        32
    """

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not IMPORT_PATH.fullmatch(self.model):
            raise ValueError(f"model must be an import path 'package.module:factory', got {self.model!r}")
        if self.loss is not None and (not isinstance(self.loss, str) or (self.loss not in LOSS_NAMES and not IMPORT_PATH.fullmatch(self.loss))):
            raise ValueError(f"loss must be one of {sorted(LOSS_NAMES)} or an import path 'package.module:function', got {self.loss!r}")
        object.__setattr__(self, "model_kwargs", _check_json("model_kwargs", self.model_kwargs))
        object.__setattr__(self, "metadata", _check_json("metadata", self.metadata))

    def build_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Import the factory and call it with model_kwargs; the module in dtype."""
        factory = import_object(self.model, "model factory")
        try:
            model = factory(**self.model_kwargs)
        except (Exception, SystemExit) as error:  # the user's factory may raise anything on bad kwargs, or exit
            raise ValueError(f"model factory {self.model!r}({self.model_kwargs}) failed: {type(error).__name__}: {error}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {self.model!r} returned an object of type {type(model).__name__}, not an nn.Module")
        return model.to(dtype)

    def build_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss named by ``loss``; a ValueError when there is none or it cannot be imported."""
        if self.loss is None:
            raise ValueError("the description names no loss: pass loss_fn")
        if self.loss in LOSS_NAMES:
            return LOSS_NAMES[self.loss]
        return import_object(self.loss, "loss")

    def naming(self, loss_fn: object) -> RunDescription:
        """This description, its loss named after loss_fn when that is a ``dk.losses`` loss and none is given."""
        if self.loss is not None or not isinstance(loss_fn, ClosedFormLoss):
            return self
        return RunDescription(self.model, self.model_kwargs, loss_fn.kind, self.metadata)

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields a manifest stores; ``from_dict`` reads them back."""
        return {"model": self.model, "model_kwargs": self.model_kwargs, "loss": self.loss, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, fields: object, where: str) -> RunDescription:
        """The description saved at where; a ValueError naming the field otherwise."""
        if not isinstance(fields, dict) or set(fields) != {"model", "model_kwargs", "loss", "metadata"}:
            raise ValueError(f"{where}: field 'description' must have exactly the fields model, model_kwargs, loss, metadata")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: field 'description': {error}") from None


def check_describes(description: RunDescription, objective: TorchFuncBackend, theta: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> None:
    """The description rebuilds this objective's model (same parameters; same outputs at theta (D,)
    on inputs (B, ...) when given) and its loss; a ValueError naming the difference otherwise."""
    built = TorchFuncBackend(description.build_model(), objective.loss_fn)
    expected, found = list(zip(objective.layout.names, objective.layout.shapes)), list(zip(built.layout.names, built.layout.shapes))
    if found != expected:
        raise ValueError(f"model factory {description.model!r} builds parameters {found}, but the run's model has {expected}")
    if inputs is not None:
        with torch.no_grad():
            ours, theirs = objective.outputs(theta, inputs), built.outputs(theta, inputs)
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6 * max(ours.abs().max().item(), 1.0)):
            raise ValueError(f"model factory {description.model!r} builds a model whose outputs differ from the run's model on its first batch")
    if description.loss is not None and description.build_loss() != objective.loss_fn:
        raise ValueError(f"the description names the loss {description.loss!r}, which is not the run's loss {objective.loss_fn!r}")


def described(description: object, objective: TorchFuncBackend) -> RunDescription | None:
    """description checked against objective's parameters, its loss named when that is a ``dk.losses`` loss."""
    if description is None:
        return None
    if not isinstance(description, RunDescription):
        raise TypeError(f"description must be a dk.RunDescription, got {type(description).__name__}")
    description = description.naming(objective.loss_fn)
    if description.loss is None:
        raise ValueError(f"the run's loss {objective.loss_fn!r} is not one of dk.losses: name it in the description by the import "
                         f"path of a function marked with @dk.rebuildable, so that a load can rebuild it")
    check_describes(description, objective)
    return description
