"""The one-launch MLP chains as another implementation of the chain's queries.

Importing this module imports triton: on CPU set ``TRITON_INTERPRET=1`` before that import.
"""

from __future__ import annotations

import torch

from torch import nn

from dicekern.bindings.gossip_mix import ColumnMixer
from dicekern.bindings.mlp import adjoint_chain_per_test, forward_chain
from dicekern.core.losses import ClosedFormLoss
from dicekern.core.optim import SGD
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.curvature.triton import TritonBackend, agrees_once, random_data, relative_error
from dicekern.engine.chain import Chain
from dicekern.engine.evaluation import SharedTestSet
from dicekern.engine.mixing import TorchMixer
from dicekern.engine.options import DiceOptions
from dicekern.engine.step import LocalStep
from dicekern.record.rounds import Round


class FusedMLPChain(Chain):
    """The chain of an MLP the kernels cover, under plain SGD, with the queries the one-launch
    kernels cover (``dice_e(per_test=True)`` and ``influence_matrix``) run as one launch each."""

    def _kernel_flags(self) -> dict:
        return dict(sender=self.options.curvature_at == "sender", curvature=self.options.curvature)

    def adjoint(self, per_hop: bool, per_test: bool = False) -> torch.Tensor:
        if not per_test or per_hop:
            return super().adjoint(per_hop, per_test)
        return adjoint_chain_per_test(
            self.steps[0].backend.plan, self.rounds, self._test_grad_points(), self.tests.kernel_operands(), self.q, **self._kernel_flags()
        )

    def influence_matrix(self) -> torch.Tensor:
        first = self.steps[0]
        scaled_test_grads = self._mean_test_grads()  # (hops+1, N, D)
        displacements = first.displacement(first.grads[:, None])[:, 0, 0]  # (N, D): -lr grad, every whole batch
        points = torch.stack([rnd.params for rnd in self.rounds])
        return forward_chain(first.backend.plan, self.rounds, points, displacements, scaled_test_grads, **self._kernel_flags())


def one_launch_agrees(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the one-launch chains for this MLP agree with the composed chain on the closed-form
    backend, on device in dtype: ``dice_e(per_test=True)`` and ``influence_matrix`` of a random
    3-node, 2-hop window of plain SGD. Checked once per configuration (see ``agrees_once``)."""
    return agrees_once("one-launch chains", model, loss_fn, device, dtype, lambda: _worst_relative_error(model, loss_fn, device, dtype))


def _worst_relative_error(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(1)
    kernels, closed_form = TritonBackend(model, loss_fn), ClosedFormBackend(model, loss_fn)
    n, batch, hops, plan = 3, 5, 2, kernels.plan
    W = (torch.rand(n, n, generator=g, dtype=dtype) + 0.1).to(device)
    W = W / W.sum(1, keepdim=True)
    lr = torch.full((n,), 0.3, dtype=dtype, device=device)
    rounds = [Round(0.5 * torch.randn(n, plan.dim, generator=g, dtype=dtype).to(device) / plan.widths[0] ** 0.5,
                    *random_data(loss_fn, plan, (n, batch), dtype, device, g), lr, W, {}) for _ in range(hops)]
    rounds.append(Round(0.5 * torch.randn(n, plan.dim, generator=g, dtype=dtype).to(device) / plan.widths[0] ** 0.5))
    test, q, options = random_data(loss_fn, plan, (4,), dtype, device, g), torch.full((n,), 1.0 / n, dtype=dtype, device=device), DiceOptions()

    def chain(kind: type[Chain], backend, mixer) -> Chain:
        steps = [LocalStep(backend, SGD(), r.params, r.inputs, r.targets, r.lr, r.state, options.curvature) for r in rounds[:hops]]
        return kind(rounds, steps, mixer([r.W for r in rounds[:hops]]), SharedTestSet(backend, test), q, options, step=0,
                    mix_state=False, nodes=range(n))

    composed, fused = chain(Chain, closed_form, TorchMixer), chain(FusedMLPChain, kernels, ColumnMixer)
    return max(relative_error(fused.adjoint(per_hop=False, per_test=True), composed.adjoint(per_hop=False, per_test=True)),
               relative_error(fused.influence_matrix(), composed.influence_matrix()))
