"""The query plan: the one place that inspects a run, its device and the options, once per query.

``plan_query`` checks a query's inputs against the run, picks its curvature backend from the
backends' declared capabilities (``dicekern.curvature.select``), and returns a frozen
:class:`QueryPlan`; ``QueryPlan.chain()`` assembles the parts that every query (``dice_e``,
``cascade``, ``influence_matrix``, the ledger) executes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from dicekern.core.checks import check_node, check_node_weights, check_samples, check_test
from dicekern.core.optim import OptimizerSpec
from dicekern.core.partition import Partition
from dicekern.curvature.protocol import CurvatureBackend
from dicekern.curvature.select import Selection, select_backend
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.curvature.triton import TritonBackend, kernels_agree
from dicekern.engine.chain import INFLUENCE_CHUNK_BYTES, Chain
from dicekern.engine.evaluation import PerNodeTestSet, SharedTestSet
from dicekern.engine.last_layer import PerNodeTest
from dicekern.engine.mixing import Mixer, TorchMixer
from dicekern.engine.options import DiceOptions
from dicekern.engine.step import LocalStep
from dicekern.record.rounds import Round
from dicekern.record.trajectory import Trajectory

TestSet = tuple[torch.Tensor, torch.Tensor] | PerNodeTest


@dataclass(frozen=True, eq=False)
class QueryPlan:
    """Everything one query fixes before any work; ``chain()`` builds what executes it.

    Attributes:
        traj: the recorded run.
        step: the scored round t.
        hops: r; the window is rounds t..t+r (``window``, read on first use; a sweep reads them one at a time).
        test: the checked test set (inputs (M, ...), targets (M, ...)) or a PerNodeTest.
        options: the linearisation and backend asked for.
        q: (rows,) node weights of the rows this process holds.
        partition: which nodes this process holds and how its mixes exchange rows.
        selection: the curvature backend that runs the query, and under "auto" why faster ones could not.
        one_launch: whether the one-launch Triton chains run the queries they cover.
        chunk_bytes: the most bytes of chain vectors one chunk of sources (influence_matrix) or of
            per-sample work (order=2) holds.
        source: cascade's source node j (global index), or None.
        samples: (B,) 0/1 mask of cascade's removed samples of j, or None.
    """

    traj: Trajectory
    step: int
    hops: int
    test: TestSet
    options: DiceOptions
    q: torch.Tensor
    partition: Partition
    selection: Selection
    one_launch: bool
    chunk_bytes: int = INFLUENCE_CHUNK_BYTES
    source: int | None = None
    samples: torch.Tensor | None = None

    @property
    def backend(self) -> str:
        """The name of the curvature backend that runs the query: "torch", "closed_form" or "triton"."""
        return self.selection.name

    @property
    def fallback(self) -> str | None:
        """Under backend="auto", why faster backends could not run this query; None when none was passed over."""
        return self.selection.fallback

    def curvature_backend(self) -> CurvatureBackend:
        objective = self.traj.objective
        if self.selection.backend is TorchFuncBackend:
            return objective  # the recorder's own, already checked against the model
        return self.selection.backend(objective.model, objective.loss_fn)

    @cached_property
    def window(self) -> tuple[Round, ...]:
        """The rounds step..step+hops (checked when the plan was made)."""
        return tuple(self.traj[t] for t in range(self.step, self.step + self.hops + 1))

    def mixer(self, mixings: Sequence[torch.Tensor]) -> Mixer:
        """The mixer of the rounds whose W are ``mixings``: across processes the partition's exchange."""
        if self.partition.exchange is not None:
            return self.partition.exchange(mixings)
        if self.backend == "triton":
            from dicekern.bindings.gossip_mix import ColumnMixer  # imports triton: only for the Triton backend

            return ColumnMixer(mixings)
        return TorchMixer(mixings)

    def local_step(self, rnd: Round, backend: CurvatureBackend) -> LocalStep:
        """Round rnd's local step at this process's nodes, linearised as the options ask."""
        return LocalStep(backend, self.traj.optimizer, rnd.params, rnd.inputs, rnd.targets, rnd.lr, rnd.state, self.options.curvature,
                         rnd.buffers, chunk_size=self.options.chunk_size)

    def test_set(self, backend: CurvatureBackend, steps: Sequence[int]) -> SharedTestSet | PerNodeTestSet:
        """The test objective read at rounds ``steps`` (hop s of a chain reads steps[s])."""
        if isinstance(self.test, PerNodeTest):
            return PerNodeTestSet(backend, self.test, steps, self.traj[self.step].params, chunk_size=self.options.chunk_size)
        return SharedTestSet(backend, self.test, chunk_size=self.options.chunk_size)

    def chain(self, *, test_grad_cache: dict[int, torch.Tensor] | None = None) -> Chain:
        """The chain that executes this plan.

        Args:
            test_grad_cache: step -> (rows, D) q-scaled mean test gradients, shared by the windows
                of one ledger (one q and test set per cache).
        """
        backend = self.curvature_backend()
        stepping = self.window[: max(self.hops, 1)]
        steps = [self.local_step(rnd, backend) for rnd in stepping]
        tests = self.test_set(backend, [self.step + s for s in range(self.hops + 1)])
        chain_class = Chain
        if self.one_launch:
            from dicekern.engine.fused import FusedMLPChain  # imports triton

            chain_class = FusedMLPChain
        return chain_class(self.window, steps, self.mixer([rnd.W for rnd in stepping]), tests, self.q, self.options,
                           mix_state=self.traj.mix_state, mix_buffers=self.traj.mix_buffers, nodes=self.partition.nodes,
                           test_grad_cache=test_grad_cache, step=self.step)


def check_options_for(optimizer: OptimizerSpec, options: DiceOptions) -> None:
    """curvature_at="receiver" and direct="paper" are conventions of the paper's SGD analysis."""
    if optimizer.stateless:
        return
    if options.curvature_at == "receiver":
        raise ValueError(
            f"curvature_at='receiver' needs an optimizer without state (SGD without momentum); {optimizer} keeps "
            f"state at each node, so its step's Jacobian acts where the state is: use curvature_at='sender'"
        )
    if options.direct == "paper":
        raise ValueError(f"direct='paper' is the SGD analysis's convention (SGD without momentum); with {optimizer} use direct='half_step'")


def check_partition_backend(options: DiceOptions, partition: Partition) -> None:
    """Across processes the torch.func reference runs: only backend "auto" or "torch" may be asked for."""
    if not partition.is_whole and options.backend not in ("auto", "torch"):
        raise ValueError(f"across processes the torch engine runs: backend must be 'auto' or 'torch', got {options.backend!r}")


def select_for(traj: Trajectory, options: DiceOptions, partition: Partition) -> Selection:
    """The curvature backend of a query on traj. Across processes the torch.func reference runs."""
    check_partition_backend(options, partition)
    if not partition.is_whole:
        return Selection(TorchFuncBackend, "across processes only the torch.func reference runs")
    model, loss_fn = traj.objective.model, traj.objective.loss_fn

    def trusted(backend: type[CurvatureBackend]) -> bool:
        if backend is not TritonBackend:
            return True
        from dicekern.engine.fused import one_launch_agrees  # imports triton: only on CUDA, only for "auto"

        return kernels_agree(model, loss_fn, traj.device, traj.dtype) and one_launch_agrees(model, loss_fn, traj.device, traj.dtype)

    return select_backend(options.backend, model, loss_fn, traj.batch_layout().input_shape, traj.device, traj.dtype, trusted=trusted)


def check_inputs(traj: Trajectory, test: object, options: DiceOptions, partition: Partition) -> TestSet:
    """Everything a query needs of its inputs, checked against the run before any work: the
    options against the optimizer, q against N, and the test set against the run's batches
    (shapes, dtypes, labels). Returns the test set in the params' dtype and device (a
    PerNodeTest as it is)."""
    if not isinstance(options, DiceOptions):
        raise TypeError(f"options must be a dk.DiceOptions, got {type(options).__name__}")
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a dicekern Partition, got {type(partition).__name__}")
    check_options_for(traj.optimizer, options)
    if traj.objective.buffer_layout and (options.curvature != "exact" or options.order != 1):
        raise ValueError(f"the model has BatchNorm layers {list(traj.objective.buffer_layout.modules)}: DICE-E explains their "
                         f"running statistics with curvature='exact' and order=1; got curvature={options.curvature!r}, order={options.order}")
    if not traj.steps:
        raise ValueError("the trajectory is empty: record at least one round")
    like = traj[traj.steps[0]].params
    check_node_weights(options.q, partition.num_nodes, like)
    if isinstance(test, PerNodeTest):
        return test
    x, y = check_test(test, like)
    traj.batch_layout().check(traj.objective.loss_fn, x, y, lead=1, what="test")
    return x, y


def plan_query(
    traj: Trajectory, step: int, test: object, hops: int, options: DiceOptions | None = None, *,
    partition: Partition | None = None, source: int | None = None, samples: object = None, **option_fields,
) -> QueryPlan:
    """The plan of one query from round ``step``, ``hops`` hops, against ``test``: checks every input
    against the run and picks the curvature backend. ``plan.backend`` and ``plan.fallback`` say
    which backend runs and, under "auto", why faster ones could not.

    Args:
        partition: the nodes this process holds (default: every node).
        source, samples: cascade's source node and the indices of its removed samples (None: all).
        The rest as for :func:`dicekern.dice_e`.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.plan_query(run.trajectory, 0, run.test, 2).backend
        'closed_form'
    """
    options = DiceOptions.of(options, **option_fields)
    partition = Partition.whole(traj.num_nodes) if partition is None else partition
    traj.check_window(step, hops)
    first = traj[step]
    test = check_inputs(traj, test, options, partition)
    nodes = partition.nodes
    q = check_node_weights(options.q, partition.num_nodes, first.params)[nodes.start : nodes.stop]
    selection = select_for(traj, options, partition)
    one_launch = selection.backend.capabilities.one_launch_chains and traj.optimizer.is_plain_sgd and options.order == 1
    mask = None
    if source is not None:
        source = check_node("source", source, partition.num_nodes)
        mask = check_samples(samples, first.inputs.shape[1], q)
    return QueryPlan(traj, step, hops, test, options, q, partition, selection, one_launch, source=source, samples=mask)
