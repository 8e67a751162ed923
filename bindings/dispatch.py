"""Which engine runs a query, and the checks every kernel launcher shares."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import nn

from dicekern.bindings.plan import mlp_plan
from dicekern.core.checks import check_choice
from dicekern.core.extras import MissingExtra

BACKENDS = ("auto", "torch", "closed_form", "triton")
POISON_ENV = "DICEKERN_POISON_OUTPUTS"  # set to 1 (the tests do) to fill kernel outputs with NaN before launch


def new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A kernel's output buffer: uninitialised, or NaN under DICEKERN_POISON_OUTPUTS=1 so that an
    element the kernel fails to write shows up in every comparison."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def kernels_cover(model: nn.Module, loss_fn: object) -> bool:
    """True for the MLPs under a ``dk.losses`` loss that the Triton kernels run (see ``plan.mlp_plan``)."""
    return not isinstance(mlp_plan(model, loss_fn), str)


def resolve_backend(
    backend: str, device: torch.device, *, kernels: bool, closed_form: str | None, validated: Callable[[], bool] = lambda: True,
) -> str:
    """The engine of a query: "torch", "closed_form" or "triton".

    "auto" takes Triton on CUDA tensors for a model the kernels cover whose kernels pass
    ``validated()`` (a self-check against the torch engine), else the closed-form engine where it
    covers the model, else torch. closed_form is None when the closed-form engine covers the
    model, else the reason it does not. With "triton", a model the kernels do not cover still
    mixes every hop with the Triton kernel.

    Raises:
        ValueError: backend="triton" on CPU tensors without TRITON_INTERPRET=1, or
            backend="closed_form" for a model it does not cover (with the reason).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and kernels and importlib.util.find_spec("triton") is not None and validated():
            return "triton"
        return "closed_form" if closed_form is None else "torch"
    if backend == "triton":
        require_triton_device(device)
    if backend == "closed_form" and closed_form is not None:
        raise ValueError(f"backend='closed_form' cannot run this model: {closed_form}")
    return backend


def require_triton_device(device: torch.device) -> None:
    """The kernels can run on device: triton is installed, and CPU tensors have its interpreter."""
    if importlib.util.find_spec("triton") is None:
        raise MissingExtra("backend 'triton'", "triton", "triton")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, or use CUDA tensors"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels run on CUDA (or CPU under the interpreter), not {device.type}")


def check_operand(name: str, tensor: object, like: torch.Tensor, shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> None:
    """A kernel operand: a contiguous tensor of the given shape, on like's device, in dtype (default like's)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    dtype = like.dtype if dtype is None else dtype
    if tensor.dtype != dtype or tensor.device != like.device:
        raise ValueError(f"{name} is {tensor.dtype} on {tensor.device}; expected {dtype} on {like.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
