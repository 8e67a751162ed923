"""The torch reference engine: the linearised DICE recursion as one chain over the whole network.

Notation of DICE.md. A hop s >= 2 moves a perturbation (N, C, D) through round t+s-1:
mix with W^{t+s-1} and damp with (I - eta H_i) at the sender i (or at the receiver). The forward
("cascade") direction follows one source; the adjoint direction carries every source at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dicekern.checks import check_choice, check_node_weights, check_test
from dicekern.restrict import PerNodeTest
from dicekern.objective import Curvature, mean_weights
from dicekern.trajectory import Round, Trajectory

Mixer = Callable[[int, torch.Tensor, bool], torch.Tensor]  # (round index, (rows, C, D), transpose) -> (rows, C, D)
CURVATURES = ("exact", "ggn", "none")
CURVATURE_AT = ("sender", "receiver")
DIRECT = ("half_step", "paper")


@dataclass(frozen=True)
class ChainOptions:
    """How the chain is linearised.

    Attributes:
        curvature: "exact" Hessian, "ggn" Gauss-Newton, or "none" (drop I - eta H).
        curvature_at: "sender" (DICE.md, Appendix C.3) or "receiver" (Theorem 2 as printed).
        direct: test gradient of the hop-0 term at theta^{t+1/2} ("half_step") or theta^t ("paper").
    """

    curvature: Curvature = "exact"
    curvature_at: str = "sender"
    direct: str = "half_step"

    def __post_init__(self) -> None:
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("curvature_at", self.curvature_at, CURVATURE_AT)
        check_choice("direct", self.direct, DIRECT)


class Chain:
    """DICE-E over rounds step..step+hops of a trajectory, for one test objective.

    Args:
        traj: the recorded run.
        step: the round t whose samples are scored.
        test: (inputs (M, ...), targets (M, ...)); the objective is their mean loss.
        hops: r >= 0.
        q: (N,) node weights, None for 1/N.
        options: the linearisation.
        backend: "torch", or "triton": Triton mixing for every model, and the closed-form
            linear-head kernel for a single nn.Linear under a ``dicekern.losses`` loss.
        test_grad_cache: step -> (N, D) q-scaled mean test gradients at theta^{step}, read and
            filled by this chain (for windows that share rounds; one q and test per cache).
        mixer: how W^{t+i} or its transpose acts on the node axis of (rows, C, D) vectors; the
            default multiplies by W. ``dicekern.distributed`` passes one that exchanges rows.
        nodes: the global node indices of the trajectory's rows (a block, across processes).
    """

    def __init__(
        self,
        traj: Trajectory,
        step: int,
        test: object,
        hops: int,
        q: object,
        options: ChainOptions,
        backend: str = "torch",
        test_grad_cache: dict[int, torch.Tensor] | None = None,
        mixer: Mixer | None = None,
        nodes: range | None = None,
    ):
        self.rounds: tuple[Round, ...] = traj.window(step, hops)
        self.step = step
        self.hops = hops
        self._test_grad_cache = test_grad_cache
        self.objective = traj.objective
        self.options = options
        first = self.rounds[0]
        self.nodes = range(traj.num_nodes) if nodes is None else nodes
        self.q = check_node_weights(q, traj.num_nodes, first.params)
        # a PerNodeTest (last-layer mode) has features per round and node; anything else is one shared test set
        self.test = test if isinstance(test, PerNodeTest) else check_test(test, first.params)
        self._test_rows = self.test.rows([step + s for s in range(hops + 1)], first.params) if isinstance(test, PerNodeTest) else None
        self._mixer = mixer
        self._one_launch = None  # the linear-head chain kernels, when they apply
        if backend == "triton":
            # imported only here: triton must not load before the user can choose its interpreter
            from dicekern.bindings import is_linear_head, linear_head
            from dicekern.bindings.gossip_mix import ColumnMixer

            self._mixer = ColumnMixer([rnd.W for rnd in self.rounds])
            if is_linear_head(self.objective.model, self.objective.loss_fn):
                self.objective = linear_head.LinearHeadObjective(self.objective.model, self.objective.loss_fn)
                self._one_launch = linear_head

    @property
    def batch_size(self) -> int:
        return self.rounds[0].inputs.shape[1]

    def _scaled_test_grads(self, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor, per_test: bool = False) -> torch.Tensor:
        """(R, O, D) q_k grad L(theta; z') at points (R, D) of (hop, node) pairs (R,) each.

        O = 1 for the mean test loss, or M with per_test (one column per test point).
        """
        if self._test_rows is None:
            x, y = self.test
            if per_test:
                grads = self.objective.test_point_grads(points, x.expand(len(points), *x.shape), y)
            else:
                grads = self.objective.test_grads(points, self.test)[:, None]
        else:
            x, y = self._test_rows[hops, nodes], self.test.targets
            if per_test:
                grads = self.objective.test_point_grads(points, x, y)
            else:
                grads = self.objective.node_grads(points, x, y.expand(len(points), *y.shape), mean_weights(x.shape[:2], points))[:, None]
        return self.q[nodes, None, None] * grads

    def _damp(self, index: int, vectors: torch.Tensor) -> torch.Tensor:
        rnd = self.rounds[index]
        return self.objective.damped_curvature(
            rnd.params, rnd.inputs, rnd.targets, rnd.lr, vectors, self.options.curvature
        )

    def _mix(self, index: int, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        """W^{t+index} (or its transpose) applied to the node axis of vectors (N, C, D)."""
        if self._mixer is not None:
            return self._mixer(index, vectors, transpose)
        W = self.rounds[index].W
        return torch.einsum("ki,icd->kcd", W.T if transpose else W, vectors)

    def _forward_hop(self, index: int, vectors: torch.Tensor) -> torch.Tensor:
        """delta^{(s)} from delta^{(s-1)} (N, C, D) through round t+index, index = s-1 >= 1."""
        mix = lambda v: self._mix(index, v, transpose=False)
        if self.options.curvature_at == "sender":
            return mix(self._damp(index, vectors))
        return self._damp(index, mix(vectors))

    def _adjoint_hop(self, index: int, vectors: torch.Tensor) -> torch.Tensor:
        """The transpose of _forward_hop: (N, C, D) -> (N, C, D)."""
        mix_t = lambda v: self._mix(index, v, transpose=True)
        if self.options.curvature_at == "sender":
            return self._damp(index, mix_t(vectors))
        return mix_t(self._damp(index, vectors))

    def cascade(self, source: int, sample_mask: torch.Tensor) -> torch.Tensor:
        """(hops+1, rows) e[s, k] for the samples of global node ``source`` where sample_mask (B,) is 1.

        Test gradients and curvature products are taken only where the perturbation has
        arrived, so the cost follows the reach of the source, not N. Only the rows that own
        ``source`` compute its displacement; the first mix carries it to its receivers.
        """
        first, n = self.rounds[0], self.rounds[0].params.shape[0]
        dim = first.params.shape[1]
        owned = source in self.nodes
        delta = first.params.new_zeros(n, 1, dim)  # delta^{(0)} = e_source Delta
        reached = [torch.zeros(0, dtype=torch.long, device=first.params.device)]
        points = [first.params.new_zeros(0, dim)]
        if owned:
            j = self.nodes.index(source)
            weights = torch.stack([sample_mask, torch.ones_like(sample_mask)]) / self.batch_size
            grads = self.objective.node_grads(
                first.params[j].expand(2, -1), first.inputs[j].expand(2, *first.inputs.shape[1:]),
                first.targets[j].expand(2, *first.targets.shape[1:]), weights,
            )
            displacement = -first.lr * grads[0]  # Delta_j(z), (D,)
            delta[j, 0] = displacement
            reached[0] = torch.tensor([j], device=first.params.device)
            points[0] = (first.params[j] - first.lr * grads[1] if self.options.direct == "half_step" else first.params[j])[None]
        deltas = []
        for s in range(1, self.hops + 1):
            delta = self._mix(0, delta, transpose=False) if s == 1 else self._forward_hop(s - 1, delta)
            deltas.append(delta)
            reached.append(delta[:, 0].ne(0).any(dim=1).nonzero().flatten())
            points.append(self.rounds[s].params[reached[-1]])
        hop_of = torch.cat([torch.full_like(k, s) for s, k in enumerate(reached)])
        grads = self._scaled_test_grads(torch.cat(points), hop_of, torch.cat(reached))[:, 0].split([len(k) for k in reached])

        scores = first.params.new_zeros(self.hops + 1, n)
        if owned:
            scores[0, j] = grads[0][0] @ displacement
        for s in range(1, self.hops + 1):
            k = reached[s]
            scores[s, k] = (grads[s] * deltas[s - 1][k, 0]).sum(-1)
        return scores

    def _test_grad_points(self) -> torch.Tensor:
        """(hops+1, N, D): where the test gradients are taken; [0] theta^{t+1/2} or theta^t, [s] theta^{t+s}."""
        first = self.rounds[0]
        direct_points = first.params
        if self.options.direct == "half_step":
            direct_points = self.objective.local_step(first.params, first.inputs, first.targets, first.lr)
        return torch.stack([direct_points] + [rnd.params for rnd in self.rounds[1:]])

    def _kernel_flags(self) -> dict:
        return dict(sender=self.options.curvature_at == "sender", curvature=self.options.curvature != "none")

    def _scaled_test_grads_all(self, per_test: bool) -> torch.Tensor:
        """(hops+1, N, O, D): q_k g^{(s)}_k at every node and hop; O = M test points or 1 (their mean).

        With a cache (mean of a shared test set only), hops s >= 1 whose round is cached are reused
        and the others stored; hop 0 is the window's own half step and is always computed.
        """
        n = self.rounds[0].params.shape[0]
        points = self._test_grad_points()  # (hops+1, N, D)
        cache = self._test_grad_cache if not per_test and self._test_rows is None else None
        needed = [s for s in range(self.hops + 1) if cache is None or s == 0 or self.step + s not in cache]
        flat = points[needed].flatten(0, 1)
        hops = torch.tensor(needed, device=flat.device).repeat_interleave(n)
        nodes = torch.arange(n, device=flat.device).repeat(len(needed))
        computed = dict(zip(needed, self._scaled_test_grads(flat, hops, nodes, per_test).unflatten(0, (len(needed), n))))
        if cache is not None:
            cache.update({self.step + s: grads[:, 0] for s, grads in computed.items() if s > 0})
        return torch.stack([computed[s] if s in computed else cache[self.step + s][:, None] for s in range(self.hops + 1)])

    def adjoint(self, per_hop: bool, per_test: bool = False) -> torch.Tensor:
        """Scores of every sample of every node, (N, B); with per_hop a leading (hops+1,) axis,
        with per_test an (M,) axis before N (one objective per test point).

        lambda^{(r)} = q g^{(r)}, lambda^{(s)} = q g^{(s)} + adjoint_hop(lambda^{(s+1)}), and a
        sample's score is Delta_j(z)^T (q_j g_j^{(0)} + ((W^t)^T lambda^{(1)})_j). Each objective is
        a column; with per_hop each hop's term travels in its own block of columns.
        """
        first = self.rounds[0]
        if per_test and not per_hop and self._one_launch is not None:
            points = self._test_grad_points()
            test = self.test if self._test_rows is None else (self._test_rows, self.test.targets)
            return self._one_launch.adjoint_chain_per_test(self.objective, self.rounds, points, test, self.q, **self._kernel_flags())
        scaled_test_grads = self._scaled_test_grads_all(per_test)  # (hops+1, N, O, D)
        lam = None  # (N, C, D): blocks of O columns for hops r, r-1, ... when per_hop
        for s in range(self.hops, 0, -1):
            injected = scaled_test_grads[s]
            if lam is None:
                lam = injected
            else:
                lam = self._adjoint_hop(s, lam)
                lam = torch.cat([lam, injected], dim=1) if per_hop else lam + injected
        direct = scaled_test_grads[0]
        objectives = direct.shape[1]
        if lam is None:
            vectors = direct
        else:
            to_sources = self._mix(0, lam, transpose=True)
            if per_hop:  # hop blocks r..1 -> 1..r
                to_sources = to_sources.unflatten(1, (self.hops, objectives)).flip(1).flatten(1, 2)
                vectors = torch.cat([direct, to_sources], dim=1)
            else:
                vectors = direct + to_sources
        dots = self.objective.per_sample_dots(first.params, first.inputs, first.targets, vectors)
        scores = -(first.lr / self.batch_size) * dots  # Delta_j(z_b)^T v, (N, C, B)
        scores = scores.unflatten(1, (-1, objectives)).permute(1, 2, 0, 3)  # (hop blocks, O, N, B)
        scores = scores if per_hop else scores[0]
        return scores if per_test else scores.select(-3, 0)

    def influence_matrix(self) -> torch.Tensor:
        """(hops+1, N_source, N_receiver): e[s, j, k] of every source's whole batch, one forward chain.

        Each source is a column of the chain: delta^{(1)}[k, j] = W^t[k, j] Delta_j.
        """
        first, n = self.rounds[0], self.rounds[0].params.shape[0]
        scaled_test_grads = self._scaled_test_grads_all(per_test=False)[:, :, 0]  # (hops+1, N, D)
        uniform = mean_weights(first.inputs.shape[:2], first.params)
        displacements = -first.lr * self.objective.node_grads(first.params, first.inputs, first.targets, uniform)  # (N, D)
        if self._one_launch is not None:
            points = torch.stack([rnd.params for rnd in self.rounds])
            return self._one_launch.forward_chain(
                self.objective, self.rounds, points, displacements, scaled_test_grads, **self._kernel_flags()
            )
        scores = first.params.new_zeros(self.hops + 1, n, n)
        scores[0] = torch.diag((scaled_test_grads[0] * displacements).sum(-1))
        delta = first.W[:, :, None] * displacements[None]  # delta^{(1)}, (N_receiver, N_source, D)
        for s in range(1, self.hops + 1):
            if s >= 2:
                delta = self._forward_hop(s - 1, delta)
            scores[s] = torch.einsum("kd,kjd->jk", scaled_test_grads[s], delta)
        return scores
