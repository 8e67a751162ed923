"""build_chain: the one place that inspects the run, the device and the options to pick the parts."""

from __future__ import annotations

import torch
from torch import nn

from dicekern.bindings.dispatch import kernels_cover, resolve_backend
from dicekern.core.checks import check_node_weights, check_test
from dicekern.engine.chain import Chain
from dicekern.engine.evaluation import PerNodeTestSet, SharedTestSet
from dicekern.engine.mixing import Mixer, TorchMixer
from dicekern.engine.options import DiceOptions
from dicekern.engine.step import LocalStep
from dicekern.curvature.closed_form import ClosedFormBackend, unsupported_reason
from dicekern.core.optim import OptimizerSpec
from dicekern.engine.last_layer import PerNodeTest
from dicekern.record.trajectory import Trajectory


def closed_form_reason(traj: Trajectory) -> str | None:
    """Why the closed-form engine cannot run this run's model on its batches, or None."""
    model = traj.objective.model
    reason = unsupported_reason(model, traj.objective.loss_fn)
    flattens = isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Flatten)
    if reason is None and not flattens and len(traj.batch_layout().input_shape) != 1:
        reason = f"its inputs are {traj.batch_layout().input_shape} per sample; put an nn.Flatten first"
    return reason


def engine_of(traj: Trajectory, backend: str, *, validate: bool = True) -> str:
    """The engine backend resolves to for this run: "torch", "closed_form" or "triton" (see
    ``resolve_backend``); on CUDA, "auto" self-checks the kernels once (validate=False skips it)."""
    model, loss_fn = traj.objective.model, traj.objective.loss_fn

    def validated() -> bool:
        from dicekern.bindings.selfcheck import kernels_agree  # imports triton: only on CUDA, only for "auto"

        return not validate or kernels_agree(model, loss_fn, traj.device, traj.dtype)

    closed_form = closed_form_reason(traj)
    kernels = closed_form is None and kernels_cover(model, loss_fn)
    return resolve_backend(backend, traj.device, kernels=kernels, closed_form=closed_form, validated=validated)


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


def check_query(traj: Trajectory, test: object, options: DiceOptions, *, total_nodes: int | None = None) -> object:
    """Everything a query needs of its inputs, checked against the run before any work: the
    options against the optimizer, q against N, the backend against the device, and the test set
    against the run's batches (shapes, dtypes, labels). Returns the test set in the params' dtype
    and device (a PerNodeTest as it is)."""
    if not isinstance(options, DiceOptions):
        raise TypeError(f"options must be a dk.DiceOptions, got {type(options).__name__}")
    check_options_for(traj.optimizer, options)
    like = traj[traj.steps[0]].params if traj.steps else None
    if like is None:
        raise ValueError("the trajectory is empty: record at least one round")
    check_node_weights(options.q, total_nodes or traj.num_nodes, like)
    engine_of(traj, options.backend, validate=False)
    if isinstance(test, PerNodeTest):
        return test
    x, y = check_test(test, like)
    traj.batch_layout().check(traj.objective.loss_fn, x, y, lead=1, what="test")
    return x, y


def build_chain(
    traj: Trajectory, step: int, test: object, hops: int, options: DiceOptions, *,
    test_grad_cache: dict[int, torch.Tensor] | None = None, mixer: Mixer | None = None, nodes: range | None = None,
    total_nodes: int | None = None,
) -> Chain:
    """The chain of one query from round ``step``, ``hops`` hops, against ``test``.

    Args:
        test: (inputs (M, ...), targets (M, ...)), or a PerNodeTest (last-layer mode).
        mixer, nodes, total_nodes: across processes, the exchange of rows, the global indices of
            this trajectory's rows, and N of the whole run (default: one process holds all).
    """
    rounds = traj.window(step, hops)
    test = check_query(traj, test, options, total_nodes=total_nodes)
    first = rounds[0]
    nodes = range(traj.num_nodes) if nodes is None else nodes
    q = check_node_weights(options.q, total_nodes or traj.num_nodes, first.params)[nodes.start : nodes.stop]
    model, loss_fn = traj.objective.model, traj.objective.loss_fn
    closed_form = closed_form_reason(traj) is None
    covered = closed_form and kernels_cover(model, loss_fn)  # the kernels' models are closed-form ones, narrower
    engine = engine_of(traj, options.backend)
    kernels = engine == "triton"
    stepping = rounds[: max(hops, 1)]
    objective = ClosedFormBackend(model, loss_fn) if closed_form and engine != "torch" else traj.objective
    if kernels:
        # imported only here: triton must not load before the user can choose its interpreter
        from dicekern.bindings.gossip_mix import ColumnMixer
        from dicekern.curvature.triton import TritonBackend

        mixer = mixer or ColumnMixer([rnd.W for rnd in stepping])
        if covered:
            objective = TritonBackend(model, loss_fn)
    mixer = mixer or TorchMixer([rnd.W for rnd in stepping])
    steps = [LocalStep(objective, traj.optimizer, r.params, r.inputs, r.targets, r.lr, r.state, options.curvature) for r in stepping]
    if isinstance(test, PerNodeTest):
        tests = PerNodeTestSet(objective, test, [step + s for s in range(hops + 1)], first.params)
    else:
        tests = SharedTestSet(objective, test)
    chain_class = Chain
    if kernels and covered and traj.optimizer.is_plain_sgd and options.order == 1:  # the kernels fuse the first-order chain
        from dicekern.engine.fused import FusedMLPChain  # one launch for the queries it covers

        chain_class = FusedMLPChain
    return chain_class(rounds, steps, mixer, tests, q, options, mix_state=traj.mix_state, nodes=nodes,
                       test_grad_cache=test_grad_cache, step=step)
