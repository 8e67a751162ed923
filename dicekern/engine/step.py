"""A round's local step at every node: its replay under any optimizer spec, and its linearisation.

Chain vectors are (N, C, S, D): C columns (objectives or sources), S blocks per node state (block
0 is theta, then the optimizer's float state blocks in ``optimizer.state_blocks`` order), D
parameters. The local step x -> O(x, g(theta)) is linearised at the recorded point; its Jacobian
J (the operator ``dicekern.engine.operators.StepJacobian``) includes g's dependence on theta (the
curvature), and for SGD reduces to I - lr H.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch

from dicekern.curvature.protocol import CurvatureBackend
from dicekern.curvature.round import Buffers, test_point
from dicekern.curvature.torch_func import mean_weights
from dicekern.core.optim import OptimizerSpec, State

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def in_row_chunks(fn: Callable[..., Outputs], chunk_size: int | None, *rows: torch.Tensor) -> Outputs:
    """fn(*rows) with at most chunk_size rows (the leading axis of every tensor of rows, a node or a
    (hop, node) pair) per call, written into one output: the same numbers, while only one chunk's
    activations (its batches' forward and backward) are alive at once. None: one call."""
    n = len(rows[0])
    if chunk_size is None or chunk_size >= n:
        return fn(*rows)
    out = None
    for start in range(0, n, chunk_size):
        part = fn(*(r[start : start + chunk_size] for r in rows))
        parts = part if isinstance(part, tuple) else (part,)
        if out is None:
            out = tuple(p.new_empty(n, *p.shape[1:]) for p in parts)
        for o, p in zip(out, parts):
            o[start : start + len(p)] = p
    return out if isinstance(part, tuple) else out[0]


class LocalStep:
    """Round tau's local step at every node, linearised at the recorded point (theta, state, batch, lr).

    A BatchNorm model's node state also holds its running statistics beta (D_b,): chain vectors
    are then (N, C, S, D + D_b), block 0 (theta, beta) and the optimizer blocks zero past D. The
    step updates beta <- (1 - m) beta + m statistics(theta, w) (DICE.md, "Models with buffers").

    Args:
        backend: the curvature backend (gradients, curvature products, per-sample dots).
        optimizer: the spec of the run.
        params, inputs, targets, lr, state: the round's (N, D), (N, B, ...), (N, B, ...), (N,), state.
        curvature: "exact", "ggn" or "none" (g's dependence on theta left out).
        buffers: a BatchNorm model's buffers at the start of the round, else None.
        chunk_size: the most nodes whose batch work (gradients, curvature products, per-sample
            dots) runs in one call of the backend; None: every node at once (``DiceOptions``).
    """

    def __init__(
        self, backend: CurvatureBackend, optimizer: OptimizerSpec, params: torch.Tensor, inputs: torch.Tensor,
        targets: torch.Tensor, lr: torch.Tensor, state: State, curvature: str, buffers: Buffers | None = None,
        chunk_size: int | None = None,
    ):
        self.backend, self.optimizer, self.curvature = backend, optimizer, curvature
        self.params, self.inputs, self.targets, self.lr, self.state = params, inputs, targets, lr, state
        self.buffers, self.chunk_size = buffers, chunk_size

    def _per_node(self, fn: Callable[..., Outputs], *rows: torch.Tensor) -> Outputs:
        """fn(params, inputs, targets, *rows) on every node, in chunks of chunk_size nodes."""
        return in_row_chunks(fn, self.chunk_size, self.params, self.inputs, self.targets, *rows)

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[1]

    @property
    def num_blocks(self) -> int:
        """S: theta plus the optimizer's float state blocks."""
        return 1 + len(self.optimizer.state_blocks)

    @property
    def dim(self) -> int:
        """D, or D + D_b for a BatchNorm model: the length of a chain vector's block."""
        return self.params.shape[-1] + (0 if self.buffers is None else self.buffers.running.shape[-1])

    @cached_property
    def _grads_and_statistics(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = mean_weights(self.inputs.shape[:2], self.params)
        if self.buffers is None:
            return self._per_node(self.backend.node_grads, weights), None
        return self._per_node(self.backend.node_grads_and_statistics, weights)

    @property
    def grads(self) -> torch.Tensor:
        """(N, D) every node's batch-mean gradient at its recorded params."""
        return self._grads_and_statistics[0]

    @cached_property
    def _rates(self) -> torch.Tensor:
        """(N, 1, D_b) each running statistic's update rate m in this step, shaped for the columns."""
        return self.backend.buffer_layout.rates(self.buffers.counters).to(self.params.dtype)[:, None]

    def point(self) -> torch.Tensor:
        """(N, D (+ D_b)) where the recorded state's test loss is taken (``test_point``)."""
        return test_point(self.params, self.buffers)

    def half_step(self) -> torch.Tensor:
        """(N, D) theta^{tau+1/2}, or (N, D + D_b) with the running statistics its forward produced
        (computed on each call: the chain needs it once)."""
        half = self.optimizer.update(self.params, self.state, self.grads, self.lr)[0]
        if self.buffers is None:
            return half
        running = self.buffers.running
        return torch.cat([half, running + self._rates[:, 0] * (self._grads_and_statistics[1] - running)], -1)

    @cached_property
    def linearization(self):
        """The optimizer's Jacobian at every node (its tangent and cotangent in (theta, blocks, grad)),
        shaped to broadcast over the C columns."""
        column = lambda t: t[:, None]
        state = {k: column(v) if k in self.optimizer.state_blocks else v for k, v in self.state.items()}
        grads = column(self.grads) if self.optimizer.linearization_reads_grad else None  # SGD's step is linear in g
        return self.optimizer.linearize(column(self.params), state, grads, self.lr)

    def rows(self, index: slice) -> LocalStep:
        """This step restricted to the nodes ``index`` (a slice of rows)."""
        state = {k: v[index] for k, v in self.state.items()}
        buffers = None if self.buffers is None else Buffers(*(b[index] for b in self.buffers))
        return LocalStep(self.backend, self.optimizer, self.params[index], self.inputs[index], self.targets[index],
                         self.lr[index], state, self.curvature, buffers, self.chunk_size)

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """(N, C, S, D (+ D_b)) -> theta (N, C, D), the optimizer's blocks by name, each (N, C, D),
        and the running statistics (N, C, D_b) (None without BatchNorm)."""
        d = self.params.shape[-1]
        beta = None if self.buffers is None else vectors[:, :, 0, d:]
        return vectors[:, :, 0, :d], dict(zip(self.optimizer.state_blocks, vectors[:, :, 1:, :d].unbind(2))), beta

    def join(self, theta: torch.Tensor, blocks: State, beta: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of ``split``: (N, C, S, D (+ D_b))."""
        blocks = [blocks[name] for name in self.optimizer.state_blocks]
        if beta is not None:
            theta = torch.cat([theta, beta], -1)
            blocks = [torch.cat([block, torch.zeros_like(beta)], -1) for block in blocks]
        return torch.stack([theta, *blocks], dim=2)

    def tangent(self, vectors: torch.Tensor) -> torch.Tensor:
        """J V at every node, (N, C, S, D (+ D_b)): the optimizer's tangent with dg = H dtheta, and
        for BatchNorm dbeta' = (1 - m) dbeta + m (d statistics / d theta) dtheta."""
        d_theta, d_blocks, d_beta = self.split(vectors)
        if d_beta is None:
            return self.join(*self.linearization.tangent(d_theta, d_blocks, self.curvature_products(d_theta)))
        widths = (d_theta.shape[-1], d_beta.shape[-1])
        products, d_statistics = self._on_nonzero_columns(self.backend.step_jvp, d_theta, widths=widths)
        theta, blocks = self.linearization.tangent(d_theta, d_blocks, products)
        return self.join(theta, blocks, d_beta - self._rates * (d_beta - d_statistics))

    def cotangent(self, vectors: torch.Tensor) -> torch.Tensor:
        """J^T V at every node: the optimizer's cotangent, H c_g (H is symmetric) and for BatchNorm
        (d statistics / d theta)^T m c_beta on theta, (1 - m) c_beta on beta."""
        c_theta, c_blocks, c_beta = self.split(vectors)
        theta, blocks, c_grad = self.linearization.cotangent(c_theta, c_blocks)
        if c_beta is None:
            return self.join(self.curvature_products(c_grad).add_(theta), blocks)  # the product is a fresh tensor
        scaled = self._rates * c_beta
        both = torch.cat([c_grad, scaled], -1)
        d = self.params.shape[-1]
        pulled = self._on_nonzero_columns(lambda p, x, y, v: (self.backend.step_vjp(p, x, y, v[..., :d], v[..., d:]),), both, widths=(d,))[0]
        return self.join(pulled.add_(theta), blocks, c_beta - scaled)

    def _on_nonzero_columns(self, products: Callable[..., tuple[torch.Tensor, ...]], vectors: torch.Tensor, *,
                        widths: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """products(params, inputs, targets, vectors) (a tuple of (rows, C', ...), linear in the
        vectors (rows, C', D)) on the non-zero columns of vectors (N, C, D) only, zero elsewhere: a
        perturbation that has not reached node k yet is exactly zero there. Nodes with the same
        number of non-zero columns go in one call (chunks of chunk_size nodes) with those columns
        only. When every column is non-zero (the adjoint chain, a cascade that has spread) nothing
        is gathered or scattered. Without any: zero outputs of the last-axis widths (default: one, vectors')."""
        active = vectors.ne(0).any(dim=-1)  # (N, C)
        if active.all():
            return self._per_node(products, vectors)
        results = None
        counts = active.sum(1)
        for count in counts.unique().tolist():
            if count == 0:
                continue
            rows = (counts == count).nonzero().flatten()
            columns = active[rows].nonzero()[:, 1].view(len(rows), count)
            parts = in_row_chunks(products, self.chunk_size, self.params[rows], self.inputs[rows], self.targets[rows],
                                  vectors[rows[:, None], columns])
            if results is None:
                results = tuple(part.new_zeros(*vectors.shape[:2], *part.shape[2:]) for part in parts)
            for result, part in zip(results, parts):
                result[rows[:, None], columns] = part
        if results is None:
            return tuple(vectors.new_zeros(*vectors.shape[:-1], width) for width in widths or vectors.shape[-1:])
        return results

    def curvature_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C, D) H_k V[k, c], H_k the curvature of node k's batch-mean loss; zero for curvature
        "none". A fresh tensor.

        Only the non-zero columns are evaluated: a perturbation that has not reached node k yet is
        exactly zero there, so the cost of a cascade (or of influence_matrix's sources) follows its reach.
        """
        if self.curvature == "none":
            return torch.zeros_like(vectors)
        return self._on_nonzero_columns(lambda p, x, y, v: (self.backend.curvature_products(p, x, y, v, self.curvature),), vectors)[0]

    def displacement(self, grads: torch.Tensor) -> torch.Tensor:
        """(dO/dg) G at every node: the state change of gradient changes G (N, C, D), as (N, C, S, D).

        With G = sum_b w_b grad loss_b over removed samples (w_b = 1/B), this is Delta of DICE.md:
        factual minus counterfactual.
        """
        zeros = torch.zeros_like(grads)
        theta, blocks = self.linearization.tangent(zeros, {name: zeros for name in self.optimizer.state_blocks}, grads)
        return self.join(theta, blocks)

    def removal(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1, S, D (+ D_b)): every node's state change when its loss weights move by weights
        (N, B) from the batch mean, e.g. mask / B for removing the masked samples (None: the whole
        batch): factual minus counterfactual, Delta of DICE.md (with BatchNorm, the batch's
        renormalisation included). The whole batch reuses the step's own gradients."""
        mean = mean_weights(self.inputs.shape[:2], self.params)
        weights = mean if weights is None else weights
        if self.buffers is None:
            whole = torch.equal(weights, mean)
            return self.displacement((self.grads if whole else self._per_node(self.backend.node_grads, weights))[:, None])
        grads, statistics = self._per_node(self.backend.weight_jvp, weights)
        zeros = torch.zeros_like(grads[:, None])
        theta, blocks = self.linearization.tangent(zeros, {name: zeros for name in self.optimizer.state_blocks}, grads[:, None])
        return self.join(theta, blocks, self._rates * statistics[:, None])

    def sample_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """Delta_k(z_b)^T V[k, c] for every sample b of every node k: (N, C, S, D) -> (N, C, B).

        Delta^T V = (1/B) grad loss_b^T (dO/dg)^T V: one JVP of the per-sample losses per column.
        With BatchNorm, removing z renormalises the rest of its batch: the scores are then the
        gradient in the samples' weights of c_g^T g + (m c_beta)^T statistics, one reverse pass.
        """
        c_theta, c_blocks, c_beta = self.split(vectors)
        c_grad = self.linearization.cotangent(c_theta, c_blocks)[2]
        if c_beta is None:
            return self._per_node(self.backend.per_sample_dots, c_grad) / self.batch_size
        return self._per_node(self.backend.weight_vjp, c_grad, self._rates * c_beta) / self.batch_size
