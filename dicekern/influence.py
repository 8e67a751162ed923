"""DICE-E: the public entry points of the estimate."""

from __future__ import annotations

import torch

from dicekern.bindings import is_linear_head, resolve_backend
from dicekern.chain import Chain, ChainOptions
from dicekern.checks import check_node, check_samples
from dicekern.objective import Curvature
from dicekern.trajectory import Trajectory


def build_chain(
    traj: Trajectory, step: int, test, hops: int, q, curvature, curvature_at, direct, backend: str, test_grad_cache=None
) -> Chain:
    """The Chain of one query, on the engine ``backend`` resolves to (see Chain for the arguments)."""
    engine = resolve_backend(backend, traj.device, is_linear_head(traj.objective.model, traj.objective.loss_fn))
    return Chain(traj, step, test, hops, q, ChainOptions(curvature, curvature_at, direct), engine, test_grad_cache)


def dice_e(
    traj: Trajectory,
    step: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    q: torch.Tensor | None = None,
    curvature: Curvature = "exact",
    curvature_at: str = "sender",
    direct: str = "half_step",
    per_hop: bool = False,
    per_test: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """DICE-E^(hops) of every sample of every node at round ``step``, all in one adjoint chain.

    Args:
        traj: the recorded run; needs rounds step..step+hops (the last may be params only).
        step: the round t whose samples are scored.
        test: (inputs (M, ...), targets (M, ...)); the objective is their mean loss.
        hops: r >= 0 communication hops after the local step.
        q: (N,) node weights of the global objective, default 1/N.
        curvature: "exact", "ggn" or "none".
        curvature_at: "sender" (DICE.md) or "receiver" (the theorem as printed).
        direct: "half_step" (gradient at theta^{t+1/2}) or "paper" (at theta^t) for hop 0.
        per_hop: return each hop's term separately.
        per_test: score against each test point's own loss instead of their mean.
        backend: "torch" (reference engine), "triton" (kernels; CPU tensors need
            TRITON_INTERPRET=1), or "auto" (Triton on CUDA for a linear head under a
            ``dicekern.losses`` loss, torch otherwise).

    Returns:
        (N, B) scores; per_hop adds a leading (hops+1,) axis that sums to the default; per_test
        adds an (M,) axis before N whose mean is the default: (hops+1, M, N, B) with both.
        Loss with the sample minus loss without it: a helpful sample is negative.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.dice_e(run.trajectory, step=1, test=run.test, hops=1).shape
        torch.Size([4, 5])
    """
    chain = build_chain(traj, step, test, hops, q, curvature, curvature_at, direct, backend)
    return chain.adjoint(per_hop=bool(per_hop), per_test=bool(per_test))


def cascade(
    traj: Trajectory,
    step: int,
    source: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    samples: object = None,
    q: torch.Tensor | None = None,
    curvature: Curvature = "exact",
    curvature_at: str = "sender",
    direct: str = "half_step",
    backend: str = "auto",
) -> torch.Tensor:
    """How the chosen samples of node ``source`` reach every node, hop by hop (one forward chain).

    Args:
        source: node j whose samples are removed.
        samples: indices into j's batch of round ``step``; None takes the whole batch.
        The other arguments are those of :func:`dice_e`.

    Returns:
        (hops+1, N): e[s, k] of DICE.md; row 0 is nonzero only at ``source``.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=4, batch_size=5)
        >>> dk.cascade(run.trajectory, step=0, source=2, test=run.test, hops=2, samples=[0, 3]).shape
        torch.Size([3, 4])
    """
    chain = build_chain(traj, step, test, hops, q, curvature, curvature_at, direct, backend)
    source = check_node("source", source, traj.num_nodes)
    mask = check_samples(samples, chain.batch_size, chain.q)
    return chain.cascade(source, mask)


def influence_matrix(
    traj: Trajectory,
    step: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    q: torch.Tensor | None = None,
    curvature: Curvature = "exact",
    curvature_at: str = "sender",
    direct: str = "half_step",
    backend: str = "auto",
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
    chain = build_chain(traj, step, test, hops, q, curvature, curvature_at, direct, backend)
    return chain.influence_matrix()
