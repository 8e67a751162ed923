"""What the MLP kernels need of a model, and which models they cover (no triton import here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dicekern.kernels import codes
from dicekern.curvature.closed_form import unsupported_reason

MAX_WIDTH = 256  # the widest layer output whose tiles fit a program; wider models run the closed-form engine
LOSS_CODES = {"softmax_cross_entropy": codes.LOSS_SOFTMAX_CE, "binary_logistic": codes.LOSS_LOGISTIC, "squared_error": codes.LOSS_SQUARED}
ACT_CODES = {nn.Tanh: codes.ACT_TANH, nn.ReLU: codes.ACT_RELU, nn.LeakyReLU: codes.ACT_LEAKY, nn.GELU: codes.ACT_GELU,
             nn.SiLU: codes.ACT_SILU, nn.Sigmoid: codes.ACT_SIGMOID, nn.Identity: codes.ACT_IDENTITY}


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


def mlp_plan(model: nn.Module, loss_fn: object) -> MLPPlan | str:
    """The kernels' plan of this model and loss, or the reason they do not cover it. They cover
    the closed-form engine's models whose layers alternate with one kind of activation."""
    reason = unsupported_reason(model, loss_fn)
    if reason is not None:
        return reason
    modules = [model] if isinstance(model, nn.Linear) else list(model)
    if isinstance(modules[0], nn.Flatten):  # the closed-form engine admits it only first, flattening all
        modules = modules[1:]
    linears, activations = modules[0::2], modules[1::2]
    if not linears or not all(isinstance(m, nn.Linear) for m in linears) or len(activations) != len(linears) - 1:
        return "the kernels take nn.Linear layers with one activation between each two and none after the last"
    kinds = {(type(a), getattr(a, "negative_slope", 0.0), getattr(a, "approximate", "none")) for a in activations}
    if len(kinds) > 1 or any(kind not in ACT_CODES or approximate != "none" for kind, _, approximate in kinds):
        return "the kernels take one kind of activation (Tanh, ReLU, LeakyReLU, exact GELU, SiLU, Sigmoid or Identity) between all layers"
    if max(m.out_features for m in linears) > MAX_WIDTH:
        return f"a layer is wider than the kernels' {MAX_WIDTH} outputs"
    widths, weights, biases, offset = [linears[0].in_features], [], [], 0
    for m in linears:
        widths.append(m.out_features)
        weights.append(offset)
        offset += m.weight.numel()
        biases.append(offset if m.bias is not None else -1)
        offset += 0 if m.bias is None else m.bias.numel()
    kind, slope, _ = next(iter(kinds), (nn.Identity, 0.0, "none"))
    return MLPPlan(tuple(widths), tuple(weights), tuple(biases), ACT_CODES[kind], float(slope), LOSS_CODES[loss_fn.kind], offset)
