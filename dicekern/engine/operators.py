"""Linear operators on chain vectors, whose adjoints come from the algebra (after curvlinops).

A chain vector is (N, C, S, D): nodes, columns (sources or objectives), state blocks (theta, then
the optimizer's blocks), parameters. An operator acts on every column alike. A leaf says what it
is once and gives both sides of it (``_matvec`` and ``_adjoint_matvec``); a product ``A @ B``
applies B then A, and its adjoint is the reversed product of the factors' adjoints, so no
transposed composition is ever written by hand.

Example:
    >>> import torch
    >>> from dicekern.engine.mixing import TorchMixer
    >>> W = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    >>> mix = Mix(TorchMixer([W]), 0, mix_state=False)
    >>> x, y = torch.randn(3, 2, 1, 4, dtype=torch.float64), torch.randn(3, 2, 1, 4, dtype=torch.float64)
    >>> twice = mix @ mix
    >>> torch.allclose((twice @ x * y).sum(), (x * twice.T(y)).sum())
    True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import overload

import torch

from dicekern.engine.mixing import Mixer
from dicekern.engine.step import LocalStep


class LinearOperator(ABC):
    """A linear map of chain vectors (N, C, S, D) -> (N, C, S, D).

    Subclasses define ``_matvec`` (A V) and ``_adjoint_matvec`` (A^T V). ``A(V)`` and ``A @ V``
    apply A; ``A @ B`` is the product (B first); ``A.T`` (or ``A.adjoint()``) is the transpose.
    """

    @abstractmethod
    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._matvec(vectors)

    @overload
    def __matmul__(self, other: LinearOperator) -> LinearOperator: ...

    @overload
    def __matmul__(self, other: torch.Tensor) -> torch.Tensor: ...

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return Product(self, other)
        if isinstance(other, torch.Tensor):
            return self._matvec(other)
        return NotImplemented

    def adjoint(self) -> LinearOperator:
        """A^T: applies ``_adjoint_matvec``; its own adjoint is A again."""
        return Adjoint(self)

    @property
    def T(self) -> LinearOperator:
        return self.adjoint()


class Adjoint(LinearOperator):
    """A^T of an operator A: A's two sides swapped."""

    def __init__(self, operator: LinearOperator):
        self.operator = operator

    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.operator._adjoint_matvec(vectors)

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.operator._matvec(vectors)

    def adjoint(self) -> LinearOperator:
        return self.operator

    def __repr__(self) -> str:
        return f"{self.operator!r}.T"


class Product(LinearOperator):
    """A_1 A_2 ... A_k: applies A_k first; the adjoint is A_k^T ... A_1^T."""

    def __init__(self, *factors: LinearOperator):
        if not factors:
            raise ValueError("a product needs at least one factor")
        self.factors: tuple[LinearOperator, ...] = tuple(
            f for factor in factors for f in (factor.factors if isinstance(factor, Product) else (factor,))
        )

    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        for factor in reversed(self.factors):
            vectors = factor._matvec(vectors)
        return vectors

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.adjoint()._matvec(vectors)

    def adjoint(self) -> LinearOperator:
        return Product(*(factor.adjoint() for factor in reversed(self.factors)))

    def __repr__(self) -> str:
        return " @ ".join(map(repr, self.factors))


class StepJacobian(LinearOperator):
    """J of a round's local step at every node, linearised at the recorded point (DICE.md, "Any
    optimizer"): J (dtheta, ds) = dO/dx (dtheta, ds) + dO/dg H dtheta, H the node's curvature.

    Both sides come from the optimizer's linearisation (its tangent and cotangent) and the
    curvature, which is symmetric: J^T (ctheta, cs) = (c_x)_theta + H c_g, c_s.
    """

    def __init__(self, step: LocalStep):
        self.step = step

    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        step = self.step
        d_theta, d_blocks = step.split(vectors)
        theta, blocks = step.linearization.tangent(d_theta, d_blocks, step.curvature_products(d_theta))
        return step.join(theta, blocks)

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        step = self.step
        c_theta, c_blocks = step.split(vectors)
        theta, blocks, c_grad = step.linearization.cotangent(c_theta, c_blocks)
        return step.join(step.curvature_products(c_grad).add_(theta), blocks)  # the product is a fresh tensor

    def __repr__(self) -> str:
        return f"StepJacobian({self.step.optimizer}, curvature={self.step.curvature!r})"


class Mix(LinearOperator):
    """One round's W (rows = receivers) on the node axis: of the theta block, or of every block
    when the run gossips the optimizer state (``mix_state``).

    Args:
        mixer: ``mixer(index, vectors (N, C', D), transpose)``: W^{t+index} or its transpose.
        index: the round's index in the chain's window.
        mix_state: whether every block is mixed (else the optimizer blocks stay at their node).
    """

    def __init__(self, mixer: Mixer, index: int, *, mix_state: bool):
        self.mixer, self.index, self.mix_state = mixer, index, mix_state

    def _apply(self, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        n, c, s, d = vectors.shape
        if self.mix_state or s == 1:
            return self.mixer(self.index, vectors.reshape(n, c * s, d), transpose).view(n, c, s, d)
        mixed = vectors.clone()
        mixed[:, :, 0] = self.mixer(self.index, vectors[:, :, 0], transpose)
        return mixed

    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._apply(vectors, transpose=False)

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._apply(vectors, transpose=True)

    def __repr__(self) -> str:
        return f"Mix({self.index}, mix_state={self.mix_state})"
