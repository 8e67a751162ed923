"""Whole-run attribution (DICE.md, "Whole-run attribution"): sweeps over every round of a plan's
window up to its last round T, for the q-weighted test loss of the final models theta^T.

The reverse sweep injects q g(theta^T) once and carries the adjoint back round by round, through
the same per-round operators as the DICE-E chain (``Chain.hop_operators``: the mix, then the
linearised step at the sender or the receiver), reading every sample's score at every round:

    u^{(T)} = q g(theta^T);   score(z^tau_{j,b}) = <Delta_j(z), ((Mix^tau)^T u^{(tau+1)})_j>;
    u^{(tau)} = (carry^tau)^T u^{(tau+1)}

so entry tau is hop T - tau of DICE-E from round tau. The forward sweep carries the removal of
every node's data from every round to theta^T (columns = sources), for the second-order
contributions. Both read one round at a time (newest first for the reverse one), so memory is
the chain vectors plus one round, and a saved run streams from disk.
"""

from __future__ import annotations

from collections.abc import Iterator
import torch

from dicekern.core import extras
from dicekern.engine.chain import INFLUENCE_CHUNK_BYTES, as_state
from dicekern.engine.evaluation import scaled_test_grads, trapezoid_grads
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

    def _rounds(self, *, newest_first: bool, progress: bool) -> Iterator[tuple[int, LocalStep, Mix, LinearOperator]]:
        order = range(self.last - 1, self.first - 1, -1) if newest_first else range(self.first, self.last)
        for tau in extras.progress(order, enabled=progress, description="rounds", unit="round", total=len(order)):
            yield (tau, *self._round(tau))

    def _final_points_and_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """theta^T (rows, D (+ D_b)) and q g(theta^T) there (rows, D (+ D_b))."""
        points = self.plan.traj[self.last].point()
        rows = torch.arange(len(points), device=points.device)
        return points, scaled_test_grads(self.tests, self.plan.q, points, torch.zeros_like(rows), rows)[:, 0]

    def final_influence(self, progress: bool = False) -> torch.Tensor:
        """(T - step, rows, B): entry [tau - step, k, b] the first-order effect of removing sample b
        of node k at round tau on sum_k q_k L(theta_k^T; z'): loss with it minus loss without."""
        adjoint = as_state(self._final_points_and_grads()[1][:, None], self.num_blocks)  # (rows, 1, S, D)
        scores = None
        for tau, step, mix, carry in self._rounds(newest_first=True, progress=progress):
            row = step.sample_scores(mix.T @ adjoint)[:, 0]  # (rows, B)
            if scores is None:
                scores = row.new_empty(self.last - self.first, *row.shape)
            scores[tau - self.first] = row
            if tau > self.first:
                adjoint = carry.T @ adjoint
        return scores

    def contributions(self, order: int, progress: bool = False) -> torch.Tensor:
        """(N,) the change of sum_k q_k L(theta_k^T; z') when each node's data is removed from every
        round: order 1 the sum of ``final_influence``, order 2 the trapezoid rule on the linearised
        perturbation of the final models (forward sweeps, sources in chunks)."""
        if order == 1:
            return self.final_influence(progress).sum(dim=(0, 2))
        if not self.plan.partition.is_whole:
            raise ValueError("node_contributions(order=2) runs in one process; across processes use order=1")
        n = self.plan.traj.num_nodes
        chunk = max(1, INFLUENCE_CHUNK_BYTES // (n * self.num_blocks * self.plan.traj[self.last].point().shape[-1] * self.plan.traj.dtype.itemsize))
        totals = []
        for start in range(0, n, chunk):
            sources = torch.arange(start, min(start + chunk, n), device=self.plan.traj.device)
            delta = None
            for tau in extras.progress(range(self.first, self.last), enabled=progress, description="rounds", unit="round"):
                delta = self.advance(delta, tau, sources)
            totals.append(self.read(delta, order))
        return torch.cat(totals)

    def advance(self, delta: torch.Tensor | None, tau: int, sources: torch.Tensor) -> torch.Tensor:
        """The forward sweep through round tau: (N, C, S, D (+ D_b)) the linearised change of every
        node's state at the start of round tau + 1 when all data of each source (C,) is removed from
        every round up to tau, from delta, the same at the start of round tau (None: zero, tau the first)."""
        step, mix, carry = self._round(tau)
        removal = step.removal()[:, 0]  # (N, S, D): every node's whole batch
        injected = removal.new_zeros(removal.shape[0], len(sources), *removal.shape[1:])
        injected[sources, torch.arange(len(sources), device=sources.device)] = removal[sources]
        return mix @ injected if delta is None else (carry @ delta).add_(mix @ injected)

    def read(self, delta: torch.Tensor, order: int) -> torch.Tensor:
        """(C,) the change of sum_k q_k L(theta_k^T; z') of the perturbations delta (N, C, S, D (+ D_b))
        of the final state: g^T delta (order 1) or the trapezoid rule on it (order 2, one test
        gradient per node the perturbation reached)."""
        points, grads = self._final_points_and_grads()
        theta = delta[:, :, 0]  # (N, C, D)
        if order == 1:
            return torch.einsum("kd,kcd->c", grads, theta)
        k, c = theta.ne(0).any(dim=-1).nonzero(as_tuple=True)
        deltas = theta[k, c]
        trapezoid = trapezoid_grads(self.tests, self.plan.q, grads[k], points[k], deltas, torch.zeros_like(k), k)
        return points.new_zeros(theta.shape[1]).index_add_(0, c, (trapezoid * deltas).sum(-1))
