"""DICE-E: the public entry points of the estimate."""

from __future__ import annotations

import torch

from dicekern.core.checks import check_finite_result, check_flag
from dicekern.core.partition import Partition
from dicekern.engine.plan import QueryPlan, plan_query
from dicekern.engine.sweep import RunSweep
from dicekern.engine.options import DiceOptions
from dicekern.engine.last_layer import PerNodeTest
from dicekern.record.trajectory import Trajectory


def dice_e(
    traj: Trajectory,
    step: int,
    test: tuple[torch.Tensor, torch.Tensor] | PerNodeTest,
    hops: int,
    *,
    per_hop: bool = False,
    per_test: bool = False,
    options: DiceOptions | None = None,
    **option_fields,
) -> torch.Tensor:
    """DICE-E^(hops) of every sample of every node at round ``step``, all in one adjoint chain.

    Args:
        traj: the recorded run; needs rounds step..step+hops (the last may be params only).
        step: the round t whose samples are scored.
        test: (inputs (M, ...), targets (M, ...)); the objective is their mean loss. Or the
            PerNodeTest of ``dk.last_layer``, with its head trajectory.
        hops: r >= 0 rounds after the local step (hop s reads theta^{t+s}).
        per_hop: return each hop's term separately.
        per_test: score against each test point's own loss instead of their mean.
        options: a :class:`DiceOptions` (q, curvature, curvature_at, direct, backend); its fields
            may also be given as keywords, e.g. ``q=weights, curvature="ggn"``.

    Returns:
        Scores with the fixed rank rule ``[hops+1,] [M,] N, B``: (N, B) by default; per_hop adds
        a leading (hops+1,) axis that sums to the default; per_test adds an (M,) axis before N
        whose mean is the default. Loss with the sample minus loss without it: a helpful sample
        is negative.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.dice_e(run.trajectory, step=1, test=run.test, hops=1).shape
        torch.Size([4, 5])
    """
    per_hop, per_test = check_flag("per_hop", per_hop), check_flag("per_test", per_test)
    chain = plan_query(traj, step, test, hops, options, **option_fields).chain()
    return check_finite_result("DICE-E", chain.adjoint(per_hop=per_hop, per_test=per_test))


def cascade(
    traj: Trajectory,
    step: int,
    source: int,
    test: tuple[torch.Tensor, torch.Tensor] | PerNodeTest,
    hops: int,
    *,
    samples: object = None,
    options: DiceOptions | None = None,
    **option_fields,
) -> torch.Tensor:
    """How the chosen samples of node ``source`` reach every node, hop by hop (one forward chain).

    Args:
        source: node j whose samples are removed.
        samples: indices into j's batch of round ``step``; None takes the whole batch.
        The other arguments are those of :func:`dice_e`.

    Returns:
        (hops+1, N): e[s, k] of DICE.md; row 0 is nonzero only at ``source``. With an optimizer
        that keeps state, the source's own later rows carry what lingers in its state.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=4, batch_size=5)
        >>> dk.cascade(run.trajectory, step=0, source=2, test=run.test, hops=2, samples=[0, 3]).shape
        torch.Size([3, 4])
    """
    plan = plan_query(traj, step, test, hops, options, source=source, samples=samples, **option_fields)
    return check_finite_result("the cascade", plan.chain().cascade(plan.source, plan.samples))


def influence_matrix(
    traj: Trajectory,
    step: int,
    test: tuple[torch.Tensor, torch.Tensor] | PerNodeTest,
    hops: int,
    *,
    options: DiceOptions | None = None,
    **option_fields,
) -> torch.Tensor:
    """Node-to-node influence of every node's whole batch at round ``step``, all sources in one chain.

    Returns:
        (hops+1, N_source, N_receiver): entry [s, j, k] is e[s, k] of ``cascade`` with source j;
        hop 0 is diagonal.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.influence_matrix(run.trajectory, step=0, test=run.test, hops=2).shape
        torch.Size([3, 4, 4])
    """
    chain = plan_query(traj, step, test, hops, options, **option_fields).chain()
    return check_finite_result("the influence matrix", chain.influence_matrix())


def plan_whole_run(traj: Trajectory, test: object, options: DiceOptions | None, option_fields: dict, what: str,
                   partition: Partition | None = None) -> QueryPlan:
    """The plan of rounds t0..T of traj (its first and last recorded rounds) for a whole-run query ``what``."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a dk.Trajectory, got {type(traj).__name__}")
    steps = traj.steps
    if len(steps) < 2:
        raise ValueError(f"{what} needs at least two recorded rounds (the scored ones and the final models), got {len(steps)}")
    options = DiceOptions.of(options, **option_fields)
    if options.order != 1:
        raise ValueError(f"{what} is first order (options.order=1); node_contributions(order=2) adds the final loss's curvature")
    return plan_query(traj, steps[0], test, steps[-1] - steps[0], options, partition=partition)


def final_influence(
    traj: Trajectory,
    test: tuple[torch.Tensor, torch.Tensor] | PerNodeTest,
    *,
    options: DiceOptions | None = None,
    progress: bool = False,
    **option_fields,
) -> torch.Tensor:
    """What every sample of every round did to the final models, in one reverse sweep.

    The final models are those of the last recorded round T; the objective is sum_k q_k L(theta_k^T; z')
    over the test set's mean loss. Entry [t - t0, j, b] is hop T - t of
    ``dice_e(traj, t, test, hops=T - t, per_hop=True)`` (t0 the first recorded round): the
    first-order effect of removing sample b of node j at round t. Cost about one ``dice_e`` with
    hops = T - t0; memory the adjoint plus one round; rounds are read newest first.

    Args:
        traj: the recorded run; rounds t0..T-1 with their batches, round T its params at least.
        test: as for :func:`dice_e`.
        options: as for :func:`dice_e` (q, curvature, curvature_at, backend, chunk_size); order 1.
        progress: show a progress bar over the rounds.

    Returns:
        (T - t0, N, B): loss with the sample minus loss without it (a helpful sample is negative).

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.final_influence(run.trajectory, run.test).shape
        torch.Size([3, 4, 5])
    """
    progress = check_flag("progress", progress)
    plan = plan_whole_run(traj, test, options, option_fields, "final_influence")
    return check_finite_result("final_influence", RunSweep(plan).final_influence(progress))


def node_contributions(
    traj: Trajectory,
    test: tuple[torch.Tensor, torch.Tensor] | PerNodeTest,
    *,
    order: int = 1,
    options: DiceOptions | None = None,
    progress: bool = False,
    **option_fields,
) -> torch.Tensor:
    """What each node's data, removed from every recorded round, does to the final models.

    Args:
        order: 1 sums :func:`final_influence` over rounds and samples (one reverse sweep). 2 carries
            the removal of each node's data through every round to second order, the curvature of
            every step included (forward sweeps whose columns are sources, in chunks; nested
            forward-mode derivatives of each round), and reads the final test loss's change along
            it by Simpson's rule, exact when the test loss is cubic. Not for BatchNorm models.
        The rest as for :func:`final_influence`.

    Returns:
        (N,): the change of sum_k q_k L(theta_k^T; z'), loss with node j's data minus loss without.
        Validate with ``dk.final_gt(traj, test, remove=range(N))``.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.node_contributions(run.trajectory, run.test, order=2).shape
        torch.Size([4])
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    progress = check_flag("progress", progress)
    plan = plan_whole_run(traj, test, options, option_fields, "node_contributions")
    return check_finite_result("node contributions", RunSweep(plan).contributions(order, progress))
