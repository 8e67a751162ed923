"""The closed-form engine: MLPs under the ``dk.losses`` losses as batched tensor algebra, no torch.func.

Models: ``nn.Linear``, or an ``nn.Sequential`` of ``nn.Linear`` layers and pointwise activations
(Tanh, ReLU, LeakyReLU, GELU, SiLU, Sigmoid, Identity), with an optional ``nn.Flatten`` first.
Every quantity of the chain is one forward pass, one backward pass, and for curvature products one
R-op pass (Pearlmutter) forward and back, written with matmuls that broadcast over leading axes:
(N,) for nodes, (N, C) for nodes and chain columns, whose forward pass is shared across columns.

Shapes: params (R, D); a layer's weight (R, out, in) row-major, then its bias (R, out); batches
(R, B, features) after the flatten; outputs (R, B, K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dicekern.core.losses import ClosedFormLoss
from dicekern.core.layout import ParamLayout
from dicekern.curvature.protocol import Capabilities, Curvature, LossFn
from dicekern.curvature.torch_func import mean_weights

ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Identity)


@dataclass(frozen=True)
class Layer:
    """One module of the stack: a linear map (columns of its weight and bias in the flat vector)
    or a pointwise activation."""

    kind: str  # "linear" or an activation name
    weight: slice | None = None
    bias: slice | None = None
    shape: tuple[int, int] = (0, 0)  # (out, in) of a linear layer
    slope: float = 0.0  # LeakyReLU's negative slope


def unsupported_reason(model: nn.Module, loss_fn: object) -> str | None:
    """Why the closed-form engine cannot run this model and loss, or None when it can."""
    if not isinstance(loss_fn, ClosedFormLoss):
        return "the loss is not one of dk.losses (softmax_cross_entropy, binary_logistic, squared_error)"
    modules = [model] if isinstance(model, nn.Linear) else list(model) if isinstance(model, nn.Sequential) else None
    if modules is None:
        return f"the model is a {type(model).__name__}, not an nn.Linear or an nn.Sequential"
    for i, module in enumerate(modules):
        if isinstance(module, nn.Flatten):
            if i != 0 or module.start_dim != 1 or module.end_dim != -1:
                return "nn.Flatten is supported only as the first module, flattening every axis after the batch"
        elif isinstance(module, nn.GELU) and module.approximate != "none":
            return "nn.GELU(approximate='tanh') is not supported (the exact GELU is)"
        elif not isinstance(module, (nn.Linear, *ACTIVATIONS)):
            return f"module {i} is a {type(module).__name__}: only nn.Linear, {', '.join(a.__name__ for a in ACTIVATIONS)} and a leading nn.Flatten"
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    if not linears:
        return "the model has no nn.Linear"
    if loss_fn.kind == "binary_logistic" and linears[-1].out_features != 1:
        return "binary_logistic needs one output"
    return None


def _layers(model: nn.Module, layout: ParamLayout) -> list[Layer]:
    columns = dict(layout.slices())
    modules = [("", model)] if isinstance(model, nn.Linear) else list(model.named_children())
    layers = []
    for name, module in modules:
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            bias = columns[prefix + "bias"] if module.bias is not None else None
            layers.append(Layer("linear", columns[prefix + "weight"], bias, (module.out_features, module.in_features)))
        elif not isinstance(module, (nn.Flatten, nn.Identity)):
            layers.append(Layer(type(module).__name__.lower(), slope=getattr(module, "negative_slope", 0.0)))
    return layers


@dataclass
class Activated:
    """An activation's input z, output sigma(z) and sigma'(z) from the forward pass; sigma''(z) on demand."""

    kind: str
    slope: float
    z: torch.Tensor
    out: torch.Tensor
    d1: torch.Tensor

    @classmethod
    def of(cls, kind: str, slope: float, z: torch.Tensor) -> Activated:
        """sigma and sigma' as torch's autograd defines them."""
        if kind == "tanh":
            out = torch.tanh(z)
            return cls(kind, slope, z, out, 1 - out * out)
        if kind == "sigmoid":
            out = torch.sigmoid(z)
            return cls(kind, slope, z, out, out * (1 - out))
        if kind == "silu":
            s = torch.sigmoid(z)
            return cls(kind, slope, z, z * s, s * (1 + z * (1 - s)))
        if kind == "gelu":
            cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
            return cls(kind, slope, z, z * cdf, cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
        positive = z > 0  # relu and leakyrelu: torch's gradient at 0 is the negative side's
        return cls(kind, slope, z, torch.where(positive, z, slope * z), torch.where(positive, torch.ones_like(z), torch.full_like(z, slope)))

    def d2(self) -> torch.Tensor | None:
        """sigma''(z), None where it is 0 (the piecewise-linear activations)."""
        if self.kind == "tanh":
            return -2 * self.out * self.d1
        if self.kind == "sigmoid":
            return self.d1 * (1 - 2 * self.out)
        if self.kind == "silu":
            s = torch.sigmoid(self.z)
            return s * (1 - s) * (2 + self.z * (1 - 2 * s))
        if self.kind == "gelu":
            return torch.exp(-0.5 * self.z * self.z) / math.sqrt(2 * math.pi) * (2 - self.z * self.z)
        return None


def _shared(a: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether one batch a (1.., B, in) meets many rows of g (..., B, out): a test set at many nodes."""
    return math.prod(a.shape[:-2]) == 1 and math.prod(W.shape[:-2]) > 1


def _outer(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_b g_b a_b^T: (..., B, out) x (..., B, in) -> (..., out, in); a shared batch goes through one GEMM."""
    if not _shared(a, g):
        return torch.matmul(g.transpose(-1, -2), a)
    lead, (batch, out) = g.shape[:-2], g.shape[-2:]
    gw = g.movedim(-2, -1).reshape(-1, batch) @ a.reshape(batch, -1)  # [rows*out, B] @ [B, in]
    return gw.view(*lead, out, -1)


class ClosedFormBackend:
    """Gradients, exact Hessian and Gauss-Newton products and per-sample dots of an MLP, in closed form.

    Implements every method of the ``CurvatureBackend`` protocol itself, with the results of the
    torch.func reference.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        name="closed_form",
        models="nn.Linear, or an nn.Sequential of nn.Linear and pointwise activations (Tanh, ReLU, LeakyReLU, GELU, SiLU, "
               "Sigmoid, Identity) with an optional leading nn.Flatten",
        losses="dk.losses: softmax_cross_entropy, binary_logistic, squared_error",
        dtypes=(torch.float32, torch.float64),
        devices=None,
    )

    @classmethod
    def unsupported(cls, model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> str | None:
        reason = unsupported_reason(model, loss_fn) or cls.capabilities.unsupported(device, dtype)
        flattens = isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Flatten)
        if reason is None and not flattens and len(input_shape) != 1:
            reason = f"its inputs are {input_shape} per sample; put an nn.Flatten first"
        return reason

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        reason = unsupported_reason(model, loss_fn)
        if reason is not None:
            raise ValueError(f"the closed-form engine cannot run this model: {reason}")
        self.model, self.loss_fn, self.layout = model, loss_fn, ParamLayout.of(model)
        self.layers = _layers(model, self.layout)
        self.loss_kind = loss_fn.kind

    # ---- the passes ----

    def _linears(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every linear layer's (weight (..., out, in), bias (..., out) or None) as views of params (..., D)."""
        lead = params.shape[:-1]
        return [(params[..., layer.weight].view(*lead, *layer.shape), None if layer.bias is None else params[..., layer.bias])
                for layer in self.layers if layer.kind == "linear"]

    def _flat(self, inputs: torch.Tensor, lead: int) -> torch.Tensor:
        """(..., B, features): inputs with every axis after the first lead + 1 flattened."""
        return inputs.flatten(lead + 1) if inputs.dim() > lead + 2 else inputs

    def _forward(self, linears: list, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(outputs (..., B, K), per module: its input (linear) or its Activated (activation))."""
        tape, a, linear = [], x, iter(linears)
        for layer in self.layers:
            if layer.kind == "linear":
                tape.append(a)
                W, b = next(linear)
                a = torch.matmul(a, W.transpose(-1, -2))
                a = a if b is None else a + b.unsqueeze(-2)
            else:
                tape.append(Activated.of(layer.kind, layer.slope, a))
                a = tape[-1].out
        return a, tape

    def _jvp(self, linears: list, v_linears: list, tape: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """R{outputs} and R{every module's input} along the parameter direction v_linears."""
        r_tape, r, linear = [], None, iter(zip(linears, v_linears))
        for layer, entry in zip(self.layers, tape):
            r_tape.append(r)
            if layer.kind == "linear":
                (W, _), (V, vb) = next(linear)
                term = torch.matmul(V, entry.transpose(-1, -2)).transpose(-1, -2)  # V's rows stay in place: no copy of V
                r = term if r is None else term + torch.matmul(r, W.transpose(-1, -2))
                r = r if vb is None else r + vb.unsqueeze(-2)
            elif r is not None:
                r = entry.d1 * r
        return r, r_tape

    def _backward(self, linears: list, tape: list, g: torch.Tensor, r_tape: list | None = None,
                  rg: torch.Tensor | None = None, v_linears: list | None = None) -> torch.Tensor:
        """(..., D) parameter gradients of the output cotangent g (..., B, K).

        With r_tape, rg and v_linears: instead the R-op of that gradient (the exact Hessian product),
        rg being R{g}. Each layer's part is written into the flat result as it is computed.
        """
        out, linear = None, len(linears)
        exact = r_tape is not None

        def put(columns: slice | None, part: torch.Tensor) -> None:
            nonlocal out
            if out is None:
                out = part.new_empty(*part.shape[:-1], self.layout.dim)
            out[..., columns] = part

        for i in range(len(self.layers) - 1, -1, -1):
            layer, entry = self.layers[i], tape[i]
            if layer.kind == "linear":
                a = entry
                linear -= 1
                W = linears[linear][0]
                if exact:
                    ra, V = r_tape[i], v_linears[linear][0]
                    gW = _outer(rg, a)
                    put(layer.weight, (gW if ra is None else gW.add_(_outer(g, ra))).flatten(-2))
                    if layer.bias is not None:
                        put(layer.bias, rg.sum(-2))
                    if i:
                        rg = torch.matmul(rg, W) + torch.matmul(g, V)
                else:
                    put(layer.weight, _outer(g, a).flatten(-2))
                    if layer.bias is not None:
                        put(layer.bias, g.sum(-2))
                if i:
                    g = torch.matmul(g, W)
            else:
                d2 = entry.d2() if exact and r_tape[i] is not None else None
                if exact:
                    rg = rg * entry.d1 if d2 is None else rg * entry.d1 + g * d2 * r_tape[i]
                g = g * entry.d1
        return out

    def _loss_grad(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(..., B, K) d loss_b / d outputs."""
        if self.loss_kind == "softmax_cross_entropy":
            return torch.softmax(outputs, -1) - nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        if self.loss_kind == "binary_logistic":
            return torch.sigmoid(outputs) - targets.unsqueeze(-1)
        return 2 * (outputs - targets) / outputs.shape[-1]

    def _loss_hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """H_o u per sample, H_o the loss Hessian in the outputs."""
        if self.loss_kind == "softmax_cross_entropy":
            p = torch.softmax(outputs, -1)
            pu = p * u
            return pu - p * pu.sum(-1, keepdim=True)
        if self.loss_kind == "binary_logistic":
            s = torch.sigmoid(outputs)
            return s * (1 - s) * u
        return 2 * u / outputs.shape[-1]

    # ---- the CurvatureBackend protocol ----

    def node_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        linears = self._linears(params)
        out, tape = self._forward(linears, self._flat(inputs, 1))
        return self._backward(linears, tape, weights.unsqueeze(-1) * self._loss_grad(out, targets))

    def test_grads(self, params: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = test
        return self.node_grads(params, x.unsqueeze(0), y.unsqueeze(0), mean_weights((1, len(x)), params))

    def per_sample_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(K, B, D): each sample's own gradient at its row's params; a sample is a batch of one."""
        k, b = inputs.shape[:2]
        rows = params.unsqueeze(1).expand(k, b, params.shape[-1])
        linears = self._linears(rows)
        out, tape = self._forward(linears, self._flat(inputs, 1).unsqueeze(2))
        return self._backward(linears, tape, self._loss_grad(out, targets.unsqueeze(2)))

    def test_point_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(K, M, D): each test point's own gradient; the M targets are shared by the K rows."""
        return self.per_sample_grads(params, inputs, targets.expand(len(params), *targets.shape))

    def curvature_products(
        self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        linears, v_linears = self._linears(params.unsqueeze(1)), self._linears(vectors)
        out, tape = self._forward(linears, self._flat(inputs, 1).unsqueeze(1))
        r_out, r_tape = self._jvp(linears, v_linears, tape)
        scale = 1.0 / inputs.shape[1]  # of the batch mean
        rg = scale * self._loss_hvp(out, r_out)
        if kind == "ggn":
            grads = self._backward(linears, tape, rg)
        else:
            g = scale * self._loss_grad(out, targets.unsqueeze(1))
            grads = self._backward(linears, tape, g, r_tape, rg, v_linears)
        return grads

    def per_sample_dots(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        linears, v_linears = self._linears(params.unsqueeze(1)), self._linears(vectors)
        out, tape = self._forward(linears, self._flat(inputs, 1).unsqueeze(1))
        r_out, _ = self._jvp(linears, v_linears, tape)
        return (self._loss_grad(out, targets.unsqueeze(1)) * r_out).sum(-1)
