"""The Triton curvature backend: MLPs the kernels cover, computed by ``dicekern.bindings.mlp``.

Importing this module does not import triton; the first kernel call does (on CPU set
``TRITON_INTERPRET=1`` before that). The kernels compute batch gradients, test gradients,
curvature products and per-sample dots; per-sample and per-test-point gradients (order=2,
``per_test=True``) are the closed-form backend's, declared in ``DELEGATED``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from dicekern.bindings.launch import require_triton_device
from dicekern.bindings.plan import CURVATURE_MODES, MAX_WIDTH, MLPPlan
from dicekern.core.layout import ParamLayout
from dicekern.core.losses import ClosedFormLoss
from dicekern.curvature.closed_form import ClosedFormBackend, unsupported_reason
from dicekern.curvature.protocol import Capabilities, Curvature, LossFn
from dicekern.curvature.torch_func import mean_weights
from dicekern.kernels import codes

LOSS_CODES = {"softmax_cross_entropy": codes.LOSS_SOFTMAX_CE, "binary_logistic": codes.LOSS_LOGISTIC, "squared_error": codes.LOSS_SQUARED}
ACT_CODES = {nn.Tanh: codes.ACT_TANH, nn.ReLU: codes.ACT_RELU, nn.LeakyReLU: codes.ACT_LEAKY, nn.GELU: codes.ACT_GELU,
             nn.SiLU: codes.ACT_SILU, nn.Sigmoid: codes.ACT_SIGMOID, nn.Identity: codes.ACT_IDENTITY}
DELEGATED = ("per_sample_grads", "test_point_grads")  # computed by the closed-form backend, not by a kernel


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


class TritonBackend:
    """Gradients, curvature products and per-sample dots of an MLP the kernels cover, computed by them.

    Shapes: inputs (N, B, F) (flattened when the model starts with nn.Flatten), targets (N, B)
    (or (N, B, K) for squared_error).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        name="triton",
        models=f"the closed form's MLPs with one kind of activation between all layers, at most {MAX_WIDTH} wide",
        losses="dk.losses: softmax_cross_entropy, binary_logistic, squared_error",
        dtypes=(torch.float32, torch.float64),
        devices=("cuda", "cpu"),  # CPU only under TRITON_INTERPRET=1
        one_launch_chains=True,
        requires=(("triton", "triton"),),
    )

    @classmethod
    def unsupported(cls, model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> str | None:
        plan = mlp_plan(model, loss_fn)
        reason = cls.capabilities.unsupported(device, dtype) or (plan if isinstance(plan, str) else None) \
            or ClosedFormBackend.unsupported(model, loss_fn, input_shape, device, dtype)
        if reason is None:
            try:
                require_triton_device(device)  # the interpreter for CPU tensors
            except ValueError as error:
                reason = str(error)
        return reason

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        plan = mlp_plan(model, loss_fn)
        if isinstance(plan, str):
            raise ValueError(f"the MLP kernels cannot run this model: {plan}")
        self.model, self.loss_fn, self.layout, self.plan = model, loss_fn, ParamLayout.of(model), plan
        self._closed_form = ClosedFormBackend(model, loss_fn)

    def node_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from dicekern.bindings.mlp import mlp_node

        return mlp_node(self.plan, codes.MODE_GRAD, params, inputs, targets, weights)

    def per_sample_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._closed_form.per_sample_grads(params, inputs, targets)

    def test_grads(self, params: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from dicekern.bindings.mlp import mlp_node

        x, y = test
        return mlp_node(self.plan, codes.MODE_GRAD, params, x, y, mean_weights((len(x),), params), shared_data=True)

    def test_point_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._closed_form.test_point_grads(params, inputs, targets)

    def curvature_products(
        self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, kind: Curvature
    ) -> torch.Tensor:
        from dicekern.bindings.mlp import mlp_node

        weights = mean_weights(inputs.shape[:2], params)
        return mlp_node(self.plan, CURVATURE_MODES[kind], params, inputs, targets, weights, vectors, coef=1.0 / inputs.shape[1])

    def per_sample_dots(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        from dicekern.bindings.mlp import mlp_node

        return mlp_node(self.plan, codes.MODE_DOTS, params, inputs, targets, mean_weights(inputs.shape[:2], params), vectors)


_VERDICTS: dict[tuple, bool] = {}
SELF_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}  # of each result's scale


def agrees_once(what: str, model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype,
                worst_relative_error: Callable[[], float]) -> bool:
    """Whether ``worst_relative_error()`` of the kernels named ``what`` is within SELF_CHECK_RTOL:
    computed once per kind of check, device, dtype and kernel configuration, then remembered for
    the process. A failure to run counts as disagreement, and either is warned about once."""
    key = (what, str(device), dtype, mlp_plan(model, loss_fn))
    if key not in _VERDICTS:
        try:
            error = worst_relative_error()
            _VERDICTS[key] = error <= SELF_CHECK_RTOL.get(dtype, 1e-2)
            detail = f"relative error {error:.2e}"
        except Exception as failure:  # a kernel that does not even run must not be used either
            _VERDICTS[key] = False
            detail = f"{type(failure).__name__}: {failure}"
        if not _VERDICTS[key]:
            warnings.warn(
                f"dicekern: the Triton {what} for this {type(model).__name__} under {loss_fn.kind} disagree with the closed-form "
                f"backend on {device} in {dtype} ({detail}); backend='auto' does not use them", RuntimeWarning, stacklevel=3,
            )
    return _VERDICTS[key]


def random_data(loss_fn: ClosedFormLoss, plan: MLPPlan, lead: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs (*lead, F) and targets the loss takes, (*lead) or (*lead, K), for self-checks."""
    outputs = plan.widths[-1]
    x = torch.randn(*lead, plan.widths[0], generator=generator, dtype=dtype)
    if loss_fn.kind == "softmax_cross_entropy":
        y = torch.randint(outputs, lead, generator=generator)
    elif loss_fn.kind == "binary_logistic":
        y = torch.rand(*lead, generator=generator, dtype=dtype).round()
    else:
        y = torch.randn(*lead, outputs, generator=generator, dtype=dtype)
    return x.to(device), y.to(device)


def kernels_agree(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the node kernels for this MLP (its layers, activation and loss) agree with the
    closed-form backend on device in dtype, on random params, batches and vectors. No GPU run of
    the kernels is committed yet, so ``backend="auto"`` trusts a configuration only after it has
    passed this on the device at hand."""
    return agrees_once("kernels", model, loss_fn, device, dtype, lambda: _worst_relative_error(model, loss_fn, device, dtype))


def _worst_relative_error(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> float:
    """Every kernel method of the Triton backend against the closed form, on 3 nodes with random
    params, batches of 5, 2 columns and 4 test points."""
    g = torch.Generator().manual_seed(0)
    kernels, closed_form = TritonBackend(model, loss_fn), ClosedFormBackend(model, loss_fn)
    plan = kernels.plan
    n, batch, columns = 3, 5, 2

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    params = random(n, plan.dim) * 0.5 / plan.widths[0] ** 0.5
    x, y = random_data(loss_fn, plan, (n, batch), dtype, device, g)
    vectors, weights = random(n, columns, plan.dim), random(n, batch).abs()
    test = random_data(loss_fn, plan, (4,), dtype, device, g)
    worst = 0.0
    for name, args in [("node_grads", (params, x, y, weights)), ("test_grads", (params, test)),
                       ("curvature_products", (params, x, y, vectors, "exact")), ("curvature_products", (params, x, y, vectors, "ggn")),
                       ("per_sample_dots", (params, x, y, vectors))]:
        expected, actual = getattr(closed_form, name)(*args), getattr(kernels, name)(*args)
        worst = max(worst, relative_error(actual, expected))
    return worst


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual - expected).abs().max() / scale).item()
