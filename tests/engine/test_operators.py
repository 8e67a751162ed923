"""The chain's linear operators: every adjoint passes the dot-product test <A x, y> = <x, A^T y>,
products transpose in reverse order, and each operator equals a dense matrix built independently."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn
from torch.func import jacrev

import dicekern as dk
from conftest import TOL, assert_close, cross_entropy, random_mixing, random_run
from dicekern.curvature.closed_form import ClosedFormBackend
from dicekern.engine.mixing import TorchMixer
from dicekern.engine.operators import Adjoint, LinearOperator, Mix, Product, StepJacobian
from dicekern.engine.step import LocalStep

N, ROUNDS, COLUMNS = 5, 4, 3
ADJOINT_RTOL = 1e-12  # float64, of |<A x, y>|

MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)),
    "layernorm": lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)),
    "conv1d": lambda: nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, kernel_size=2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)),
}
OPTIMIZERS = {
    "sgd": (dk.optim.SGD(), 0.2),
    "nesterov-wd": (dk.optim.SGD(momentum=0.9, nesterov=True, weight_decay=0.05), 0.1),
    "adam": (dk.optim.Adam(), 0.02),
    "adamw": (dk.optim.AdamW(weight_decay=0.05), 0.02),
}


@cache
def recorded(model: str, optimizer: str, mix_state: bool = False, closed_form: bool = False) -> dk.Trajectory:
    """A run of ROUNDS rounds at N nodes; closed_form: with a loss of dk.losses, which that backend needs."""
    spec, lr = OPTIMIZERS[optimizer]
    loss_fn = dk.losses.softmax_cross_entropy if closed_form else cross_entropy
    return random_run(N, ROUNDS, seed=7, model=MODELS[model](), optimizer=spec, lr=lr, mix_state=mix_state, loss_fn=loss_fn).trajectory


def local_step(traj: dk.Trajectory, t: int, curvature: str, backend: str = "torch") -> LocalStep:
    r = traj[t]
    objective = traj.objective if backend == "torch" else ClosedFormBackend(traj.objective.model, traj.objective.loss_fn)
    return LocalStep(objective, traj.optimizer, r.params, r.inputs, r.targets, r.lr, r.state, curvature)


def chain_vectors(step: LocalStep, generator: torch.Generator, columns: int = COLUMNS) -> torch.Tensor:
    """Fresh random (N, C, S, D) vectors in the step's dtype."""
    n, dim = step.params.shape
    return torch.randn(n, columns, step.num_blocks, dim, generator=generator, dtype=step.params.dtype)


def assert_adjoint(op: LinearOperator, x: torch.Tensor, y: torch.Tensor) -> None:
    """<A x, y> = <x, A^T y> to ADJOINT_RTOL, and the same through ``A(x)`` and ``A.adjoint()``."""
    forward, backward = (op @ x).mul(y).sum(), x.mul(op.T @ y).sum()
    assert abs(forward - backward) <= ADJOINT_RTOL * abs(forward), (forward.item(), backward.item())
    assert torch.equal(op(x), op @ x) and torch.equal(op.adjoint()(y), op.T @ y)


def dense(op: LinearOperator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The matrix of op on (N, S, D) vectors, (N S D, N S D), column by column: op applied to every
    unit vector, the unit vectors passed at once as the chain's columns."""
    size = torch.Size(shape).numel()
    units = torch.eye(size, dtype=like.dtype).view(size, *shape).transpose(0, 1)  # (N, size, S, D)
    return (op @ units).transpose(0, 1).reshape(size, size).T


def reference_jacobian(step: LocalStep) -> torch.Tensor:
    """(N S D, N S D): the Jacobian of the real local step x -> O(x, g(theta)) by torch.func (block
    diagonal over nodes), with the gradient's dependence on theta (the exact Hessian)."""
    n, dim = step.params.shape
    names, counters = step.optimizer.state_blocks, {k: v for k, v in step.state.items() if k not in step.optimizer.state_blocks}
    weights = torch.full((n, step.batch_size), 1 / step.batch_size, dtype=step.params.dtype)

    def update(x: torch.Tensor) -> torch.Tensor:
        theta = x[:, 0]
        grads = step.backend.node_grads(theta, step.inputs, step.targets, weights)
        new_theta, new_state = step.optimizer.update(theta, {**counters, **dict(zip(names, x[:, 1:].unbind(1)))}, grads, step.lr)
        return torch.stack([new_theta] + [new_state[name] for name in names], dim=1)

    point = torch.stack([step.params] + [step.state[name] for name in names], dim=1)  # (N, S, D)
    return jacrev(update)(point).reshape(point.numel(), point.numel())


def mixing_matrix(W: torch.Tensor, blocks: int, dim: int, mix_state: bool) -> torch.Tensor:
    """(N S D, N S D): W on the node axis of the theta block (of every block with mix_state)."""
    mixed = torch.zeros(blocks, blocks, dtype=W.dtype)
    mixed.diagonal()[: blocks if mix_state else 1] = 1
    kept = torch.eye(blocks, dtype=W.dtype) - mixed
    eye = torch.eye(dim, dtype=W.dtype)
    return torch.kron(W, torch.kron(mixed, eye)) + torch.kron(torch.eye(len(W), dtype=W.dtype), torch.kron(kept, eye))


# ---- the step Jacobian ----

STEP_CASES = [
    pytest.param(model, optimizer, curvature, backend, id=f"{model}-{optimizer}-{curvature}-{backend}-N{N}")
    for model in MODELS for optimizer in OPTIMIZERS for curvature in ("exact", "ggn") for backend in ("torch",)
] + [
    pytest.param("mlp", optimizer, curvature, "closed_form", id=f"mlp-{optimizer}-{curvature}-closed_form-N{N}")
    for optimizer in ("sgd", "adam") for curvature in ("exact", "ggn")
]


@pytest.mark.parametrize("model, optimizer, curvature, backend", STEP_CASES)
def test_step_jacobian_adjoint(model: str, optimizer: str, curvature: str, backend: str) -> None:
    """At the first round (no momentum buffer yet, Adam's first step) and a later one."""
    generator = torch.Generator().manual_seed(20)
    traj = recorded(model, optimizer, closed_form=backend == "closed_form")
    for t in (0, ROUNDS - 1):
        step = local_step(traj, t, curvature, backend)
        J = StepJacobian(step)
        assert_adjoint(J, chain_vectors(step, generator), chain_vectors(step, generator))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_step_jacobian_is_the_jacobian_of_the_local_step(optimizer: str) -> None:
    """J and J^T built column by column equal torch.func's Jacobian of the replayed step and its transpose."""
    step = local_step(recorded("mlp", optimizer), ROUNDS - 1, "exact")
    shape = (N, step.num_blocks, step.params.shape[1])
    expected = reference_jacobian(step)
    J = StepJacobian(step)
    assert_close(dense(J, shape, step.params), expected, TOL[torch.float64].op)
    assert_close(dense(J.T, shape, step.params), expected.T, TOL[torch.float64].op)


def test_curvature_products_skip_zero_rows_and_none() -> None:
    """Nodes a perturbation has not reached get exact zeros without a backend call on them; the
    other rows equal the backend's products on every row; curvature "none" is zero, so plain SGD's J is I."""
    generator = torch.Generator().manual_seed(21)
    traj = recorded("mlp", "adam")
    step = local_step(traj, 1, "exact")
    vectors = chain_vectors(step, generator)[:, :, 0]
    vectors[[1, 3]] = 0
    calls = []
    objective = step.backend

    class Counting:
        def curvature_products(self, params, inputs, targets, vectors, kind):
            calls.append(len(params))
            return objective.curvature_products(params, inputs, targets, vectors, kind)

    step.backend = Counting()
    products = step.curvature_products(vectors)
    assert calls == [N - 2] and torch.equal(products[[1, 3]], torch.zeros_like(products[[1, 3]]))
    every_row = objective.curvature_products(step.params, step.inputs, step.targets, vectors, "exact")
    assert_close(products, every_row, TOL[torch.float64].same)
    sgd = local_step(recorded("mlp", "sgd"), 1, "none")
    x = chain_vectors(sgd, generator)
    assert torch.equal(sgd.curvature_products(x[:, :, 0]), torch.zeros_like(x[:, :, 0]))
    assert torch.equal(StepJacobian(sgd) @ x, x) and torch.equal(StepJacobian(sgd).T @ x, x)


# ---- the mix ----

@pytest.mark.parametrize("mix_state", [False, True], ids=["theta-only", "all-blocks"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_mix_adjoint(mix_state: bool, blocks: int) -> None:
    generator = torch.Generator().manual_seed(22)
    Ws = [random_mixing(N, generator) for _ in range(2)]
    assert not torch.allclose(Ws[0], Ws[0].T)  # directed
    dim = 4
    x, y = (torch.randn(N, COLUMNS, blocks, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    for index, W in enumerate(Ws):
        mix = Mix(TorchMixer(Ws), index, mix_state=mix_state)
        assert_adjoint(mix, x, y)
        expected = mixing_matrix(W, blocks, dim, mix_state)
        assert_close(dense(mix, (N, blocks, dim), x), expected, TOL[torch.float64].same)
        assert_close(dense(mix.T, (N, blocks, dim), x), expected.T, TOL[torch.float64].same)


# ---- hops and their products ----

def hops(traj: dk.Trajectory, curvature_at: str, curvature: str = "exact") -> list[LinearOperator]:
    """The hop of every recorded round, as the chain builds them: the mix alone first, then
    Mix @ J (sender) or J @ Mix (receiver)."""
    mixer = TorchMixer([traj[t].W for t in range(ROUNDS)])
    mixes = [Mix(mixer, t, mix_state=traj.mix_state) for t in range(ROUNDS)]
    jacobians = [StepJacobian(local_step(traj, t, curvature)) for t in range(ROUNDS)]
    composed = [m @ J if curvature_at == "sender" else J @ m for m, J in zip(mixes, jacobians)]
    return [mixes[0], *composed[1:]]


HOP_CASES = [
    pytest.param("mlp", "sgd", False, "sender", id="mlp-sgd-sender"),
    pytest.param("mlp", "sgd", False, "receiver", id="mlp-sgd-receiver"),
    pytest.param("conv1d", "nesterov-wd", False, "sender", id="conv1d-nesterov-wd-sender"),
    pytest.param("layernorm", "adam", True, "sender", id="layernorm-adam-mix_state-sender"),
    pytest.param("mlp", "adamw", False, "sender", id="mlp-adamw-sender"),
]


@pytest.mark.parametrize("model, optimizer, mix_state, curvature_at", HOP_CASES)
def test_hop_and_product_of_hops_adjoint(model: str, optimizer: str, mix_state: bool, curvature_at: str) -> None:
    generator = torch.Generator().manual_seed(23)
    traj = recorded(model, optimizer, mix_state)
    like = local_step(traj, 0, "exact")
    every = hops(traj, curvature_at)
    for hop in every:
        assert_adjoint(hop, chain_vectors(like, generator), chain_vectors(like, generator))
    chain = every[3] @ every[2] @ every[1] @ every[0]
    assert isinstance(chain, Product) and len(chain.factors) == 7  # the mix, then three (Mix, J) pairs
    x, y = chain_vectors(like, generator), chain_vectors(like, generator)
    assert_adjoint(chain, x, y)
    assert torch.equal(chain @ x, every[3] @ (every[2] @ (every[1] @ (every[0] @ x))))
    assert torch.equal(chain.T @ y, every[0].T @ (every[1].T @ (every[2].T @ (every[3].T @ y))))
    assert torch.equal(Adjoint(chain) @ y, chain.T @ y) and torch.equal(Adjoint(chain).T @ x, chain @ x)


def test_transposed_product_is_the_reversed_product_of_transposes() -> None:
    """(A @ B).T = B.T @ A.T, applied as A.T first; A.T.T is A; the order matters here."""
    generator = torch.Generator().manual_seed(24)
    traj = recorded("mlp", "nesterov-wd")
    step = local_step(traj, 2, "exact")
    A, B = Mix(TorchMixer([traj[2].W]), 0, mix_state=False), StepJacobian(step)
    product = A @ B
    y = chain_vectors(step, generator)
    assert torch.equal(product.T @ y, B.T @ (A.T @ y))
    assert not torch.allclose(product.T @ y, A.T @ (B.T @ y))
    transposed = product.T
    assert isinstance(transposed, Product) and [type(f) for f in transposed.factors] == [Adjoint, Adjoint]
    assert transposed.factors[0].T is B and transposed.factors[1].T is A and A.T.T is A


def test_hop_is_the_dense_product_of_its_parts() -> None:
    """On N=3 with Adam: the sender hop built column by column equals the mixing matrix times
    torch.func's Jacobian of the step, and its transpose the transposed product."""
    spec, lr = OPTIMIZERS["adam"]
    traj = random_run(3, 3, seed=8, optimizer=spec, lr=lr).trajectory
    step = local_step(traj, 2, "exact")
    dim = step.params.shape[1]
    hop = Mix(TorchMixer([traj[2].W]), 0, mix_state=False) @ StepJacobian(step)
    expected = mixing_matrix(traj[2].W, step.num_blocks, dim, False) @ reference_jacobian(step)
    shape = (3, step.num_blocks, dim)
    assert_close(dense(hop, shape, step.params), expected, TOL[torch.float64].op)
    assert_close(dense(hop.T, shape, step.params), expected.T, TOL[torch.float64].op)
