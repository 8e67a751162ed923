"""A round's local step at every node: its replay under any optimizer spec, and its linearisation.

Chain vectors are (N, C, S, D): C columns (objectives or sources), S blocks per node state (block
0 is theta, then the optimizer's float state blocks in ``optimizer.state_blocks`` order), D
parameters. The local step x -> O(x, g(theta)) is linearised at the recorded point; its Jacobian
J (the operator ``dicekern.engine.operators.StepJacobian``) includes g's dependence on theta (the
curvature), and for SGD reduces to I - lr H.
"""

from __future__ import annotations

from functools import cached_property

import torch

from dicekern.curvature.protocol import CurvatureBackend
from dicekern.curvature.torch_func import mean_weights
from dicekern.core.optim import OptimizerSpec, State


class LocalStep:
    """Round tau's local step at every node, linearised at the recorded point (theta, state, batch, lr).

    Args:
        backend: the curvature backend (gradients, curvature products, per-sample dots).
        optimizer: the spec of the run.
        params, inputs, targets, lr, state: the round's (N, D), (N, B, ...), (N, B, ...), (N,), state.
        curvature: "exact", "ggn" or "none" (g's dependence on theta left out).
    """

    def __init__(
        self, backend: CurvatureBackend, optimizer: OptimizerSpec, params: torch.Tensor, inputs: torch.Tensor,
        targets: torch.Tensor, lr: torch.Tensor, state: State, curvature: str,
    ):
        self.backend, self.optimizer, self.curvature = backend, optimizer, curvature
        self.params, self.inputs, self.targets, self.lr, self.state = params, inputs, targets, lr, state

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[1]

    @property
    def num_blocks(self) -> int:
        """S: theta plus the optimizer's float state blocks."""
        return 1 + len(self.optimizer.state_blocks)

    @cached_property
    def grads(self) -> torch.Tensor:
        """(N, D) every node's batch-mean gradient at its recorded params."""
        return self.backend.node_grads(self.params, self.inputs, self.targets, mean_weights(self.inputs.shape[:2], self.params))

    def half_step(self) -> torch.Tensor:
        """(N, D) theta^{tau+1/2} (computed on each call: the chain needs it once)."""
        return self.optimizer.update(self.params, self.state, self.grads, self.lr)[0]

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
        return LocalStep(self.backend, self.optimizer, self.params[index], self.inputs[index], self.targets[index],
                         self.lr[index], state, self.curvature)

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, State]:
        """(N, C, S, D) -> theta (N, C, D) and the optimizer's blocks by name, each (N, C, D)."""
        return vectors[:, :, 0], dict(zip(self.optimizer.state_blocks, vectors[:, :, 1:].unbind(2)))

    def join(self, theta: torch.Tensor, blocks: State) -> torch.Tensor:
        """The inverse of ``split``: (N, C, S, D)."""
        if not blocks:
            return theta.unsqueeze(2)
        return torch.stack([theta] + [blocks[name] for name in self.optimizer.state_blocks], dim=2)

    def curvature_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C, D) H_k V[k, c], H_k the curvature of node k's batch-mean loss; zero for curvature
        "none". A fresh tensor.

        Only the nodes with a non-zero column are evaluated: a perturbation that has not reached
        node k yet is exactly zero there, so the cost of a cascade follows the source's reach.
        """
        if self.curvature == "none":
            return torch.zeros_like(vectors)
        active = vectors.flatten(1).ne(0).any(dim=1)
        if active.all():
            return self.backend.curvature_products(self.params, self.inputs, self.targets, vectors, self.curvature)
        products = torch.zeros_like(vectors)
        nodes = active.nonzero().flatten()
        if len(nodes):
            products[nodes] = self.backend.curvature_products(
                self.params[nodes], self.inputs[nodes], self.targets[nodes], vectors[nodes], self.curvature
            )
        return products

    def displacement(self, grads: torch.Tensor) -> torch.Tensor:
        """(dO/dg) G at every node: the state change of gradient changes G (N, C, D), as (N, C, S, D).

        With G = sum_b w_b grad loss_b over removed samples (w_b = 1/B), this is Delta of DICE.md:
        factual minus counterfactual.
        """
        zeros = torch.zeros_like(grads)
        theta, blocks = self.linearization.tangent(zeros, {name: zeros for name in self.optimizer.state_blocks}, grads)
        return self.join(theta, blocks)

    def sample_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """Delta_k(z_b)^T V[k, c] for every sample b of every node k: (N, C, S, D) -> (N, C, B).

        Delta^T V = (1/B) grad loss_b^T (dO/dg)^T V: one JVP of the per-sample losses per column.
        """
        c_theta, c_blocks = self.split(vectors)
        c_grad = self.linearization.cotangent(c_theta, c_blocks)[2]
        return self.backend.per_sample_dots(self.params, self.inputs, self.targets, c_grad) / self.batch_size
