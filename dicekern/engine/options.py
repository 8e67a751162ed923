"""The options of a DICE-E query, in one validated dataclass shared by every entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dicekern.curvature.select import BACKENDS
from dicekern.core.checks import check_choice, check_int, check_q

CURVATURES = ("exact", "ggn", "none")
CURVATURE_AT = ("sender", "receiver")
DIRECT = ("half_step", "paper")
ORDERS = (1, 2)


@dataclass(frozen=True, eq=False)
class DiceOptions:
    """How DICE-E is linearised and run.

    Attributes:
        q: (N,) node weights of the global objective, non-negative and summing to 1; None for 1/N.
        curvature: "exact" Hessian, "ggn" Gauss-Newton, or "none" (the gradient's dependence on
            theta left out: I - lr H becomes I for SGD).
        curvature_at: "sender" (DICE.md, Appendix C.3) or "receiver" (Theorem 2 as printed; only
            for an optimizer without state).
        direct: test gradient of the hop-0 term at theta^{t+1/2} ("half_step") or at theta^t
            ("paper"; only for an optimizer without state; order 1 only).
        order: 1 takes each hop's test-loss change as g^T delta at the factual point; 2 takes it
            by the trapezoid rule between the factual and the counterfactual point, exact for a
            quadratic test loss: 1/2 (g(theta) + g(theta - delta))^T delta for a node's whole batch
            (cascade, influence_matrix; one more test gradient per reached node and hop), and
            g^T Delta - 1/2 Delta^T H_test Delta for each sample's hop-0 term in dice_e (one
            test-curvature product per sample; later hops of a sample stay first order).
        backend: "torch" (the torch.func reference engine), "closed_form" (batched matmuls, MLPs
            under dk.losses), "triton" (kernels; CPU tensors need TRITON_INTERPRET=1), or "auto"
            (Triton on CUDA where the kernels cover the model, else the closed form where it
            covers it, else torch).
        chunk_size: the most nodes (or hop-node pairs) whose batch work runs in one vectorised
            call: gradients, curvature products, per-sample dots and test gradients. Peak memory
            is then the chain's vectors plus one chunk's activations; None (the default) runs
            every node at once, the fastest (benchmarks/README.md, "Zoo"). Results are the same.

    Example:
        >>> import dicekern as dk
        >>> dk.DiceOptions.of(None, curvature="ggn").curvature
        'ggn'
    """

    q: torch.Tensor | None = None
    curvature: str = "exact"
    curvature_at: str = "sender"
    direct: str = "half_step"
    order: int = 1
    backend: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", check_q(self.q))
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("curvature_at", self.curvature_at, CURVATURE_AT)
        check_choice("direct", self.direct, DIRECT)
        if isinstance(self.order, bool) or self.order not in ORDERS:
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        if self.order == 2 and self.direct != "half_step":
            raise ValueError("direct='paper' picks the one point of a first-order hop-0 term; order=2 uses both ends: use direct='half_step'")
        check_choice("backend", self.backend, BACKENDS)
        if self.chunk_size is not None:
            object.__setattr__(self, "chunk_size", check_int("chunk_size", self.chunk_size, minimum=1))

    @classmethod
    def of(cls, options: DiceOptions | None = None, **overrides) -> DiceOptions:
        """options (default: all defaults) with any fields given as keywords replaced."""
        if options is not None and not isinstance(options, DiceOptions):
            raise TypeError(f"options must be a dk.DiceOptions, got {type(options).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}: the options are {sorted(names)}")
        return replace(options or cls(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values (q as a list of floats, or None), for results and saved ledgers.

        Example:
            >>> import dicekern as dk
            >>> dk.DiceOptions.from_dict(dk.DiceOptions(order=2).to_dict()).order
            2
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["q"] = None if self.q is None else self.q.double().tolist()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DiceOptions:
        """The options ``to_dict`` wrote; a field missing takes its default, an unknown one raises."""
        if not isinstance(values, Mapping):
            raise TypeError(f"options must be a mapping of option names to values, got {type(values).__name__}")
        values = dict(values)
        if values.get("q") is not None:
            values["q"] = torch.tensor(values["q"], dtype=torch.float64)
        return cls.of(None, **values)
