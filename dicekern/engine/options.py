"""The options of a DICE-E query, in one validated dataclass shared by every entry point."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from dicekern.bindings.dispatch import BACKENDS
from dicekern.checks import check_choice, check_q

CURVATURES = ("exact", "ggn", "none")
CURVATURE_AT = ("sender", "receiver")
DIRECT = ("half_step", "paper")


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
            ("paper"; only for an optimizer without state).
        backend: "torch" (reference engine), "triton" (kernels; CPU tensors need
            TRITON_INTERPRET=1), or "auto" (Triton on CUDA where the kernels cover the model,
            torch otherwise).

    Example:
        >>> import dicekern as dk
        >>> dk.DiceOptions.of(None, curvature="ggn").curvature
        'ggn'
    """

    q: torch.Tensor | None = None
    curvature: str = "exact"
    curvature_at: str = "sender"
    direct: str = "half_step"
    backend: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", check_q(self.q))
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("curvature_at", self.curvature_at, CURVATURE_AT)
        check_choice("direct", self.direct, DIRECT)
        check_choice("backend", self.backend, BACKENDS)

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
