"""DICE-E: the public entry points of the estimate."""

from __future__ import annotations

import torch

from dicekern.core.checks import check_finite_result, check_flag
from dicekern.engine.plan import plan_query
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
