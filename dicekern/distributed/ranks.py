"""DICE across processes with torch.distributed: each rank holds a block of the nodes.

One node per rank is the truly decentralized case. A rank records only its own nodes' models and
batches (and the full W, which every gossip trainer knows), computes its nodes' gradients, HVPs and
per-sample scores, and exchanges chain vectors point to point, only along W's non-zeros. No rank
ever holds another rank's parameters: what crosses is one perturbation or adjoint row per edge.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from dicekern.core.checks import check_flag, check_int
from dicekern.core.partition import Partition
from dicekern.engine.plan import check_partition_backend, plan_query
from dicekern.engine.queries import plan_whole_run
from dicekern.engine.sweep import RunSweep
from dicekern.engine.options import DiceOptions
from dicekern.curvature.protocol import LossFn
from dicekern.engine.ledger import OnlineDICE, test_digest
from dicekern.record.modules import from_live_models
from dicekern.record.rounds import Round
from dicekern.record.trajectory import Mismatch, Recorder, Trajectory, replay_mismatch


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


def wait(requests: list, timeout: float | None, what: str) -> None:
    """Wait for every request, at most timeout seconds each (None: the process group's timeout)."""
    for request in requests:
        try:
            request.wait(timedelta(seconds=timeout)) if timeout is not None else request.wait()
        except RuntimeError as error:
            raise TimeoutError(f"{what}: another rank did not answer within {timeout} s (stopped, dead, or running another query?): {error}") from None


def agree(group, rank: int, world_size: int, timeout: float | None, what: str, arguments: dict) -> None:
    """Every rank checks, before any exchange, that all ranks run ``what`` with the same arguments.

    Raises on every rank: ValueError naming the arguments that differ; TimeoutError when a rank
    does not take part within timeout seconds.
    """
    mine = torch.tensor(list(hashlib.sha256(repr(sorted(arguments.items())).encode()).digest()), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    wait([dist.all_gather(everyone, mine, group=group, async_op=True)], timeout, f"rank {rank}: agreeing on {what}")
    if all(torch.equal(d, mine) for d in everyone):
        return
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, arguments, group=group)  # every rank is here: the digests arrived
    differing = sorted(k for k in arguments if len({repr(g.get(k)) for g in gathered}) > 1)
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {g.get(k)!r}" for r, g in enumerate(gathered)) for k in differing)
    raise ValueError(f"{what}: the ranks were given different arguments ({detail}); every rank must call it with the same ones")


def run_digest(traj, step: int, hops: int) -> str:
    """What a query reads of the run that every rank must share: N, D, dtype, optimizer and each W."""
    digest = hashlib.sha256(f"{traj.objective.layout.dim}{traj.dtype}{traj.optimizer}{traj.mix_state}".encode())
    for t in range(step, step + max(hops, 1)):
        if t in traj and traj[t].has_batch:
            digest.update(traj[t].W.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class BlockMixer:
    """W^{t+i} (or its transpose) on the node axis of this rank's rows, exchanging rows by P2P.

    A rank sends row j to rank r only when a node of r gives j a non-zero weight, and receives
    exactly the rows its own nodes weigh; plans are derived from W on both sides.
    """

    def __init__(self, mixings: list[torch.Tensor], blocks: list[range], rank: int, group=None, timeout: float | None = None):
        self._mixings, self._blocks, self._rank, self._group, self._timeout = mixings, blocks, rank, group, timeout
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
            wait(dist.batch_isend_irecv(ops), self._timeout, f"rank {self._rank}: exchanging chain rows")
        values = torch.cat([vectors] + [buffers[r] for r in sorted(buffers)])
        return torch.einsum("kj,jcd->kcd", weights, values)


class DistributedRecorder(Recorder):
    """A Recorder for this rank's block of nodes: params, inputs, targets, lr and state hold its rows only.

    Every rank records every round, in the same order (the replay check exchanges rows).

    Args:
        model, loss_fn, optimizer, mix_state, window, replay_check: as for Recorder.
        num_nodes: N, the number of nodes of the whole run (W is N x N).
        group: the process group (default: the world).
        timeout: seconds any exchange may wait for another rank before a TimeoutError (None: the
            process group's timeout), so a stopped rank cannot hang the others.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, num_nodes: int, *, group=None, timeout: float | None = None, **recorder_options):
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        num_nodes = check_int("num_nodes", num_nodes, minimum=1)
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        blocks = [node_block(num_nodes, r, world_size) for r in range(world_size)]
        exchange = partial(BlockMixer, blocks=blocks, rank=rank, group=group, timeout=timeout)
        super().__init__(model, loss_fn, partition=Partition(blocks[rank], num_nodes, exchange), **recorder_options)
        self.group, self.timeout, self.rank, self.world_size, self.blocks = group, timeout, rank, world_size, blocks
        self.nodes, self.total_nodes = blocks[rank], num_nodes

    def record(self, step, params, inputs=None, targets=None, lr=None, W=None, *, state=None, buffers=None, optimizers=None) -> None:
        """As Recorder.record with this rank's rows (len(self.nodes), ...) and the full (N, N) W:
        params are this rank's models (or their stacked params), optimizers theirs."""
        mine = f"rank {self.rank} owns nodes {self.nodes.start}..{self.nodes.stop - 1}"
        params, lr, state, buffers = from_live_models(params, inputs is not None, lr, state, buffers, optimizers, self.optimizer)
        rows = {name: p.shape[0] for name, p in params.items() if isinstance(p, torch.Tensor) and p.dim() > 0}
        if any(r != len(self.nodes) for r in rows.values()):
            raise ValueError(f"{mine}: params must hold {len(self.nodes)} rows, got {rows}")
        if getattr(lr, "ndim", 0) == 1 and len(lr) == self.total_nodes != len(self.nodes):
            raise ValueError(f"{mine}: lr holds a value for every node; pass this rank's rows lr[{self.nodes.start}:{self.nodes.stop}]")
        super().record(step, params, inputs, targets, lr, W, state=state, buffers=buffers)

    def agree(self, what: str, arguments: dict) -> None:
        """:func:`agree` in this recorder's group and timeout."""
        agree(self.group, self.rank, self.world_size, self.timeout, what, arguments)

    def _replay_mismatch(self, previous: Round, rnd: Round, rtol: float) -> Mismatch:
        """The worst mismatch over every rank's rows: half steps cross to the ranks that mix them."""
        mix = lambda W, rows: BlockMixer([W], self.blocks, self.rank, self.group, self.timeout)(0, rows[:, None], False)[:, 0]
        mine = replay_mismatch(self.objective, self.optimizer, self.mix_state, previous, rnd, rtol, mix, mix_buffers=self.mix_buffers)
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        return max(everyone, key=lambda m: m.excess)


def dice_e(
    recorder: DistributedRecorder, step: int, test: tuple[torch.Tensor, torch.Tensor], hops: int, *,
    per_hop: bool = False, options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """:func:`dicekern.dice_e` for this rank's nodes: (rows, B), or (hops+1, rows, B) with per_hop.

    Every rank must call it with the same arguments (it exchanges chain vectors). q is the (N,)
    weight vector of the whole run.
    """
    options, per_hop = DiceOptions.of(options, **option_fields), check_flag("per_hop", per_hop)
    recorder.agree("dicekern.distributed.dice_e", {"step": step, "hops": hops, "per_hop": per_hop, "test": test_digest(test),
                                                   "run": run_digest(recorder.trajectory(), step, hops), **options.to_dict()})
    return plan_query(recorder.trajectory(), step, test, hops, options, partition=recorder.partition).chain().adjoint(per_hop=per_hop)


def final_influence(
    recorder: DistributedRecorder, test: tuple[torch.Tensor, torch.Tensor], *, options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """:func:`dicekern.final_influence` of this rank's nodes: (T - t0, rows, B), one reverse sweep
    whose adjoint rows cross ranks along W's non-zeros. Every rank must call it with the same arguments."""
    options = DiceOptions.of(options, **option_fields)
    traj = recorder.trajectory()
    steps = traj.steps
    recorder.agree("dicekern.distributed.final_influence", {"steps": [steps[0], steps[-1]] if steps else [], "test": test_digest(test),
                                                            "run": run_digest(traj, steps[0], steps[-1] - steps[0]) if steps else "", **options.to_dict()})
    return RunSweep(plan_whole_run(traj, test, options, {}, "final_influence", partition=recorder.partition)).final_influence()


def cascade(
    recorder: DistributedRecorder, step: int, source: int, test: tuple[torch.Tensor, torch.Tensor], hops: int, *,
    samples: object = None, options: DiceOptions | None = None, **option_fields,
) -> torch.Tensor:
    """:func:`dicekern.cascade` of global node ``source``, received by this rank's nodes: (hops+1, rows).

    Every rank must call it with the same arguments; only the owner of ``source`` reads its batch.
    """
    options = DiceOptions.of(options, **option_fields)
    recorder.agree("dicekern.distributed.cascade", {
        "step": step, "hops": hops, "source": source, "samples": None if samples is None else torch.as_tensor(samples).tolist(),
        "test": test_digest(test), "run": run_digest(recorder.trajectory(), step, hops), **options.to_dict(),
    })
    plan = plan_query(recorder.trajectory(), step, test, hops, options, partition=recorder.partition, source=source, samples=samples)
    return plan.chain().cascade(plan.source, plan.samples)


class DistributedOnlineDICE(OnlineDICE):
    """:class:`dicekern.OnlineDICE` for this rank's block of nodes; totals are those of its nodes.

    Every rank records every round (its own rows, the full W) in step; save and load per rank.
    q is the (N,) weight vector of the whole run. The node-to-node matrix and final_contributions are single-process only.

    Every record() first checks that every rank records the same round of a ledger built with the
    same arguments (hops, options, q, test set, optimizer), and raises on every rank otherwise.

    Args:
        num_nodes: N of the whole run; group: the process group; timeout: as for
            DistributedRecorder. The rest as for OnlineDICE.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, test, hops: int, *, num_nodes: int, group=None, timeout: float | None = None,
        optimizer: object = None, mix_state: bool = False, mix_buffers: bool = False, replay_check: str = "sampled",
        node_matrix: bool = False, final_contributions: bool = False, options: DiceOptions | None = None, **option_fields,
    ):
        if node_matrix:
            raise ValueError("node_matrix is not available across processes: use dicekern.OnlineDICE in one process")
        if final_contributions:
            raise ValueError("final_contributions is not available across processes: use dicekern.OnlineDICE in one process, "
                             "or dicekern.distributed.final_influence on the recorded run")
        if "recorder" in option_fields:
            raise TypeError("DistributedOnlineDICE builds its own DistributedRecorder: pass no recorder")
        options = DiceOptions.of(options, **option_fields)
        if options.order == 2:
            raise ValueError("order=2 node totals come from the node matrix, which is single-process only: use dicekern.OnlineDICE")
        hops = check_int("hops", hops, minimum=0)
        recorder = DistributedRecorder(model, loss_fn, num_nodes, group=group, timeout=timeout, optimizer=optimizer, mix_state=mix_state,
                                       mix_buffers=mix_buffers, window=hops + 1, replay_check=replay_check)
        check_partition_backend(options, recorder.partition)
        super().__init__(model, loss_fn, test, hops, recorder=recorder, options=options)

    def record(self, step: int, params, inputs=None, targets=None, lr=None, W=None, *, state=None, buffers=None, optimizers=None,
               sample_ids=None):
        rec = self.recorder
        rec.agree("DistributedOnlineDICE.record", {
            "step": step, "has_batch": inputs is not None, "hops": self.hops, "test": self._test_digest, "num_nodes": rec.total_nodes,
            "optimizer": repr(rec.optimizer), "mix_state": rec.mix_state, "mix_buffers": rec.mix_buffers, "replay_check": rec.replay_check, **self.options.to_dict(),
        })
        return super().record(step, params, inputs, targets, lr, W, state=state, buffers=buffers, optimizers=optimizers, sample_ids=sample_ids)
