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
        return self.step.tangent(vectors)

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.step.cotangent(vectors)

    def __repr__(self) -> str:
        return f"StepJacobian({self.step.optimizer}, curvature={self.step.curvature!r})"


class Mix(LinearOperator):
    """One round's W (rows = receivers) on the node axis: of theta, of the optimizer blocks when
    the run gossips the optimizer state (``mix_state``), and of a BatchNorm model's running
    statistics (the columns from ``params_dim`` on in block 0) when it gossips them (``mix_buffers``).

    Args:
        mixer: ``mixer(index, vectors (N, C', D), transpose)``: W^{t+index} or its transpose.
        index: the round's index in the chain's window.
        mix_state: whether the optimizer blocks are mixed (else they stay at their node).
        mix_buffers: whether the running statistics are mixed (else they stay at their node).
        params_dim: D, where block 0's running statistics begin (None: the block is theta alone).
    """

    def __init__(self, mixer: Mixer, index: int, *, mix_state: bool, mix_buffers: bool = False, params_dim: int | None = None):
        self.mixer, self.index, self.mix_state = mixer, index, mix_state
        self.mix_buffers, self.params_dim = mix_buffers, params_dim

    def _apply(self, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        n, c, s, d = vectors.shape
        whole = self.params_dim is None or self.mix_buffers  # block 0 mixes whole
        if whole and (self.mix_state or s == 1):
            return self.mixer(self.index, vectors.reshape(n, c * s, d), transpose).view(n, c, s, d)
        mixed = vectors.clone()
        theta = slice(None) if whole else slice(0, self.params_dim)
        mixed[:, :, 0, theta] = self.mixer(self.index, vectors[:, :, 0, theta].contiguous(), transpose)
        if self.mix_state and s > 1:
            blocks = vectors[:, :, 1:, : self.params_dim or d]  # past D the optimizer blocks are zero
            mixed[:, :, 1:, : self.params_dim or d] = self.mixer(self.index, blocks.reshape(n, c * (s - 1), -1), transpose).view(blocks.shape)
        return mixed

    def _matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._apply(vectors, transpose=False)

    def _adjoint_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._apply(vectors, transpose=True)

    def __repr__(self) -> str:
        return f"Mix({self.index}, mix_state={self.mix_state})"
