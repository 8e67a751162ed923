"""What every kernel launcher shares: its output buffers and the checks of its device and operands."""

from __future__ import annotations

import importlib.util
import os

import torch

from dicekern.core.extras import MissingExtra

POISON_ENV = "DICEKERN_POISON_OUTPUTS"  # set to 1 (the tests do) to fill kernel outputs with NaN before launch


def new_output(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A kernel's output buffer: uninitialised, or NaN under DICEKERN_POISON_OUTPUTS=1 so that an
    element the kernel fails to write shows up in every comparison."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


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
