"""Whole-run attribution (DICE.md, "Whole-run attribution"): sweeps over every round of a plan's
window up to its last round T, for the q-weighted test loss of the final models theta^T.

The reverse sweep injects q g(theta^T) once and carries the adjoint back round by round, through
the same per-round operators as the DICE-E chain (``Chain.hop_operators``: the mix, then the
linearised step at the sender or the receiver), reading every sample's score at every round:

    u^{(T)} = q g(theta^T);   score(z^tau_{j,b}) = <Delta_j(z), ((Mix^tau)^T u^{(tau+1)})_j>;
    u^{(tau)} = (carry^tau)^T u^{(tau+1)}

so entry tau is hop T - tau of DICE-E from round tau. The forward sweep carries the removal of
every node's data from every round to theta^T (columns = sources): at order 1 through the
linearised rounds; at order 2 it also carries the second derivative of the state along the
removal, through each round's own curvature (nested forward-mode derivatives of the plain round,
``dicekern.curvature.round.local_update``), so the final perturbation is right to second order
before Simpson's rule reads the test loss's change along it. Both read one round at a time (newest first for the reverse one), so memory is
the chain vectors plus one round, and a saved run streams from disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
from torch.func import jvp

from dicekern.core import extras
from dicekern.curvature.round import local_update
from dicekern.engine.chain import INFLUENCE_CHUNK_BYTES, as_state
from dicekern.engine.evaluation import scaled_test_grads, segment_grads
from dicekern.engine.operators import LinearOperator, Mix, StepJacobian
from dicekern.engine.plan import QueryPlan
from dicekern.engine.step import LocalStep


class RunSweep:
    """The sweeps of a plan's rounds step..step+hops = T (the window's last round is the final one).

    Args:
        plan: a plan with hops >= 1, first order (``plan_query``; ``dk.final_influence`` makes it).
    """

    def __init__(self, plan: QueryPlan):
        self.plan, self.backend = plan, plan.curvature_backend()
        self.first, self.last = plan.step, plan.step + plan.hops
        self.tests = plan.test_set(self.backend, [self.last])
        self.num_blocks = 1 + len(plan.traj.optimizer.state_blocks)

    def _round(self, tau: int) -> tuple[LocalStep, Mix, LinearOperator]:
        """Round tau's local step, its mix and its carry (what moves a perturbation of the state at
        the start of round tau to the start of round tau + 1)."""
        plan = self.plan
        rnd = plan.traj[tau]
        step = plan.local_step(rnd, self.backend)
        params_dim = None if rnd.buffers is None else rnd.params.shape[-1]
        mix = Mix(plan.mixer([rnd.W]), 0, mix_state=plan.traj.mix_state, mix_buffers=plan.traj.mix_buffers, params_dim=params_dim)
        jacobian = StepJacobian(step)
        return step, mix, (mix @ jacobian if plan.options.curvature_at == "sender" else jacobian @ mix)

    def _rounds(self, *, newest_first: bool, progress: bool) -> Iterable[int]:
        """The rounds first..T-1 a sweep steps through, with a progress bar when asked."""
        order = range(self.last - 1, self.first - 1, -1) if newest_first else range(self.first, self.last)
        return extras.progress(order, enabled=progress, description="rounds", unit="round", total=len(order))

    @cached_property
    def _final_points_and_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """theta^T (rows, D (+ D_b)) and q g(theta^T) there (rows, D (+ D_b)), computed once per sweep."""
        points = self.plan.traj[self.last].point()
        rows = torch.arange(len(points), device=points.device)
        return points, scaled_test_grads(self.tests, self.plan.q, points, torch.zeros_like(rows), rows)[:, 0]

    def final_influence(self, progress: bool = False) -> torch.Tensor:
        """(T - step, rows, B): entry [tau - step, k, b] the first-order effect of removing sample b
        of node k at round tau on sum_k q_k L(theta_k^T; z'): loss with it minus loss without."""
        adjoint = as_state(self._final_points_and_grads[1][:, None], self.num_blocks)  # (rows, 1, S, D)
        scores = None
        for tau in self._rounds(newest_first=True, progress=progress):
            step, mix, carry = self._round(tau)
            row = step.sample_scores(mix.T @ adjoint)[:, 0]  # (rows, B)
            if scores is None:
                scores = row.new_empty(self.last - self.first, *row.shape)
            scores[tau - self.first] = row
            if tau > self.first:
                adjoint = carry.T @ adjoint
        return scores

    def contributions(self, order: int, progress: bool = False) -> torch.Tensor:
        """(N,) the change of sum_k q_k L(theta_k^T; z') when each node's data is removed from every
        round: order 1 the sum of ``final_influence``; order 2 the final loss's change (Simpson's
        rule) along the final perturbation taken to second order (forward sweeps, sources in chunks)."""
        if order == 1:
            return self.final_influence(progress).sum(dim=(0, 2))
        traj = self.plan.traj
        if not self.plan.partition.is_whole:
            raise ValueError("node_contributions(order=2) runs in one process; across processes use order=1")
        n = traj.num_nodes
        chunk = max(1, INFLUENCE_CHUNK_BYTES // (2 * n * self.num_blocks * self._final_points_and_grads[0].shape[-1] * traj.dtype.itemsize))
        totals = []
        for start in range(0, n, chunk):
            sources = torch.arange(start, min(start + chunk, n), device=traj.device)
            perturbation = None
            for tau in self._rounds(newest_first=False, progress=progress):
                perturbation = self.advance(perturbation, tau, sources, order)
            totals.append(self.read(perturbation, order))
        return torch.cat(totals)

    def advance(self, perturbation: torch.Tensor | None, tau: int, sources: torch.Tensor, order: int = 1) -> torch.Tensor:
        """The forward sweep through round tau, for all data of each source (C,) removed from every
        round up to tau; perturbation is the same at the start of round tau (None: zero, tau the first).

        Order 1: delta (N, C, S, D (+ D_b)), the linearised change of every node's state at the start
        of round tau + 1, factual minus counterfactual. Order 2: (2, N, C, S, D), the first and second
        derivatives of the state in the scale u of the sources' loss weights (1 + u) / B at u = 0;
        the removal (u = -1) is then delta = first - second / 2 to second order.
        """
        if order == 2:
            return self._advance_second_order(perturbation, tau, sources)
        step, mix, carry = self._round(tau)
        removal = step.removal()[:, 0]  # (N, S, D): every node's whole batch
        injected = removal.new_zeros(removal.shape[0], len(sources), *removal.shape[1:])
        injected[sources, torch.arange(len(sources), device=sources.device)] = removal[sources]
        return mix @ injected if perturbation is None else (carry @ perturbation).add_(mix @ injected)

    def _advance_second_order(self, derivatives: torch.Tensor | None, tau: int, sources: torch.Tensor) -> torch.Tensor:
        """Order 2 of ``advance``: the plain round of every (node, source) pair the removal has reached,
        differentiated twice along the curve (state + u d1 + u^2/2 d2, weights + u w'), then mixed."""
        traj, plan = self.plan.traj, self.plan
        if traj.objective.buffer_layout:
            raise ValueError(f"order 2 carries the second derivative of every round, which the BatchNorm layers "
                             f"{list(traj.objective.buffer_layout.modules)} do not take: use order=1")
        rnd, optimizer = traj[tau], traj.optimizer
        n, batch = rnd.inputs.shape[:2]
        blocks = optimizer.state_blocks
        if derivatives is None:
            derivatives = rnd.params.new_zeros(2, n, len(sources), self.num_blocks, rnd.params.shape[-1])
        weight_tangent = rnd.params.new_zeros(n, len(sources), batch)
        weight_tangent[sources, torch.arange(len(sources), device=sources.device)] = 1.0 / batch
        k, c = (derivatives.ne(0).flatten(3).any(-1).any(0) | weight_tangent.ne(0).any(-1)).nonzero(as_tuple=True)
        first, second, w_tangent = derivatives[0, k, c], derivatives[1, k, c], weight_tangent[k, c]  # (R, S, D), (R, B)
        params, state = rnd.params[k], {name: value[k] for name, value in rnd.state.items()}
        weights = torch.full_like(w_tangent, 1.0 / batch)

        def round_at(u: torch.Tensor) -> torch.Tensor:  # (R, S, D): the local step of every pair at scale u
            moved = lambda value, i: value + u * first[:, i] + 0.5 * u * u * second[:, i]
            theta = moved(params, 0)
            at = {name: moved(value, 1 + blocks.index(name)) if name in blocks else value for name, value in state.items()}
            update = local_update(traj.objective, optimizer, theta, at, rnd.inputs[k], rnd.targets[k], rnd.lr[k], weights + u * w_tangent)
            return torch.stack([update.half, *(update.state[name] for name in blocks)], dim=1)

        zero, one = params.new_zeros(()), params.new_ones(())
        local_first, local_second = jvp(lambda u: jvp(round_at, (u,), (one,)), (zero,), (one,))[1]
        stepped = derivatives.new_zeros(derivatives.shape)
        stepped[0, k, c], stepped[1, k, c] = local_first, local_second
        mix = Mix(plan.mixer([rnd.W]), 0, mix_state=traj.mix_state)
        return torch.stack([mix @ stepped[0], mix @ stepped[1]])

    def read(self, perturbation: torch.Tensor, order: int) -> torch.Tensor:
        """(C,) the change of sum_k q_k L(theta_k^T; z') of the final perturbations of ``advance`` at
        that order: g^T delta (order 1), or at order 2 the test loss's change along delta = first -
        second / 2 by Simpson's rule (two test gradients per node the perturbation reached). On digits
        under momentum (16 nodes, 24 rounds, 10 seeds; benchmarks/whole_run.md) the trapezoid rule
        there was 0.050-0.188 off leave-node-out replay in relative error, Simpson's 0.021-0.100,
        equal to the exact loss change at delta within 5e-4."""
        points, grads = self._final_points_and_grads
        if order == 1:
            return torch.einsum("kd,kcd->c", grads, perturbation[:, :, 0])
        theta = perturbation[0, :, :, 0] - 0.5 * perturbation[1, :, :, 0]  # (N, C, D)
        k, c = theta.ne(0).any(dim=-1).nonzero(as_tuple=True)
        deltas = theta[k, c]
        along = segment_grads(self.tests, self.plan.q, grads[k], points[k], deltas, torch.zeros_like(k), k, rule="simpson")
        return points.new_zeros(theta.shape[1]).index_add_(0, c, (along * deltas).sum(-1))
