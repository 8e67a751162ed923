"""Live node models in, stacked tensors out: what every gossip trainer writes before ``record()``.

Node k's model is ``models[k]``, all of one architecture. Stacked tensors put the node axis first:
name -> (N, *shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dicekern.core.checks import check_mixing
from dicekern.core.optim import OptimizerSpec, spec_of, stack_lr, stack_state


def check_models(models: object) -> list[nn.Module]:
    """A non-empty sequence of nn.Modules with the same named parameters and buffers (names,
    shapes, dtypes, devices); a TypeError or ValueError naming the first that differs."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"models must be a non-empty sequence of nn.Module, one per node, got {type(models).__name__}")
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{k}] must be an nn.Module, got {type(model).__name__}")
    describe = lambda m: [(n, tuple(t.shape), t.dtype, t.device) for n, t in (*m.named_parameters(), *m.named_buffers())]
    first = describe(models[0])
    for k, model in enumerate(models[1:], start=1):
        if describe(model) != first:
            theirs = dict((n, rest) for n, *rest in describe(model))
            name = next((n for n, *rest in first if theirs.get(n) != rest), None) or next(iter(set(theirs) - {n for n, *_ in first}))
            raise ValueError(f"models[{k}] differs from models[0] in {name!r}: every node must have the same architecture, dtype and device")
    return list(models)


def stack_params(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """name -> (N, *shape): every node's parameters, detached copies, in named_parameters order.

    Example:
        >>> import torch, dicekern as dk
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> {name: tuple(p.shape) for name, p in dk.stack_params(models).items()}
        {'weight': (4, 2, 3), 'bias': (4, 2)}
    """
    models = check_models(models)
    return {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name, _ in models[0].named_parameters()}


def stack_buffers(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """name -> (N, *shape): every node's buffers (BatchNorm running statistics, ...), detached copies."""
    models = check_models(models)
    return {name: torch.stack([dict(m.named_buffers())[name].detach() for m in models]) for name, _ in models[0].named_buffers()}


@torch.no_grad()
def mix_(models: Sequence[nn.Module], W: object, *, buffers: bool = False) -> None:
    """The gossip step, in place: theta_k <- sum_j W[k, j] theta_j for every node k at once.

    Args:
        models: node k's model is models[k].
        W: (N, N) row-stochastic, W[k, j] the weight node k gives node j (rows are receivers); a W
            of another float dtype than the models is cast to theirs, as ``record()`` casts it.
        buffers: also mix the floating-point buffers (a trainer that averages ``state_dict()``);
            integer buffers (BatchNorm's num_batches_tracked) stay at their node.

    Example:
        >>> import torch, dicekern as dk
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> dk.mix_(models, dk.topology.complete(4))
        >>> torch.equal(models[0].weight, models[3].weight)
        True
    """
    models = check_models(models)
    stacked = stack_params(models)
    if buffers:
        stacked.update({name: value for name, value in stack_buffers(models).items() if value.is_floating_point()})
    like = next(iter(stacked.values()), None)
    if like is None:
        return
    W = check_mixing("W", W, len(models), like)
    targets = [{**dict(model.named_parameters()), **dict(model.named_buffers())} for model in models]
    for name, values in stacked.items():
        for target, value in zip(targets, torch.einsum("kj,j...->k...", W, values)):
            target[name].copy_(value)


def from_live_models(
    params: object, has_batch: bool, lr: object, state: object, buffers: object, optimizers: object, spec: OptimizerSpec,
) -> tuple[object, object, object, object]:
    """``record()``'s params, lr, state and buffers, read from live models and their torch optimizers.

    params may be the per-node models (stacked here, buffers too when they have any) or already
    stacked tensors. With optimizers, lr (only for a round with a batch) and state default to what
    they hold; their spec must be the recorder's. Returns (params, lr, state, buffers) stacked.
    """
    live = isinstance(params, Sequence) and not isinstance(params, str) and all(isinstance(m, nn.Module) for m in params)
    if not live and not isinstance(params, Mapping):
        what = type(params).__name__
        if isinstance(params, Sequence) and not isinstance(params, str):
            what += " of " + ", ".join(sorted({type(m).__name__ for m in params}))
        raise TypeError(f"params must be a mapping name -> Tensor (N, *shape) or the per-node models, got {what}")
    models = check_models(params) if live else None
    if live and buffers is None and next(models[0].buffers(), None) is not None:
        buffers = stack_buffers(models)
    if optimizers is None:
        return (stack_params(models) if live else params), lr, state, buffers
    if not live:
        raise ValueError("optimizers= reads each node's optimizer state by its model's parameters: pass the live models as params")
    given = spec_of(optimizers)
    if given != spec:
        raise ValueError(f"the given optimizers are {given}, but this recorder replays {spec}: build the Recorder with optimizer=opts")
    if lr is None and has_batch:
        lr = stack_lr(optimizers)
    if state is None:
        state = stack_state(optimizers, models)
    return stack_params(models), lr, state, buffers
