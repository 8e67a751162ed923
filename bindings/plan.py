"""What the MLP kernels need of a model: its layer widths, offsets and codes (no triton import here).

Which nn.Modules map to a plan is the Triton backend's question (``dicekern.curvature.triton``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dicekern.kernels import codes

MAX_WIDTH = 256  # the widest layer output whose tiles fit a program; wider models run the closed-form engine
CURVATURE_MODES = {"exact": codes.MODE_HVP, "ggn": codes.MODE_GGN, "none": codes.NO_CURVATURE}  # chain curvature -> kernel mode


@dataclass(frozen=True)
class MLPPlan:
    """What the kernels need of a model: layer widths (L+1,), weight and bias offsets (L,), the
    activation between layers and its slope, the loss, the parameter count and the tile width WMAX."""

    widths: tuple[int, ...]
    weight_offsets: tuple[int, ...]
    bias_offsets: tuple[int, ...]
    activation: int
    slope: float
    loss: int
    dim: int  # D, the length of the flat parameter vector

    @property
    def wmax(self) -> int:
        return max(16, 1 << (max(self.widths[1:]) - 1).bit_length())

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
        return as_tensor(self.widths), as_tensor(self.weight_offsets), as_tensor(self.bias_offsets)
