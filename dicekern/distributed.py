"""DICE across processes with torch.distributed: each rank holds a block of the nodes.

One node per rank is the truly decentralized case. A rank records only its own nodes' models and
batches (and the full W, which every gossip trainer knows), computes its nodes' gradients, HVPs and
per-sample scores, and exchanges chain vectors point to point, only along W's non-zeros. No rank
ever holds another rank's parameters: what crosses is one perturbation or adjoint row per edge.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from dicekern.checks import check_flag, check_int, check_node, check_samples
from dicekern.engine.builder import build_chain
from dicekern.engine.chain import Chain
from dicekern.engine.options import DiceOptions
from dicekern.objective import LossFn
from dicekern.online import OnlineDICE
from dicekern.trajectory import Mismatch, Recorder, Round, replay_mismatch


def node_block(num_nodes: int, rank: int, world_size: int) -> range:
    """The contiguous nodes rank owns: N split as evenly as possible, lower ranks one larger."""
    num_nodes, world_size = check_int("num_nodes", num_nodes, minimum=1), check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_nodes < world_size:
        raise ValueError(f"{world_size} ranks need at least as many nodes, got N={num_nodes}")
    base, extra = divmod(num_nodes, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class BlockMixer:
    """W^{t+i} (or its transpose) on the node axis of this rank's rows, exchanging rows by P2P.

    A rank sends row j to rank r only when a node of r gives j a non-zero weight, and receives
    exactly the rows its own nodes weigh; plans are derived from W on both sides.
    """

    def __init__(self, mixings: list[torch.Tensor], blocks: list[range], rank: int, group=None):
        self._mixings, self._blocks, self._rank, self._group = mixings, blocks, rank, group
        self._plans: dict[tuple[int, bool], tuple] = {}

    def _plan(self, index: int, transpose: bool) -> tuple:
        key = (index, transpose)
        if key not in self._plans:
            M = self._mixings[index].T if transpose else self._mixings[index]
            mine = self._blocks[self._rank]
            rows_mine = M[mine.start : mine.stop]
            receive, send = {}, {}
            for r, block in enumerate(self._blocks):
                if r == self._rank:
                    continue
                receive[r] = [j for j in block if rows_mine[:, j].ne(0).any()]
                send[r] = [j - mine.start for j in mine if M[block.start : block.stop, j].ne(0).any()]
            columns = list(mine) + [j for r in sorted(receive) for j in receive[r]]
            self._plans[key] = (receive, send, rows_mine[:, columns])
        return self._plans[key]

    def __call__(self, index: int, vectors: torch.Tensor, transpose: bool) -> torch.Tensor:
        receive, send, weights = self._plan(index, transpose)
        buffers = {r: vectors.new_empty(len(rows), *vectors.shape[1:]) for r, rows in receive.items() if rows}
        ops = [dist.P2POp(dist.isend, vectors[rows].contiguous(), r, self._group) for r, rows in send.items() if rows]
        ops += [dist.P2POp(dist.irecv, buffers[r], r, self._group) for r in buffers]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        values = torch.cat([vectors] + [buffers[r] for r in sorted(buffers)])
        return torch.einsum("kj,jcd->kcd", weights, values)


class DistributedRecorder(Recorder):
    """A Recorder for this rank's block of nodes: params, inputs, targets, lr and state hold its rows only.

    Every rank records every round, in the same order (the replay check exchanges rows).

    Args:
        model, loss_fn, optimizer, mix_state, window, replay_check: as for Recorder.
        num_nodes: N, the number of nodes of the whole run (W is N x N).
        group: the process group (default: the world).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, num_nodes: int, *, group=None, **recorder_options):
        super().__init__(model, loss_fn, total_nodes=num_nodes, **recorder_options)
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.blocks = [node_block(num_nodes, r, self.world_size) for r in range(self.world_size)]
        self.nodes = self.blocks[self.rank]

    def record(self, step, params, inputs=None, targets=None, lr=None, W=None, *, state=None) -> None:
        """As Recorder.record with this rank's rows (len(self.nodes), ...) and the full (N, N) W."""
        mine = f"rank {self.rank} owns nodes {self.nodes.start}..{self.nodes.stop - 1}"
        rows = {name: p.shape[0] for name, p in params.items() if isinstance(p, torch.Tensor) and p.dim() > 0}
        if any(r != len(self.nodes) for r in rows.values()):
            raise ValueError(f"{mine}: params must hold {len(self.nodes)} rows, got {rows}")
        if getattr(lr, "ndim", 0) == 1 and len(lr) == self.total_nodes != len(self.nodes):
            raise ValueError(f"{mine}: lr holds a value for every node; pass this rank's rows lr[{self.nodes.start}:{self.nodes.stop}]")
        super().record(step, params, inputs, targets, lr, W, state=state)

    def _replay_mismatch(self, previous: Round, rnd: Round, rtol: float) -> Mismatch:
        """The worst mismatch over every rank's rows: half steps cross to the ranks that mix them."""
        mix = lambda W, rows: BlockMixer([W], self.blocks, self.rank, self.group)(0, rows[:, None], False)[:, 0]
        mine = replay_mismatch(self.objective, self.optimizer, self.mix_state, previous, rnd, rtol, mix)
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        return max(everyone, key=lambda m: m.excess)


def _check_backend(options: DiceOptions) -> None:
    if options.backend not in ("auto", "torch"):
        raise ValueError("across processes the torch engine runs: backend must be 'auto' or 'torch'")


def _chain(recorder: DistributedRecorder, step: int, test, hops: int, options: DiceOptions, test_grad_cache=None, traj=None) -> Chain:
    _check_backend(options)
    traj = recorder.trajectory() if traj is None else traj
    mixer = BlockMixer([traj[step + s].W for s in range(max(hops, 1)) if step + s in traj], recorder.blocks, recorder.rank, recorder.group)
    return build_chain(traj, step, test, hops, replace(options, backend="torch"), test_grad_cache=test_grad_cache, mixer=mixer,
                       nodes=recorder.nodes, total_nodes=recorder.total_nodes)


def dice_e(
    recorder: DistributedRecorder, step: int, test: tuple[torch.Tensor, torch.Tensor], hops: int, *,
    per_hop: bool = False, options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """:func:`dicekern.dice_e` for this rank's nodes: (rows, B), or (hops+1, rows, B) with per_hop.

    Every rank must call it with the same arguments (it exchanges chain vectors). q is the (N,)
    weight vector of the whole run.
    """
    chain = _chain(recorder, step, test, hops, DiceOptions.of(options, **option_fields))
    return chain.adjoint(per_hop=check_flag("per_hop", per_hop))


def cascade(
    recorder: DistributedRecorder, step: int, source: int, test: tuple[torch.Tensor, torch.Tensor], hops: int, *,
    samples: object = None, options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """:func:`dicekern.cascade` of global node ``source``, received by this rank's nodes: (hops+1, rows).

    Every rank must call it with the same arguments; only the owner of ``source`` reads its batch.
    """
    chain = _chain(recorder, step, test, hops, DiceOptions.of(options, **option_fields))
    source = check_node("source", source, recorder.total_nodes)
    return chain.cascade(source, check_samples(samples, chain.batch_size, chain.q))


class DistributedOnlineDICE(OnlineDICE):
    """:class:`dicekern.OnlineDICE` for this rank's block of nodes; totals are those of its nodes.

    Every rank records every round (its own rows, the full W) in step; save and load per rank.
    q is the (N,) weight vector of the whole run. The node-to-node matrix is single-process only.

    Args:
        num_nodes: N of the whole run; group: the process group. The rest as for OnlineDICE.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, test, hops: int, *, num_nodes: int, group=None, node_matrix: bool = False, **options):
        if node_matrix:
            raise ValueError("node_matrix is not available across processes: use dicekern.OnlineDICE in one process")
        self._num_nodes, self._group = num_nodes, group
        super().__init__(model, loss_fn, test, hops, **options)
        _check_backend(self.options)

    def _make_recorder(self, model: nn.Module, loss_fn: LossFn, **recorder_options) -> DistributedRecorder:
        return DistributedRecorder(model, loss_fn, self._num_nodes, window=self.hops + 1, group=self._group, **recorder_options)

    def _chain(self, traj, t: int) -> Chain:
        return _chain(self.recorder, t, self.test, self.hops, self.options, test_grad_cache=self._test_grads, traj=traj)
