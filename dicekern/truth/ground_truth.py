"""DICE-GT: influence by exact counterfactual replay of the recorded rounds (Definitions 2 and 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from dicekern.core import extras
from dicekern.core.checks import check_finite_result, check_flag, check_int, check_node, check_node_weights, check_samples, check_test
from dicekern.curvature.round import Buffers, NodeUpdate, local_update, mix, test_point
from dicekern.curvature.torch_func import mean_weights
from dicekern.record.rounds import Round
from dicekern.record.trajectory import Trajectory


def _replay_test_losses(traj: Trajectory, rounds: Sequence[Round], test: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(K, hops+1, N) test losses at theta^{t+1/2}, theta^{t+1}, ..., theta^{t+hops} of K replays.

    keep (K, N, B): 0 drops a sample from round t's batch sum (the denominator stays B) and, in a
    BatchNorm model, from its batch statistics; every later round is replayed unchanged, from the
    recorded params, optimizer state and buffers of round t. A BatchNorm model's test loss is
    taken in eval mode with each node's running statistics: those the half step's forward
    produced at theta^{t+1/2}, those of round t+s at theta^{t+s}.
    """
    return _replay(traj, rounds, test, _first_round_only(keep, rounds))[0]


def _first_round_only(keep: torch.Tensor, rounds: Sequence[Round]) -> torch.Tensor:
    """(K, R, N, B) per-round keep masks of the R stepped rounds from round t's (K, N, B): later rounds keep all."""
    stepped = max(len(rounds) - 1, 1)
    return torch.cat([keep[:, None], torch.ones_like(keep)[:, None].expand(-1, stepped - 1, -1, -1)], dim=1)


def _replay(
    traj: Trajectory, rounds: Sequence[Round], test: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor,
    moved: torch.Tensor | None = None, factual: tuple[torch.Tensor, list[NodeUpdate]] | None = None, *, final_only: bool = False,
) -> tuple[torch.Tensor, list[NodeUpdate]]:
    """``_replay_test_losses`` of K replays, and every replayed round's local step (K, N, ...).

    keep (K, R, N, B) holds the replays' masks of the R stepped rounds (R = max(hops, 1)). With
    final_only, the losses are those of the last round's models alone: (K, 1, N).

    With moved (hops+1, N) bool, a superset of the rows a removal can change (``_moved``), and
    factual, this function's output for one replay of the recorded batches (keep all ones): round
    i steps only the rows moved[i] and the test losses of hop s are taken only at moved[s]; every
    other row keeps the factual value, which its replay would repeat.
    """
    first = rounds[0]
    num_replays = keep.shape[0]
    uniform = mean_weights(tuple(keep.shape[-2:]), keep)
    objective, optimizer = traj.objective, traj.optimizer
    expand = lambda value: value.expand(num_replays, *value.shape)
    params, state = expand(first.params), {name: expand(value) for name, value in first.state.items()}
    buffers = None if first.buffers is None else Buffers(*map(expand, first.buffers))
    batched = None if buffers is None else 0  # vmap takes no dimension of an absent value

    def step(params, state, buffers, inputs, targets, lr, weights) -> NodeUpdate:
        return local_update(objective, optimizer, params, state, inputs, targets, lr, weights, buffers)

    stepped = vmap(step, in_dims=(0, 0, batched, None, None, None, 0), out_dims=NodeUpdate(0, 0, batched))
    rows = lambda i: slice(None) if moved is None else moved[i].nonzero().flatten()
    updates, points = [], []
    for i, rnd in enumerate(rounds[: max(len(rounds) - 1, 1)]):
        r = rows(i)
        update = stepped(params[:, r], {k: v[:, r] for k, v in state.items()}, None if buffers is None else Buffers(*(b[:, r] for b in buffers)),
                         rnd.inputs[r], rnd.targets[r], rnd.lr[r], (keep[:, i] * uniform)[:, r])
        if moved is not None:
            update = _scatter_rows(factual[1][i], update, r, num_replays)
        if not final_only:
            updates.append(update)
        if i == 0:
            points.append(test_point(update.half, update.buffers))
        _, params, state, buffers = mix(update, optimizer, rnd.W, mix_state=traj.mix_state, mix_buffers=traj.mix_buffers)
        points.append(test_point(params, buffers))
    points = points[len(rounds) - 1 : len(rounds)] if final_only else points[: len(rounds)]  # hops = 0 needs theta^{t+1/2} only
    if moved is None:
        stacked = torch.stack(points, dim=1)  # (K, hops+1, N, D (+ D_b))
        return objective.test_losses(stacked.flatten(0, 2), test).view(stacked.shape[:3]), updates
    losses = factual[0].expand(num_replays, *factual[0].shape[1:]).clone()
    at = [point[:, rows(s)] for s, point in enumerate(points)]  # (K, |moved[s]|, D (+ D_b)) each
    computed = objective.test_losses(torch.cat(at, dim=1).flatten(0, 1), test).view(num_replays, -1)
    for s, part in enumerate(computed.split([a.shape[1] for a in at], dim=1)):
        losses[:, s, rows(s)] = part
    return losses, updates


def _scatter_rows(factual: NodeUpdate, update: NodeUpdate, rows: torch.Tensor, num_replays: int) -> NodeUpdate:
    """The factual step (1, N, ...) repeated for K replays, with its rows ``rows`` replaced by
    update's (K, |rows|, ...)."""

    def scatter(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        out = full.expand(num_replays, *full.shape[1:]).clone()
        out[:, rows] = part
        return out

    buffers = None if update.buffers is None else Buffers(*map(scatter, factual.buffers, update.buffers))
    return NodeUpdate(scatter(factual.half, update.half), {k: scatter(factual.state[k], v) for k, v in update.state.items()}, buffers)


def _moved(rounds: Sequence[Round], sources: torch.Tensor) -> torch.Tensor:
    """(hops+1, N) bool: a superset of the rows whose params, state or buffers removing samples of
    the source nodes (bool (N,)) can change at the start of round t+s (row 0: the sources, whose
    step round t changes): everything a source reaches through the mixes, cumulatively."""
    moved = [sources]
    for rnd in rounds[:-1]:
        moved.append(moved[-1] | (((rnd.W != 0).to(rnd.W.dtype) @ moved[-1].to(rnd.W.dtype)) > 0))
    return torch.stack(moved)


CHUNK_BUDGET_BYTES = 256 << 20


def replay_bytes(traj: Trajectory, rounds: Sequence[Round]) -> int:
    """Estimated memory of one replay of rounds: itemsize * N * (4 B A + 3 (hops+2) S D), with A the
    numel of every module's output for one sample (forward and backward keep about four copies)
    and S the blocks of a node's state. Measured within 30% on an MLP and a CNN (benchmarks/README)."""
    first = rounds[0]
    n, batch = first.inputs.shape[:2]
    numel = []
    hooks = [m.register_forward_hook(lambda _, __, out: numel.append(out.numel() if isinstance(out, torch.Tensor) else 0))
             for m in traj.objective.model.modules()]
    try:
        traj.objective.outputs(first.params[0], first.inputs[0, :1])
    finally:
        for hook in hooks:
            hook.remove()
    blocks = 1 + len(traj.optimizer.state_blocks)
    return first.params.element_size() * n * (4 * batch * sum(numel) + 3 * (len(rounds) + 1) * blocks * first.params.shape[1])


def _reachable(rounds: Sequence[Round], stateful: bool) -> torch.Tensor:
    """(hops+1, N, N) bool: reach[s, k, j] is True when removing a sample of j can change theta_k^{t+s}.

    s = 0: k = j. A node's step is perturbed where its params are, and with optimizer state also
    wherever its state was perturbed before (the state keeps the perturbation at the node).
    """
    n = rounds[0].params.shape[0]
    perturbed = torch.eye(n, dtype=torch.bool, device=rounds[0].params.device)  # whose half step moves, per source
    reach = [perturbed]
    for rnd in rounds[:-1]:
        params_reach = ((rnd.W != 0).double() @ perturbed.double()) > 0
        reach.append(params_reach)
        perturbed = params_reach | perturbed if stateful else params_reach
    return torch.stack(reach)


def _gt_from_losses(
    factual: torch.Tensor, counterfactual: torch.Tensor, q: torch.Tensor, reach_from_source: torch.Tensor
) -> torch.Tensor:
    """gt = q_k (L - L_without) where z can reach k, exactly 0 elsewhere; shapes (..., hops+1, N)."""
    return torch.where(reach_from_source, q * (factual - counterfactual), torch.zeros_like(factual))


def dice_gt(
    traj: Trajectory,
    step: int,
    source: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    samples: object = None,
    q: torch.Tensor | None = None,
) -> torch.Tensor:
    """gt[s, k] of DICE.md: the change of q_k L(theta_k^{t+s}; z') when samples are removed.

    Replays rounds step..step+hops-1 from the recorded params and optimizer state at ``step``,
    with the recorded optimizer, with and without the chosen samples of node ``source`` (same
    batches, W and lr otherwise).

    Returns:
        (hops+1, N); row 0 is the direct term at theta^{t+1/2}, nonzero only at ``source``;
        nodes the samples cannot reach in s mixes get exactly 0.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.dice_gt(run.trajectory, step=0, source=1, test=run.test, hops=2, samples=[4]).shape
        torch.Size([3, 4])
    """
    rounds = traj.window(step, hops)
    like = rounds[0].params
    source = check_node("source", source, traj.num_nodes)
    mask = check_samples(samples, rounds[0].inputs.shape[1], like)
    q = check_node_weights(q, traj.num_nodes, like)
    test = check_test(test, like)
    keep = torch.ones(2, *rounds[0].inputs.shape[:2], dtype=like.dtype, device=like.device)
    keep[1, source] -= mask
    losses = _replay_test_losses(traj, rounds, test, keep)
    gt = _gt_from_losses(losses[0], losses[1], q, _reachable(rounds, not traj.optimizer.stateless)[:, :, source])
    return check_finite_result("DICE-GT", gt)


def dice_gt_samples(
    traj: Trajectory,
    step: int,
    test: tuple[torch.Tensor, torch.Tensor],
    hops: int,
    *,
    nodes: Sequence[int] | None = None,
    q: torch.Tensor | None = None,
    per_hop: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DICE-GT^(hops) of every single sample of the given nodes: one replay per sample, batched.

    The ground-truth twin of :func:`dicekern.dice_e`, for validating it sample by sample.

    Args:
        nodes: the source nodes whose samples are removed one at a time (default: all).
        chunk_size: replays run together. Each holds the N models and optimizer states of every
            hop and the activations of N batches, about ``replay_bytes`` (a CNN with D = 6373,
            N = 8, B = 16: estimated 34 MiB, measured 26 MB; benchmarks/dice_gt_memory.py). None
            picks the most replays that fit in 256 MiB (at most 64).
        progress: show a progress bar over the replays.

    Returns:
        (len(nodes), B), or (hops+1, len(nodes), B) with per_hop; each entry is
        sum_k gt[s, k] (summed over s unless per_hop).

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.dice_gt_samples(run.trajectory, step=0, test=run.test, hops=2, nodes=[0, 3]).shape
        torch.Size([2, 5])
    """
    rounds = traj.window(step, hops)
    like = rounds[0].params
    n, batch = rounds[0].inputs.shape[:2]
    nodes = list(range(n)) if nodes is None else [check_node("nodes[i]", j, n) for j in nodes]
    if not nodes or len(set(nodes)) != len(nodes):
        raise ValueError(f"nodes must name at least one node, each once, got {nodes}")
    if chunk_size is None:
        chunk_size = max(1, min(64, CHUNK_BUDGET_BYTES // replay_bytes(traj, rounds)))
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    per_hop = check_flag("per_hop", per_hop)
    q = check_node_weights(q, n, like)
    test = check_test(test, like)
    reach = _reachable(rounds, not traj.optimizer.stateless)
    ones = torch.ones(1, n, batch, dtype=like.dtype, device=like.device)
    factual = _replay(traj, rounds, test, _first_round_only(ones, rounds))
    removals = [(j, b) for j in nodes for b in range(batch)]
    totals = []
    for start in extras.progress(range(0, len(removals), chunk_size), enabled=progress, description="DICE-GT replays", unit="chunk"):
        chunk = removals[start : start + chunk_size]
        keep = ones.repeat(len(chunk), 1, 1)
        for i, (j, b) in enumerate(chunk):
            keep[i, j, b] = 0.0
        sources = torch.tensor([j for j, _ in chunk], device=like.device)
        moved = _moved(rounds, torch.zeros(n, dtype=torch.bool, device=like.device).index_fill_(0, sources, True))
        losses = _replay(traj, rounds, test, _first_round_only(keep, rounds), moved, factual)[0]
        gt = _gt_from_losses(factual[0][0], losses, q, reach[:, :, sources].permute(2, 0, 1))
        totals.append(gt.sum(-1))  # (chunk, hops+1)
    per_sample = torch.cat(totals).view(len(nodes), batch, hops + 1).permute(2, 0, 1)
    return check_finite_result("DICE-GT", per_sample if per_hop else per_sample.sum(0))


Removal = int | tuple[int, int, int] | Sequence[int | tuple[int, int, int]]


def _removal_masks(remove: object, steps: range, n: int, batch: int) -> list[torch.Tensor]:
    """Each removal of ``remove`` as a (T - t0, N, B) bool mask of the removed (round, node, sample)s."""
    if isinstance(remove, (str, bytes, torch.Tensor)) or not isinstance(remove, Sequence | range):
        raise TypeError(f"remove must be a sequence of removals (a node, a (round, node, sample) triple, or a list of them), "
                        f"got {type(remove).__name__}")
    if len(remove) == 0:
        raise ValueError("remove must name at least one removal")
    masks = []
    for i, removal in enumerate(remove):
        entries = [removal] if isinstance(removal, int) or (isinstance(removal, tuple) and len(removal) == 3) else removal
        if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence | range | set | frozenset) or not entries:
            raise ValueError(f"remove[{i}] must be a node, a (round, node, sample) triple or a non-empty list of them, got {removal!r}")
        mask = torch.zeros(len(steps), n, batch, dtype=torch.bool)
        for entry in entries:
            if isinstance(entry, bool) or not isinstance(entry, int | tuple):
                raise ValueError(f"remove[{i}]: {entry!r} is neither a node nor a (round, node, sample) triple")
            if isinstance(entry, int):
                mask[:, check_node(f"remove[{i}] node", entry, n)] = True
                continue
            if len(entry) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
                raise ValueError(f"remove[{i}]: {entry!r} is not a (round, node, sample) triple of ints")
            t, j, b = entry
            if t not in steps:
                raise ValueError(f"remove[{i}]: round {t} is not a scored round of the run (rounds {steps.start}..{steps.stop - 1}; "
                                 f"the last recorded round holds the final models)")
            if not 0 <= b < batch:
                raise ValueError(f"remove[{i}]: sample {b} does not exist (batches hold B = {batch} samples)")
            mask[t - steps.start, check_node(f"remove[{i}] node", j, n), b] = True
        masks.append(mask)
    return masks


def final_gt(
    traj: Trajectory,
    test: tuple[torch.Tensor, torch.Tensor],
    remove: Sequence[Removal],
    *,
    q: torch.Tensor | None = None,
    per_node: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The exact change of the final models' test loss when data is removed from the run: replays.

    The ground truth of :func:`dicekern.final_influence` and :func:`dicekern.node_contributions`.
    Each removal replays the run, from the first round it touches to the last recorded round T,
    with its samples' weights 0 (the denominator stays B; BatchNorm statistics renormalise);
    removals that start at the same round replay together, ``chunk_size`` at a time.

    Args:
        remove: K removals, each one of: a node j (its samples at every scored round), a
            (round, node, sample) triple, or a list of nodes and triples removed together. A
            tuple of three ints is a triple; to remove three nodes together, pass a list.
        q: (N,) node weights of the objective sum_k q_k L(theta_k^T; z'); None for 1/N.
        per_node: return each node's term q_k (L_k - L_k without) instead of their sum.
        chunk_size: replays run together (None: as for ``dice_gt_samples``).
        progress: show a progress bar over the chunks of replays.

    Returns:
        (K,), or (K, N) with per_node: loss with the data minus loss without it.

    Example:
        >>> import dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
        >>> dk.final_gt(run.trajectory, run.test, remove=[2, (0, 1, 4), [(1, 0, 0), 3]]).shape
        torch.Size([3])
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a dk.Trajectory, got {type(traj).__name__}")
    steps = traj.steps
    if len(steps) < 2:
        raise ValueError(f"final_gt needs at least two recorded rounds (the scored ones and the final models), got {len(steps)}")
    first, last = steps[0], steps[-1]
    traj.check_window(first, last - first)
    like = traj[first].params
    n, batch = traj[first].inputs.shape[:2]
    masks = _removal_masks(remove, range(first, last), n, batch)
    per_node, progress = check_flag("per_node", per_node), check_flag("progress", progress)
    q = check_node_weights(q, n, like)
    test = check_test(test, like)
    traj.batch_layout().check(traj.objective.loss_fn, *test, lead=1, what="test")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    starts = [int(mask.flatten(1).any(1).nonzero()[0]) for mask in masks]
    result = like.new_empty(len(masks), n)
    groups = sorted(set(starts))
    chunks = []
    for start in groups:
        rounds = traj.window(first + start, last - first - start)
        members = [i for i, s in enumerate(starts) if s == start]
        size = chunk_size or max(1, min(64, CHUNK_BUDGET_BYTES // replay_bytes(traj, rounds)))
        chunks += [(start, rounds, members[i : i + size]) for i in range(0, len(members), size)]
    factual = {}
    for start, rounds, members in extras.progress(chunks, enabled=progress, description="final replays", unit="chunk"):
        if start not in factual:
            ones = torch.ones(1, len(rounds) - 1, n, batch, dtype=like.dtype, device=like.device)
            factual[start] = _replay(traj, rounds, test, ones, final_only=True)[0][0, 0]
        keep = torch.stack([~masks[i][start:] for i in members]).to(like.dtype).to(like.device)
        losses = _replay(traj, rounds, test, keep, final_only=True)[0][:, 0]
        result[members] = q * (factual[start] - losses)
    return check_finite_result("final_gt", result if per_node else result.sum(-1))
