"""The DICE-E chain: a composition of per-round local steps J, mixers and a test objective.

Notation of DICE.md. A hop s >= 2 moves a perturbation of every node's state (N, C, S, D) through
round t+s-1: J (the linearised local step, at the sender) then the mix with W^{t+s-1} (theta
block; every block with mix_state). Each hop is a linear operator (``dicekern.engine.operators``)
built once per round; the forward ("cascade") direction applies it with sources as columns, the
adjoint direction applies its transpose (derived by the operator algebra) with objectives as
columns and scores every sample at once. Scores read only the theta block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from dicekern.engine.evaluation import PerNodeTestSet, SharedTestSet, scaled_test_grads, segment_grads
from dicekern.engine.mixing import Mixer
from dicekern.engine.operators import LinearOperator, Mix, StepJacobian
from dicekern.engine.options import DiceOptions
from dicekern.engine.step import LocalStep
from dicekern.record.rounds import Round

BATCHED_TEST_GRADS_MAX_ELEMENTS = 1 << 20  # (hops+1) N O D below this: every hop's test gradients in one call
INFLUENCE_CHUNK_BYTES = 16 << 20  # chain vectors of one chunk of sources in influence_matrix


def as_state(theta: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(N, C, D) theta vectors as (N, C, S, D) state vectors with zero optimizer blocks."""
    if num_blocks == 1:
        return theta.unsqueeze(2)
    state = theta.new_zeros(*theta.shape[:2], num_blocks, theta.shape[-1])
    state[:, :, 0] = theta
    return state


class Chain:
    """DICE-E over rounds step..step+hops of a run, for one test objective.

    Args:
        rounds: the rounds step..step+hops (``Trajectory.window``); step is the scored round.
        steps: the local steps of rounds step..step+max(hops, 1)-1.
        mixer: W^{step+i} (or its transpose) on the node axis of (rows, C, D) vectors.
        tests: the test objective.
        q: (rows,) node weights of the rows this chain holds.
        options: the linearisation (curvature_at, direct).
        mix_state: whether the optimizer state is gossiped with theta.
        mix_buffers: whether a BatchNorm model's running statistics are gossiped with theta.
        nodes: the global node indices of the rows (a block, across processes).
        test_grad_cache: step -> (rows, D) q-scaled mean test gradients at theta^{step}, read and
            filled by this chain (for windows that share rounds; one q and test set per cache).
    """

    def __init__(
        self, rounds: Sequence[Round], steps: Sequence[LocalStep], mixer: Mixer, tests: SharedTestSet | PerNodeTestSet,
        q: torch.Tensor, options: DiceOptions, *, step: int, mix_state: bool, nodes: range, mix_buffers: bool = False,
        test_grad_cache: dict[int, torch.Tensor] | None = None,
    ):
        self.rounds, self.steps, self.mixer, self.tests, self.q = tuple(rounds), tuple(steps), mixer, tests, q
        self.options, self.mix_state, self.nodes, self.step = options, mix_state, nodes, step
        self.mix_buffers = mix_buffers
        self.hops = len(self.rounds) - 1
        self._test_grad_cache = test_grad_cache

    @property
    def batch_size(self) -> int:
        return self.steps[0].batch_size

    @property
    def num_blocks(self) -> int:
        return self.steps[0].num_blocks

    # ---- the parts of a hop ----

    @cached_property
    def hop_operators(self) -> tuple[LinearOperator, ...]:
        """One operator per round of the window, on (N, C, S, D): delta^{(s)} = hop_operators[s-1] delta^{(s-1)}.

        Round t carries Delta to its receivers by the mix alone; round t+i (i >= 1) is Mix_i @ J_i
        (the sender's curvature) or J_i @ Mix_i (the receiver's). The adjoint chain applies their ``.T``.
        """
        params_dim = None if self.steps[0].buffers is None else self.rounds[0].params.shape[-1]
        mix = [Mix(self.mixer, i, mix_state=self.mix_state, mix_buffers=self.mix_buffers, params_dim=params_dim) for i in range(len(self.steps))]
        jacobians = [StepJacobian(step) for step in self.steps[1:]]
        sender = self.options.curvature_at == "sender"
        return (mix[0], *(m @ J if sender else J @ m for m, J in zip(mix[1:], jacobians)))

    # ---- test gradients ----

    def _direct_points(self, first: LocalStep | None = None) -> torch.Tensor:
        """(rows, D) where the hop-0 test gradient is taken: theta^{t+1/2} ("half_step") or theta^t
        ("paper"), at every node or at those of ``first`` (round t's step restricted to some rows)."""
        first = first or self.steps[0]
        return first.half_step() if self.options.direct == "half_step" else first.point()

    def _test_grad_points(self) -> torch.Tensor:
        """(hops+1, N, D): where the test gradients are taken; [0] the direct points, [s] theta^{t+s}."""
        return torch.stack([self._direct_points()] + [rnd.point() for rnd in self.rounds[1:]])

    def _scaled_test_grads_at(self, hops: list[int], per_test: bool) -> dict[int, torch.Tensor]:
        """hop s -> (N, O, D) q_k g^{(s)}_k at every node, for the given hops in one batched call;
        O = M test points or 1 (their mean).

        With a cache (the mean of a shared test set only), hops s >= 1 whose round is cached are
        reused and the others stored; hop 0 is the window's own half step and is always computed.
        """
        n = self.rounds[0].params.shape[0]
        cache = self._test_grad_cache if not per_test and self.tests.cacheable else None
        needed = [s for s in hops if cache is None or s == 0 or self.step + s not in cache]
        result = {s: cache[self.step + s][:, None] for s in hops if s not in needed}
        if needed:
            points = [self._direct_points() if s == 0 else self.rounds[s].point() for s in needed]
            flat = points[0] if len(points) == 1 else torch.cat(points)
            hop_of = torch.tensor(needed, device=flat.device).repeat_interleave(n)
            nodes = torch.arange(n, device=flat.device).repeat(len(needed))
            computed = dict(zip(needed, scaled_test_grads(self.tests, self.q, flat, hop_of, nodes, per_test).unflatten(0, (len(needed), n))))
            if cache is not None:
                cache.update({self.step + s: grads[:, 0] for s, grads in computed.items() if s > 0})
            result.update(computed)
        return result

    def _mean_test_grads(self) -> torch.Tensor:
        """(hops+1, N, D): q_k g^{(s)}_k of the mean test loss at every hop."""
        grads = self._scaled_test_grads_at(list(range(self.hops + 1)), per_test=False)
        return torch.stack([grads[s][:, 0] for s in range(self.hops + 1)])

    def _test_grad_source(self, per_test: bool) -> Callable[[int], torch.Tensor]:
        """hop s -> q g^{(s)} (N, O, D): all hops in one batched call while they are small (fewer,
        larger calls are faster) and no chunk_size bounds the memory, one hop at a time otherwise
        (the adjoint then holds one hop's)."""
        n, dim = self.rounds[0].point().shape
        objectives = self.tests.points if per_test else 1
        if self.options.chunk_size is None and (self.hops + 1) * n * objectives * dim <= BATCHED_TEST_GRADS_MAX_ELEMENTS:
            return self._scaled_test_grads_at(list(range(self.hops + 1)), per_test).__getitem__
        return lambda s: self._scaled_test_grads_at([s], per_test)[s]

    def _hop_scores(self, hop: int, points: torch.Tensor, grads: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(C, N) e[s, k] of C perturbations delta (N, C, D) at hop s, given q g^{(s)} (N, D) at the
        factual points (N, D); at order 2 only the pairs a perturbation has reached are evaluated."""
        if self.options.order == 1:
            return torch.einsum("kd,kcd->ck", grads, delta)
        k, c = delta.ne(0).any(dim=-1).nonzero(as_tuple=True)
        deltas = delta[k, c]
        trapezoid = segment_grads(self.tests, self.q, grads[k], points[k], deltas, torch.full_like(k, hop), k)
        scores = delta.new_zeros(delta.shape[1], delta.shape[0])
        scores[c, k] = (trapezoid * deltas).sum(-1)
        return scores

    def _sample_test_curvature(self) -> torch.Tensor:
        """(N, B) -1/2 q_j Delta_j(z)^T H_test Delta_j(z) of every sample, at the hop-0 points: the
        second-order part of each sample's hop-0 term. Per-sample gradients go in chunks of samples
        of at most INFLUENCE_CHUNK_BYTES."""
        first = self.steps[0]
        n, dim = first.params.shape
        points, kind = self._direct_points(), "ggn" if self.options.curvature == "ggn" else "exact"
        chunk = max(1, INFLUENCE_CHUNK_BYTES // (n * dim * first.params.element_size()))
        terms = []
        for start in range(0, self.batch_size, chunk):
            samples = slice(start, start + chunk)
            grads = first.backend.per_sample_grads(first.params, first.inputs[:, samples], first.targets[:, samples])
            deltas = first.displacement(grads / self.batch_size)[:, :, 0]  # (N, chunk, D)
            products = self.tests.direct_curvature(points, deltas, kind)
            terms.append((deltas * products).sum(-1))
        return torch.cat(terms, dim=1).mul_(-0.5 * self.q[:, None])

    # ---- the three queries ----

    def cascade(self, source: int, sample_mask: torch.Tensor) -> torch.Tensor:
        """(hops+1, rows) e[s, k] for the samples of global node ``source`` where sample_mask (B,) is 1.

        Test gradients and curvature products are taken only where the perturbation has
        arrived, so the cost follows the reach of the source, not N. Only the rows that own
        ``source`` compute its displacement; the first mix carries it to its receivers.
        """
        first = self.steps[0]
        n, dim = first.params.shape[0], first.dim
        device = first.params.device
        delta = first.params.new_zeros(n, 1, self.num_blocks, dim)
        reached = [torch.zeros(0, dtype=torch.long, device=device)]
        points = [first.params.new_zeros(0, dim)]
        owned = source in self.nodes
        if owned:
            j = self.nodes.index(source)
            at_source = first.rows(slice(j, j + 1))  # round t's step of the source alone
            delta[j] = at_source.removal((sample_mask / self.batch_size)[None])[0]  # delta^{(0)}: Delta_j(z) at row j
            reached[0] = torch.tensor([j], device=device)
            points[0] = self._direct_points(at_source)
        deltas = [delta[reached[0], 0, 0]]
        for s in range(1, self.hops + 1):
            delta = self.hop_operators[s - 1] @ delta
            reached.append(delta.flatten(1).ne(0).any(dim=1).nonzero().flatten())
            points.append(self.rounds[s].point()[reached[-1]])
            deltas.append(delta[reached[-1], 0, 0])
        hop_of = torch.cat([torch.full_like(k, s) for s, k in enumerate(reached)])
        nodes, points, deltas = torch.cat(reached), torch.cat(points), torch.cat(deltas)
        grads = scaled_test_grads(self.tests, self.q, points, hop_of, nodes)[:, 0]
        if self.options.order == 2:
            grads = segment_grads(self.tests, self.q, grads, points, deltas, hop_of, nodes)
        scores = first.params.new_zeros(self.hops + 1, n)
        scores[hop_of, nodes] = (grads * deltas).sum(-1)
        return scores

    def adjoint(self, per_hop: bool, per_test: bool = False) -> torch.Tensor:
        """Scores of every sample of every node: (N, B), with per_hop a leading (hops+1,) axis,
        with per_test an (M,) axis before N (one objective per test point).

        lambda^{(r)} = q g^{(r)}, lambda^{(s)} = q g^{(s)} + hop_s^T lambda^{(s+1)} (theta
        blocks), and a sample's score is Delta_j(z)^T (q_j g_j^{(0)} + ((W^t)^T lambda^{(1)})_j).
        Each objective is a column; with per_hop each hop's term travels in its own block of columns.
        At order 2 each sample's hop-0 term gains -1/2 q_j Delta^T H_test Delta (the mean test loss only).
        """
        if per_test and self.options.order == 2:
            raise ValueError("order=2 corrects each sample's hop-0 term for the curvature of the mean test loss; per_test=True is first order only")
        scaled_test_grads = self._test_grad_source(per_test)  # hop s -> (N, O, D)
        lam = None  # (N, C, S, D): blocks of O columns for hops r, r-1, ... when per_hop
        for s in range(self.hops, 0, -1):
            injected = as_state(scaled_test_grads(s), self.num_blocks)
            if lam is None:
                lam = injected
            else:
                lam = self.hop_operators[s].T @ lam
                lam = torch.cat([lam, injected], dim=1) if per_hop else lam.add_(injected)  # lam is the hop's fresh output
        direct = as_state(scaled_test_grads(0), self.num_blocks)
        objectives = direct.shape[1]
        if lam is None:
            vectors = direct
        else:
            to_sources, lam = self.hop_operators[0].T @ lam, None
            if per_hop:  # hop blocks r..1 -> 1..r
                to_sources = to_sources.unflatten(1, (self.hops, objectives)).flip(1).flatten(1, 2)
                vectors = torch.cat([direct, to_sources], dim=1)
            else:
                vectors = to_sources.add_(direct)
        scores = self.steps[0].sample_scores(vectors)  # Delta_j(z_b)^T v, (N, C, B)
        scores = scores.unflatten(1, (-1, objectives)).permute(1, 2, 0, 3)  # (hop blocks, O, N, B)
        if self.options.order == 2:
            scores[0].add_(self._sample_test_curvature())
        scores = scores if per_hop else scores[0]
        return scores if per_test else scores.select(-3, 0)

    def influence_matrix(self) -> torch.Tensor:
        """(hops+1, N_source, N_receiver): e[s, j, k] of every source's whole batch, in forward chains
        whose columns are sources: delta^{(0)}[k, j] = Delta_j where k = j, else 0.

        Sources go in chunks of at most INFLUENCE_CHUNK_BYTES of chain vectors (at least one
        source), so memory stays bounded by the test gradients, not by N x N x D.
        """
        first = self.steps[0]
        n = first.params.shape[0]
        scaled_test_grads = self._mean_test_grads()  # (hops+1, N, D)
        points = self._test_grad_points()  # (hops+1, N, D)
        displacements = first.removal()[:, 0]  # (N, S, D): every node's whole batch
        scores = first.params.new_zeros(self.hops + 1, n, n)
        chunk = max(1, INFLUENCE_CHUNK_BYTES // (displacements.numel() * displacements.element_size()))
        for start in range(0, n, chunk):
            sources = torch.arange(start, min(start + chunk, n), device=displacements.device)
            delta = first.params.new_zeros(n, len(sources), *displacements.shape[1:])
            delta[sources, torch.arange(len(sources))] = displacements[sources]
            for s in range(self.hops + 1):
                if s:
                    delta = self.hop_operators[s - 1] @ delta
                scores[s, sources] = self._hop_scores(s, points[s], scaled_test_grads[s], delta[:, :, 0])
        return scores
