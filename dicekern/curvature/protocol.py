"""The curvature-backend protocol: what the engine asks of all nodes' models, who can answer, and the choice.

A backend computes, for every node at once, the quantities the chain needs: batch gradients,
per-sample gradients, test gradients, curvature products and per-sample dots. Each declares its
:class:`Capabilities`, and ``unsupported`` says in words why it cannot run a given model, loss,
input shape, device and dtype. ``select.select_backend`` reads only these: a named backend that
cannot run the query raises with that reason; ``"auto"`` takes the fastest one that can and, when
that is the torch.func reference, records why the others could not (``dicekern.curvature.select``).

Shapes: N nodes (rows), D params, B samples per batch, C columns, M test points.
"""

from __future__ import annotations

from collections.abc import Callable
import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from dicekern.core.layout import ParamLayout

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Curvature = Literal["exact", "ggn"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend covers, declared once on its class.

    Attributes:
        name: the ``backend=`` value that names it.
        models: the models it runs, in words (``unsupported`` is the check).
        losses: the losses it runs, in words.
        optimizers: every ``dk.optim`` spec for all three: the engine linearises the optimizer's
            step; a backend supplies only gradients and curvature products.
        dtypes: the float dtypes it computes in.
        devices: the device types it runs on (None: any device torch runs on).
        curvatures: the curvature products it computes.
        one_launch_chains: whether whole chains of plain SGD run as one kernel launch.
        requires: (package, extra) pairs it imports, which ``dicekern[extra]`` installs.
    """

    name: str
    models: str
    losses: str
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...] | None
    curvatures: tuple[str, ...] = ("exact", "ggn")
    optimizers: str = "every dk.optim spec"
    one_launch_chains: bool = False
    requires: tuple[tuple[str, str], ...] = ()

    def missing_packages(self) -> list[tuple[str, str]]:
        """The (package, extra) pairs of ``requires`` that are not installed."""
        return [(package, extra) for package, extra in self.requires if importlib.util.find_spec(package) is None]

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot compute on device in dtype, or None."""
        for package, extra in self.missing_packages():
            return f"{package} is not installed: pip install 'dicekern[{extra}]'"
        if dtype not in self.dtypes:
            return f"backend {self.name!r} computes in {', '.join(str(d) for d in self.dtypes)}, not {dtype}"
        if self.devices is not None and device.type not in self.devices:
            return f"backend {self.name!r} runs on {', '.join(self.devices)} tensors, not {device.type}"
        return None


@runtime_checkable
class CurvatureBackend(Protocol):
    """All nodes' losses of one architecture, as functions of their stacked params (N, D)."""

    capabilities: ClassVar[Capabilities]
    model: nn.Module
    loss_fn: LossFn
    layout: ParamLayout

    @classmethod
    def unsupported(cls, model: nn.Module, loss_fn: LossFn, input_shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> str | None:
        """Why this backend cannot run the model and loss on inputs of input_shape per sample, or None."""

    def node_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(N, D) gradients of sum_b weights[k, b] loss_b at params (N, D); inputs (N, B, ...), weights (N, B)."""

    def per_sample_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, B, D) the gradient of every sample's own loss at its node's params."""

    def test_grads(self, params: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(K, D) gradients of the mean loss of the shared test set at params (K, D)."""

    def test_point_grads(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(K, M, D) each test point's own gradient at params (K, D); inputs (K, M, ...), targets (M, ...)."""

    def curvature_products(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor,
                           kind: Curvature) -> torch.Tensor:
        """(N, C, D) H_k V[k, c], H_k the Hessian ("exact") or Gauss-Newton ("ggn") of node k's batch-mean loss."""

    def per_sample_dots(self, params: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C, B) grad loss_b(params_k)^T V[k, c] for every sample b of every node k."""
