"""The choice of a query's curvature backend, from the backends' declared capabilities."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dicekern.core.checks import check_choice
from dicekern.core.extras import MissingExtra
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.curvature.protocol import CurvatureBackend, LossFn
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.curvature.triton import TritonBackend

BACKENDS = ("auto", "torch", "closed_form", "triton")
BACKEND_CLASSES: dict[str, type[CurvatureBackend]] = {
    backend.capabilities.name: backend for backend in (TorchFuncBackend, ClosedFormBackend, TritonBackend)
}


@dataclass(frozen=True)
class Selection:
    """The backend a query runs on, and, under "auto", why faster ones could not run it (None if none was passed over)."""

    backend: type[CurvatureBackend]
    fallback: str | None = None

    @property
    def name(self) -> str:
        return self.backend.capabilities.name


def select_backend(
    requested: str, model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
    *, trusted: Callable[[type[CurvatureBackend]], bool] = lambda backend: True,
) -> Selection:
    """The backend of a query, read from the backends' declared capabilities.

    A named backend runs the query or raises a ValueError naming what it lacks (a MissingExtra,
    naming the extra to install, when it is a package). "auto" takes Triton
    on CUDA where triton is installed, the kernels cover the model and ``trusted(TritonBackend)``
    (a self-check against the closed form) passes; else the closed form where it covers the model;
    else the torch.func reference, with the reasons the others gave in ``fallback``.
    """
    check_choice("backend", requested, BACKENDS)
    if requested != "auto":
        backend = BACKEND_CLASSES[requested]
        for package, extra in backend.capabilities.missing_packages():
            raise MissingExtra(f"backend {requested!r}", package, extra)
        reason = backend.unsupported(model, loss_fn, input_shape, device, dtype)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run this query: {reason}")
        return Selection(backend)
    reasons = []
    candidates: list[type[CurvatureBackend]] = [ClosedFormBackend]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        candidates.insert(0, TritonBackend)
    for backend in candidates:
        reason = backend.unsupported(model, loss_fn, input_shape, device, dtype)
        if reason is None and not trusted(backend):
            reason = f"its self-check on {device} in {dtype} failed"
        if reason is None:
            return Selection(backend, "; ".join(reasons) or None)
        reasons.append(f"{backend.capabilities.name}: {reason}")
    return Selection(TorchFuncBackend, "; ".join(reasons))
