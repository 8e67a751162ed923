"""The one-launch MLP chains as another implementation of the chain's queries.

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch

from dicekern.bindings.mlp import adjoint_chain_per_test, forward_chain
from dicekern.engine.chain import Chain


class FusedMLPChain(Chain):
    """The chain of an MLP the kernels cover, under plain SGD, with the queries the one-launch
    kernels cover (``dice_e(per_test=True)`` and ``influence_matrix``) run as one launch each."""

    def _kernel_flags(self) -> dict:
        return dict(sender=self.options.curvature_at == "sender", curvature=self.options.curvature)

    def adjoint(self, per_hop: bool, per_test: bool = False) -> torch.Tensor:
        if not per_test or per_hop:
            return super().adjoint(per_hop, per_test)
        return adjoint_chain_per_test(
            self.steps[0].objective.plan, self.rounds, self._test_grad_points(), self.tests.kernel_operands(), self.q, **self._kernel_flags()
        )

    def influence_matrix(self) -> torch.Tensor:
        first = self.steps[0]
        scaled_test_grads = self._mean_test_grads()  # (hops+1, N, D)
        displacements = first.displacement(first.grads[:, None])[:, 0, 0]  # (N, D): -lr grad, every whole batch
        points = torch.stack([rnd.params for rnd in self.rounds])
        return forward_chain(first.objective.plan, self.rounds, points, displacements, scaled_test_grads, **self._kernel_flags())
