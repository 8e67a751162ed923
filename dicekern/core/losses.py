"""Per-sample losses with closed-form output curvature: the losses the linear-head kernels support.

Each maps (outputs (B, K), targets) to (B,) losses, so any of them can be a Recorder's loss_fn. A
loss the kernels recognise carries ``kind``; any other callable runs on the torch engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

LossKind = Literal["softmax_cross_entropy", "binary_logistic", "squared_error"]


@dataclass(frozen=True)
class ClosedFormLoss:
    """A per-sample loss whose gradient and Hessian in the outputs are known in closed form."""

    kind: LossKind

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax_cross_entropy":  # targets (B,) class indices
            return nn.functional.cross_entropy(outputs, targets, reduction="none")
        if self.kind == "binary_logistic":  # outputs (B, 1) logits, targets (B,) in [0, 1]
            return nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets, reduction="none")
        return ((outputs - targets) ** 2).mean(dim=-1)  # targets (B, K)


softmax_cross_entropy = ClosedFormLoss("softmax_cross_entropy")
binary_logistic = ClosedFormLoss("binary_logistic")
squared_error = ClosedFormLoss("squared_error")
