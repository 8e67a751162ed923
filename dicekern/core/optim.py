"""Optimizer specs: torch.optim's SGD, Adam and AdamW as functional steps batched over nodes.

A spec is the hyper-parameters of a node's local update O_k (DICE.md, "Any optimizer"); the
learning rate is recorded per round (and may differ per node). Its state is a dict of stacked
tensors: float blocks (N, D) that a perturbation can move (momentum buffer, Adam's moments), and
per-node counters (N,) that it cannot (SGD's "has a buffer yet", Adam's step count).

Each spec gives the update and its linearisation at a point: ``tangent`` (the Jacobian of the step
in (theta, blocks, grad) applied to a perturbation) and ``cotangent`` (its transpose). Every
update is elementwise in the D coordinates, so both are a few tensor operations.

Example:
    >>> import torch, dicekern as dk
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> dk.optim.from_torch(opt)
    SGD(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

State = dict[str, torch.Tensor]  # block name -> (N, D), counter name -> (N,)


def per_node(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-node values shaped to broadcast against like (N, ...)."""
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


def _check_float(name: str, value: object, low: float, high: float, *, closed_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value < high or (closed_high and value == high)):
        raise ValueError(f"{name} must lie in [{low}, {high}{']' if closed_high else ')'}, got {value}")
    return value


class OptimizerSpec:
    """Base of the specs: names of the state's parts and the checks every spec shares."""

    kind: ClassVar[str]

    @property
    def state_blocks(self) -> tuple[str, ...]:
        """Names of the float (N, D) state that a perturbation moves."""
        return ()

    @property
    def state_counters(self) -> tuple[str, ...]:
        """Names of the (N,) integer or bool state that no perturbation moves."""
        return ()

    @property
    def stateless(self) -> bool:
        return not self.state_blocks

    @property
    def is_plain_sgd(self) -> bool:
        """theta' = theta - lr grad: the optimizer of the paper's analysis (and of the fused kernels)."""
        return False

    @property
    def linearization_reads_grad(self) -> bool:
        """Whether the step's Jacobian depends on the gradient (not for SGD, whose step is linear)."""
        return True

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def initial_state(self, num_nodes: int, dim: int, like: torch.Tensor) -> State:
        """The state of fresh torch optimizers (no step taken yet) for N nodes of D parameters."""
        state = {name: like.new_zeros(num_nodes, dim) for name in self.state_blocks}
        state.update({name: torch.zeros(num_nodes, dtype=self._counter_dtype(name), device=like.device) for name in self.state_counters})
        return state

    def check_state(self, state: object, num_nodes: int, like: torch.Tensor, *, where: str = "state") -> State:
        """A validated copy of a stacked state in like's dtype and device (None for a stateless spec)."""
        if self.stateless and state is None:
            return {}
        if state is None:
            raise ValueError(
                f"{where} is missing: {self} keeps optimizer state; pass the state at the start of the round, "
                f"e.g. dk.optim.stack_state(optimizers, models), or spec.initial_state(N, D, params) before the first step"
            )
        if not isinstance(state, Mapping):
            raise TypeError(f"{where} must be a mapping name -> Tensor, got {type(state).__name__}")
        expected = set(self.state_blocks) | set(self.state_counters)
        if set(state) != expected:
            raise ValueError(
                f"{where} of {self} must have exactly the keys {sorted(expected)}, got {sorted(state)}: "
                f"is {self} the optimizer the run uses?"
            )
        checked: State = {}
        for name in self.state_blocks:
            block = state[name]
            if not isinstance(block, torch.Tensor) or not block.is_floating_point():
                raise TypeError(f"{where}[{name!r}] must be a floating-point tensor (N, D)")
            if tuple(block.shape) != (num_nodes, like.shape[-1]):
                raise ValueError(f"{where}[{name!r}] must have shape (N, D) = ({num_nodes}, {like.shape[-1]}), got {tuple(block.shape)}")
            if not torch.isfinite(block).all():
                raise ValueError(f"{where}[{name!r}] contains NaN or infinite values")
            checked[name] = block.detach().to(dtype=like.dtype, device=like.device, copy=True)
        for name in self.state_counters:
            counter = state[name]
            dtype = self._counter_dtype(name)
            if not isinstance(counter, torch.Tensor) or counter.is_floating_point() or counter.is_complex():
                raise TypeError(f"{where}[{name!r}] must be an integer or bool tensor (N,)")
            if tuple(counter.shape) != (num_nodes,):
                raise ValueError(f"{where}[{name!r}] must have shape (N,) = ({num_nodes},), got {tuple(counter.shape)}")
            if dtype != torch.bool and (counter < 0).any():
                raise ValueError(f"{where}[{name!r}] must be >= 0")
            checked[name] = counter.detach().to(dtype=dtype, device=like.device, copy=True)
        return checked

    def _counter_dtype(self, name: str) -> torch.dtype:
        return torch.int64


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """torch.optim.SGD: g~ = g + wd theta; buf = g~ (first step) or mu buf + (1 - dampening) g~;
    d = g~ + mu buf (nesterov) or buf (or g~ without momentum); theta' = theta - lr d."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    kind: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_float("momentum", self.momentum, 0.0, math.inf))
        object.__setattr__(self, "dampening", _check_float("dampening", self.dampening, 0.0, 1.0, closed_high=True))
        object.__setattr__(self, "weight_decay", _check_float("weight_decay", self.weight_decay, 0.0, math.inf))
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(self.nesterov).__name__}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")

    @property
    def state_blocks(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    @property
    def state_counters(self) -> tuple[str, ...]:
        return ("has_buffer",) if self.momentum else ()

    @property
    def is_plain_sgd(self) -> bool:
        return self.momentum == 0 and self.weight_decay == 0

    @property
    def linearization_reads_grad(self) -> bool:
        return False

    def _counter_dtype(self, name: str) -> torch.dtype:
        return torch.bool

    def update(self, theta: torch.Tensor, state: State, grad: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, State]:
        """(theta^{t+1/2}, state^{t+1}): theta, grad and blocks (N, ...), lr and counters (N,)."""
        g = grad.add(theta, alpha=self.weight_decay) if self.weight_decay else grad
        if not self.momentum:
            return theta - per_node(lr, theta) * g, {}
        has = per_node(state["has_buffer"], theta)
        buf = torch.where(has, state["momentum_buffer"].mul(self.momentum).add(g, alpha=1 - self.dampening), g)
        d = g.add(buf, alpha=self.momentum) if self.nesterov else buf
        return theta - per_node(lr, theta) * d, {"momentum_buffer": buf, "has_buffer": torch.ones_like(state["has_buffer"])}

    def linearize(self, theta: torch.Tensor, state: State, grad: torch.Tensor | None, lr: torch.Tensor) -> SGDLinearization:
        return SGDLinearization(self, per_node(lr, theta), per_node(state["has_buffer"], theta) if self.momentum else None)


@dataclass(frozen=True)
class SGDLinearization:
    """The (constant) Jacobian of an SGD step; lr and has_buffer broadcast against the vectors."""

    spec: SGD
    lr: torch.Tensor
    has_buffer: torch.Tensor | None

    def tangent(self, d_theta: torch.Tensor, d_blocks: State, d_grad: torch.Tensor) -> tuple[torch.Tensor, State]:
        s = self.spec
        d_g = d_grad + s.weight_decay * d_theta if s.weight_decay else d_grad
        blocks: State = {}
        if s.momentum:
            d_buf = torch.where(self.has_buffer, s.momentum * d_blocks["momentum_buffer"] + (1 - s.dampening) * d_g, d_g)
            blocks["momentum_buffer"] = d_buf
            d_g = d_g + s.momentum * d_buf if s.nesterov else d_buf
        return d_theta - self.lr * d_g, blocks

    def cotangent(self, c_theta: torch.Tensor, c_blocks: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        """(c_theta, c_blocks, c_grad) of the inputs from cotangents of the outputs."""
        s = self.spec
        c_step = -self.lr * c_theta  # on d, the direction theta moves along
        blocks: State = {}
        if s.momentum:
            c_buf = c_blocks["momentum_buffer"] + (s.momentum * c_step if s.nesterov else c_step)
            c_g = (c_step if s.nesterov else 0.0) + torch.where(self.has_buffer, (1 - s.dampening) * c_buf, c_buf)
            blocks["momentum_buffer"] = torch.where(self.has_buffer, s.momentum * c_buf, torch.zeros_like(c_buf))
        else:
            c_g = c_step
        c_theta_in = c_theta + s.weight_decay * c_g if s.weight_decay else c_theta
        return c_theta_in, blocks, c_g


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """torch.optim.Adam: c += 1; g~ = g + wd theta; m = lerp(m, g~, 1 - b1); v = b2 v + (1 - b2) g~^2;
    theta' = theta - lr/(1 - b1^c) m / (sqrt(v) / sqrt(1 - b2^c) + eps)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    kind: ClassVar[str] = "adam"
    decoupled: ClassVar[bool] = False  # AdamW: theta <- theta (1 - lr wd) first, and g~ = g

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        betas = tuple(_check_float(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(self.betas))
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "eps", _check_float("eps", self.eps, 0.0, math.inf))
        if self.eps == 0:
            raise ValueError("eps must be > 0: with eps = 0 the step divides by zero where a gradient has always been 0")
        object.__setattr__(self, "weight_decay", _check_float("weight_decay", self.weight_decay, 0.0, math.inf))

    @property
    def state_blocks(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @property
    def state_counters(self) -> tuple[str, ...]:
        return ("step",)

    def _bias_corrections(self, step: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - b1^c, sqrt(1 - b2^c)) at c = step + 1, in float64 as torch.optim computes them, shaped like like."""
        c = (step + 1).to(torch.float64)
        b1, b2 = self.betas
        first = 1 - torch.pow(b1, c)
        second = (1 - torch.pow(b2, c)) ** 0.5
        return per_node(first.to(like.dtype), like), per_node(second.to(like.dtype), like)

    def _decayed(self, theta: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return theta * (1 - lr * self.weight_decay) if self.decoupled and self.weight_decay else theta

    def _effective_grad(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.add(theta, alpha=self.weight_decay) if self.weight_decay and not self.decoupled else grad

    def _moments(self, theta: torch.Tensor, state: State, grad: torch.Tensor, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """The quantities of one step that its value and its linearisation share."""
        lr = per_node(lr, theta)
        g = self._effective_grad(theta, grad)
        m = state["exp_avg"].lerp(g, 1 - self.betas[0])
        v = state["exp_avg_sq"].mul(self.betas[1]).addcmul(g, g, value=1 - self.betas[1])
        first, second = self._bias_corrections(state["step"], theta)
        root = v.sqrt()
        return dict(lr=lr, g=g, m=m, v=v, step_size=lr / first, second=second, root=root, denom=root / second + self.eps)

    def update(self, theta: torch.Tensor, state: State, grad: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, State]:
        q = self._moments(theta, state, grad, lr)
        theta = self._decayed(theta, q["lr"]) - q["step_size"] * q["m"] / q["denom"]
        return theta, {"exp_avg": q["m"], "exp_avg_sq": q["v"], "step": state["step"] + 1}

    def linearize(self, theta: torch.Tensor, state: State, grad: torch.Tensor, lr: torch.Tensor) -> AdamLinearization:
        q = self._moments(theta, state, grad, lr)
        root = q["root"]
        # d sqrt(v) = dv / (2 sqrt v), taken as 0 where v = 0 (a coordinate whose gradient was always 0)
        half_inv_root = torch.where(root > 0, 0.5 / torch.where(root > 0, root, 1), 0)
        return AdamLinearization(self, q["lr"], q["step_size"], q["second"], q["g"], q["m"], q["denom"], half_inv_root)


@dataclass(frozen=True)
class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, theta <- theta (1 - lr wd) before the step."""

    weight_decay: float = 1e-2

    kind: ClassVar[str] = "adamw"
    decoupled: ClassVar[bool] = True


@dataclass(frozen=True)
class AdamLinearization:
    """The Jacobian of an Adam step at one point; every tensor broadcasts against the vectors."""

    spec: Adam
    lr: torch.Tensor
    step_size: torch.Tensor  # lr / (1 - b1^c)
    second: torch.Tensor  # sqrt(1 - b2^c)
    g: torch.Tensor  # the effective gradient g~
    m: torch.Tensor  # the new first moment
    denom: torch.Tensor  # sqrt(v) / second + eps
    half_inv_root: torch.Tensor  # 1 / (2 sqrt(v)), 0 where v = 0

    @property
    def _decay(self) -> torch.Tensor | float:
        s = self.spec
        return 1 - self.lr * s.weight_decay if s.decoupled and s.weight_decay else 1.0

    def tangent(self, d_theta: torch.Tensor, d_blocks: State, d_grad: torch.Tensor) -> tuple[torch.Tensor, State]:
        s = self.spec
        b1, b2 = s.betas
        d_g = d_grad + s.weight_decay * d_theta if s.weight_decay and not s.decoupled else d_grad
        d_m = b1 * d_blocks["exp_avg"] + (1 - b1) * d_g
        d_v = b2 * d_blocks["exp_avg_sq"] + (2 * (1 - b2)) * self.g * d_g
        d_denom = d_v * self.half_inv_root / self.second
        d_theta_out = self._decay * d_theta - self.step_size * (d_m - self.m * d_denom / self.denom) / self.denom
        return d_theta_out, {"exp_avg": d_m, "exp_avg_sq": d_v}

    def cotangent(self, c_theta: torch.Tensor, c_blocks: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        s = self.spec
        b1, b2 = s.betas
        c_ratio = -self.step_size * c_theta / self.denom  # on m / denom, per unit of m
        c_m = c_blocks["exp_avg"] + c_ratio
        c_v = c_blocks["exp_avg_sq"] - c_ratio * self.m / self.denom * self.half_inv_root / self.second
        c_g = (1 - b1) * c_m + (2 * (1 - b2)) * self.g * c_v
        c_theta_in = self._decay * c_theta
        if s.weight_decay and not s.decoupled:
            c_theta_in = c_theta_in + s.weight_decay * c_g
        return c_theta_in, {"exp_avg": b1 * c_m, "exp_avg_sq": b2 * c_v}, c_g


SPECS: dict[str, type[OptimizerSpec]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def spec_from_dict(data: object) -> OptimizerSpec:
    """The spec that ``spec.to_dict()`` wrote (a saved run's manifest)."""
    if not isinstance(data, Mapping) or data.get("kind") not in SPECS:
        raise ValueError(f"an optimizer spec must be a mapping with kind in {sorted(SPECS)}, got {data!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if "betas" in fields and isinstance(fields["betas"], list):
        fields["betas"] = tuple(fields["betas"])
    try:
        return SPECS[data["kind"]](**fields)
    except TypeError as error:
        raise ValueError(f"optimizer spec {data!r} is malformed: {error}") from None


def check_lr(lr: object, num_nodes: int, like: torch.Tensor, *, where: str = "lr") -> torch.Tensor:
    """(N,) learning rates in like's dtype from a number, a numpy scalar, a 0-d or (N,) tensor or array."""
    if isinstance(lr, bool) or lr is None:
        raise TypeError(f"{where} must be a non-negative number or an (N,) tensor of them, got {lr!r}")
    if isinstance(lr, (int, float, np.integer, np.floating)):
        values = torch.tensor(float(lr), dtype=torch.float64)
    elif isinstance(lr, (torch.Tensor, np.ndarray, list, tuple)):
        values = torch.as_tensor(np.asarray(lr) if isinstance(lr, (list, tuple)) else lr)
        if values.dtype == torch.bool or not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{where} must hold real numbers, got dtype {values.dtype}")
        values = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise TypeError(f"{where} must be a non-negative number or an (N,) tensor of them, got {type(lr).__name__}")
    if values.dim() > 1 or (values.dim() == 1 and values.shape[0] != num_nodes):
        raise ValueError(f"{where} must be a scalar or have shape (N,) = ({num_nodes},), got {tuple(values.shape)}")
    if not (torch.isfinite(values) & (values >= 0)).all():
        raise ValueError(f"{where} must be non-negative and finite, got {values.tolist()}")
    return values.expand(num_nodes).to(dtype=like.dtype, device=like.device).clone()


# ---- torch.optim ----

_REFUSED = {"maximize": "maximize=True", "differentiable": "differentiable=True", "amsgrad": "amsgrad=True"}


def from_torch(optimizer: object) -> OptimizerSpec:
    """The spec of a torch.optim.SGD, Adam or AdamW instance, or a ValueError naming what it cannot replay.

    Refused: other optimizer classes (subclasses too), amsgrad, maximize, differentiable, and param
    groups whose hyper-parameters (lr included) differ.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = type(optimizer)
    if cls not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(f"dicekern replays torch.optim.SGD, Adam and AdamW exactly; {cls.__module__}.{cls.__qualname__} is not supported")
    groups = optimizer.param_groups
    settings = [{k: _plain(v) for k, v in g.items() if k not in ("params", "param_names")} for g in groups]
    for key in settings[0]:
        values = {repr(s.get(key)) for s in settings}
        if len(values) > 1:
            raise ValueError(f"the optimizer's {len(groups)} param groups differ in {key!r} ({sorted(values)}): dicekern replays one setting per node")
    group = settings[0]
    for key, text in _REFUSED.items():
        if group.get(key):
            raise ValueError(f"{cls.__name__}({text}) cannot be replayed exactly by dicekern")
    if cls is torch.optim.SGD:
        return SGD(group["momentum"], group["dampening"], bool(group["nesterov"]), group["weight_decay"])
    spec = AdamW if cls is torch.optim.AdamW or group.get("decoupled_weight_decay") else Adam
    return spec(tuple(group["betas"]), group["eps"], group["weight_decay"])


def _plain(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def spec_of(optimizer: object) -> OptimizerSpec:
    """A spec from a spec, a torch.optim optimizer, or the per-node torch optimizers (all of one spec)."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if isinstance(optimizer, Sequence) and not isinstance(optimizer, str):
        if not optimizer:
            raise ValueError("optimizer is an empty sequence: give one torch optimizer per node")
        specs = [from_torch(opt) for opt in optimizer]
        if any(s != specs[0] for s in specs):
            raise ValueError(f"the nodes' optimizers differ: {sorted({str(s) for s in specs})}")
        return specs[0]
    return from_torch(optimizer)


def stack_lr(optimizers: Sequence[torch.optim.Optimizer]) -> torch.Tensor:
    """(N,) float64 learning rates of per-node torch optimizers (their first param group)."""
    return torch.tensor([float(_plain(opt.param_groups[0]["lr"])) for opt in optimizers], dtype=torch.float64)


def stack_state(optimizers: Sequence[torch.optim.Optimizer], models: Sequence[nn.Module]) -> State:
    """The stacked state of per-node torch optimizers, as ``Recorder.record(state=...)`` takes it.

    Args:
        optimizers: node k's torch.optim optimizer, all of one spec.
        models: node k's model; its named_parameters order is the flat layout D.

    Returns:
        blocks (N, D) in the models' dtype (zeros before the first step) and counters (N,):
        SGD with momentum {"momentum_buffer", "has_buffer"}, Adam/AdamW {"exp_avg", "exp_avg_sq",
        "step"}, plain SGD {}.
    """
    if len(optimizers) != len(models) or not optimizers:
        raise ValueError(f"give one optimizer per model: {len(optimizers)} optimizers, {len(models)} models")
    spec = spec_of(list(optimizers))
    rows: list[State] = []
    for k, (opt, model) in enumerate(zip(optimizers, models)):
        owned = {id(p) for group in opt.param_groups for p in group["params"]}
        named = list(model.named_parameters())
        missing = [name for name, p in named if id(p) not in owned]
        if missing:
            raise ValueError(f"parameters {missing} of model {k} are not in optimizer {k}: dicekern replays every parameter")
        states = [opt.state.get(p, {}) for _, p in named]
        rows.append(_node_state(spec, states, named, k))
    return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}


def _node_state(spec: OptimizerSpec, states: list[dict], named: list[tuple[str, nn.Parameter]], node: int) -> State:
    """One node's flat state (blocks (D,), counters ()) from torch.optim's per-parameter state."""
    flat = lambda key: torch.cat([s[key].detach().reshape(-1) if key in s else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                                  for s, (_, p) in zip(states, named)])
    started = [bool(s) and all(b in s for b in spec.state_blocks) for s in states]
    if any(started) and not all(started):
        fresh = [name for (name, _), on in zip(named, started) if not on]
        raise ValueError(f"optimizer {node} has state for some parameters but not for {fresh} (a parameter without a gradient in an earlier step?)")
    row = {name: flat(name) for name in spec.state_blocks}
    if isinstance(spec, SGD) and spec.momentum:
        row["has_buffer"] = torch.tensor(all(started))
    elif isinstance(spec, Adam):
        steps = {float(_plain(s["step"])) for s in states if "step" in s} or {0.0}
        if len(steps) != 1 or not float(next(iter(steps))).is_integer():
            raise ValueError(f"optimizer {node}'s parameters are at different steps {sorted(steps)}")
        row["step"] = torch.tensor(int(next(iter(steps))))
    return row
