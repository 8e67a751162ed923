"""Shared fixtures and helpers of the whole suite, imported by name (``from conftest import ...``):
small random gossip runs that are not powers of two, one tolerance table, saved runs and file checks.

The suite mirrors the package: ``tests/<folder>`` tests ``dicekern/<folder>`` (``tests/kernels``
tests ``kernels/`` and ``bindings/``; ``tests/contracts`` the layout). Markers (pytest.ini):
every test under ``tests/kernels`` is ``kernels`` and every test under ``tests/distributed`` is
``distributed`` (set here, by folder, in ``pytest_collection_modifyitems``); ``slow`` is set in
each module that has a slow test. ``make test-fast`` runs what is none of the three.

This is the only conftest.py: a second one would also be imported as ``conftest`` and shadow this
one for ``from conftest import ...``. ``run_factories`` sits beside it so that saved runs can name
``run_factories:...`` (this folder is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# One thread per process: the suite's tensors are tiny, and `make test` runs a pytest-xdist worker per
# core, some of whose tests start more processes (ranks, subprocesses). OpenMP threads that spin
# while the cores are taken made tests 10 to 50 times slower. Set before torch loads; children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen before
# triton is first imported (torch does not import it). Kernel tests build their tensors on DEVICE.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["DICEKERN_POISON_OUTPUTS"] = "1"  # kernel outputs start as NaN: an unwritten element fails
from torch import nn

import dicekern as dk
import run_factories
from dicekern.curvature.round import gossip_round

TESTS = Path(__file__).resolve().parent  # on sys.path: run_factories and this module import from here
ROOT = TESTS.parent  # the repository: README.md, benchmarks/

# every test under tests/<folder> carries the marker of its folder
FOLDER_MARKERS = {"kernels": "kernels", "distributed": "distributed"}
# under pytest-xdist's --dist loadgroup, the tests of these folders run one after another on one
# worker: each starts 2 to 4 processes of its own, and two at once would overcommit the cores
XDIST_GROUPS = {"distributed"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS in path.parents:
            folder = path.relative_to(TESTS).parts[0]
            if folder in FOLDER_MARKERS:
                item.add_marker(FOLDER_MARKERS[folder])
            if xdist and folder in XDIST_GROUPS:
                item.add_marker(pytest.mark.xdist_group(folder))

@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances of one dtype, each of the result's scale (see assert_close).

    Attributes:
        rounding: one formula against another implementation of it (dk.optim against torch.optim,
            a derived Jacobian against autograd's): a few units in the last place.
        same: the same numbers reached another way (a file round trip, a sum of parts): rounding only.
        op: one engine or kernel operation against its reference (no tf32: tl.dot runs "ieee").
        chain: a whole estimate against another engine, brute force or exact replay; float32
            scores are dot products that cancel, so they are held to the float64 result's scale.
    """

    rounding: float
    same: float
    op: float
    chain: float


# the one tolerance table of the suite
TOL = {
    torch.float64: Tolerance(rounding=1e-15, same=1e-12, op=1e-10, chain=1e-9),
    torch.float32: Tolerance(rounding=1e-6, same=1e-6, op=1e-5, chain=1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise |a - e| <= rtol * max|e|: relative to the result's scale, so exact zeros compare too."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale.item())


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def random_mixing(n: int, generator: torch.Generator, density: float = 0.4) -> torch.Tensor:
    """Directed random graph with self-loops and random positive row-stochastic weights."""
    pattern = (torch.rand(n, n, generator=generator) < density) | torch.eye(n, dtype=torch.bool)
    weights = torch.rand(n, n, generator=generator, dtype=torch.float64) + 0.1
    W = torch.where(pattern, weights, torch.zeros_like(weights))
    return W / W.sum(dim=1, keepdim=True)


def recast(traj: dk.Trajectory, test: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, device: str = "cpu"):
    """The same recorded values in another floating dtype and on device: (trajectory, test).

    Rounded float64 values are not a float32 run, so the recorder's replay check is off.
    """
    rec = dk.Recorder(traj.objective.model, traj.objective.loss_fn, optimizer=traj.optimizer, replay_check="off")
    cast = lambda t: (t.to(dtype) if t.is_floating_point() else t).to(device)
    for t in traj.steps:
        rnd = traj[t]
        params = {k: cast(v) for k, v in traj.params(t).items()}
        state = None if rnd.state is None else {k: cast(v) for k, v in rnd.state.items()}
        if rnd.has_batch:
            rec.record(t, params, cast(rnd.inputs), cast(rnd.targets), lr=cast(rnd.lr), W=cast(rnd.W), state=state)
        else:
            rec.record(t, params, state=state)
    return rec.trajectory(), (cast(test[0]), cast(test[1]))


def sgd_round(objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float, W: torch.Tensor) -> torch.Tensor:
    """theta^{t+1} of one plain-SGD gossip round with one learning rate for every node."""
    rates = torch.full((theta.shape[0],), lr, dtype=theta.dtype, device=theta.device)
    return gossip_round(objective, dk.optim.SGD(), theta, {}, x, y, rates, W)[1]


@dataclass
class RandomRun:
    trajectory: dk.Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    q: torch.Tensor


def random_run(
    n: int, rounds: int, *, seed: int, batch: int = 5, dtype: torch.dtype = torch.float64, model: nn.Module | None = None,
    optimizer: dk.optim.OptimizerSpec | None = None, lr: float = 0.2, mix_state: bool = False, loss_fn=cross_entropy,
    description: dk.RunDescription | None = None,
) -> RandomRun:
    """A recorded run on random data with a small tanh MLP and a fresh directed W every round.

    Every node takes ``optimizer``'s step (default plain SGD) with its own learning rate, drawn
    each round from [lr, 2.5 lr), from random (different) per-node starting points.
    """
    g = torch.Generator().manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    rec = dk.Recorder(model, loss_fn, optimizer=optimizer, mix_state=mix_state, replay_check="every", description=description)
    obj, spec = rec.objective, rec.optimizer
    theta = torch.randn(n, obj.layout.dim, generator=g, dtype=dtype)
    state = spec.initial_state(n, obj.layout.dim, theta)
    for t in range(rounds):
        x = torch.randn(n, batch, 3, generator=g, dtype=dtype)
        y = torch.randint(3, (n, batch), generator=g)
        W = random_mixing(n, g).to(dtype)
        rates = lr * (1 + 1.5 * torch.rand(n, generator=g, dtype=dtype))
        rec.record(t, obj.layout.unflatten(theta), x, y, lr=rates, W=W, state=state)
        _, theta, state, _ = gossip_round(obj, spec, theta, state, x, y, rates, W, mix_state=mix_state)
    rec.record(rounds, obj.layout.unflatten(theta), state=state)
    test = (torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(3, (6,), generator=g))
    q = torch.rand(n, generator=g, dtype=dtype) + 0.2
    return RandomRun(rec.trajectory(), test, q / q.sum())


@dataclass
class TorchOptimRun:
    """A run trained the way users train: one model and one torch.optim optimizer per node."""

    trajectory: dk.Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    q: torch.Tensor
    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]


def stacked_params(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name, _ in models[0].named_parameters()}


def torch_optim_steps(models, optimizers, x, y, lr, weights=None) -> None:
    """Each node steps its own optimizer on sum_b weights[k, b] loss_b (default the batch mean).
    A sample of weight 0 is left out of the forward, so a BatchNorm model's batch statistics are
    those of the batch without it (the removal DICE-GT replays)."""
    for k, (model, opt) in enumerate(zip(models, optimizers)):
        opt.param_groups[0]["lr"] = float(lr[k])
        opt.zero_grad()
        kept = slice(None) if weights is None else weights[k].ne(0)
        losses = cross_entropy(model(x[k][kept]), y[k][kept])
        (losses.mean() if weights is None else (weights[k][kept] * losses).sum()).backward()
        opt.step()


def torch_optim_gossip(models, optimizers, W, mix_state: bool = False) -> None:
    """theta_k <- sum_j W[k, j] theta_j in place (and every float optimizer state with mix_state)."""
    with torch.no_grad():
        named = [dict(m.named_parameters()) for m in models]
        for name in named[0]:
            tensors = [[named[k][name]] for k in range(len(models))]
            if mix_state:
                keys = [key for key, value in optimizers[0].state[named[0][name]].items() if key != "step"]
                for k in range(len(models)):
                    tensors[k] += [optimizers[k].state[named[k][name]][key] for key in keys]
            for i in range(len(tensors[0])):
                mixed = torch.einsum("kj,j...->k...", W, torch.stack([t[i] for t in tensors]))
                for k, t in enumerate(tensors):
                    t[i].copy_(mixed[k])


def torch_optim_run(
    make_optimizer, n: int = 4, rounds: int = 3, *, seed: int, batch: int = 5, lr: float = 0.1, declared: object = "same",
    replay_check: str = "every", dtype: torch.dtype = torch.float64, mix_state: bool = False,
) -> TorchOptimRun:
    """Per-node tanh MLPs stepped by make_optimizer(params), recorded with dk.optim.stack_state.

    declared: the recorder's optimizer ("same": the per-node torch optimizers themselves).
    mix_state: the run gossips the optimizer state too.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype) for _ in range(n)]
    optimizers = [make_optimizer(m.parameters()) for m in models]
    with_state = declared == "same" or not declared.stateless
    rec = dk.Recorder(models[0], cross_entropy, optimizer=optimizers if declared == "same" else declared, replay_check=replay_check,
                      mix_state=mix_state)
    state = lambda: dk.optim.stack_state(optimizers, models) if with_state else None
    for t in range(rounds):
        x = torch.randn(n, batch, 3, generator=g, dtype=dtype)
        y = torch.randint(3, (n, batch), generator=g)
        W = random_mixing(n, g).to(dtype)
        rates = lr * (1 + torch.rand(n, generator=g, dtype=dtype))
        rec.record(t, stacked_params(models), x, y, lr=rates, W=W, state=state())
        torch_optim_steps(models, optimizers, x, y, rates)
        torch_optim_gossip(models, optimizers, W, mix_state)
    rec.record(rounds, stacked_params(models), state=state())
    test = (torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(3, (6,), generator=g))
    q = torch.rand(n, generator=g, dtype=dtype) + 0.2
    return TorchOptimRun(rec.trajectory(), test, q / q.sum(), models, optimizers)


@pytest.fixture(scope="session")
def digits_run() -> dk.examples.DigitsRun:
    """The issue's setting: 16 nodes, exponential graph, tanh MLP, lr 0.1, float64."""
    return dk.examples.digits_run(num_nodes=16, rounds=6, batch_size=8, lr=0.1, graph="exponential")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    """path holds a non-empty PNG picture."""
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(path: Path) -> Path:
    """The folder a saved trajectory's pointer names."""
    return path / json.loads((path / "CURRENT").read_text())["snapshot"]


def republish(path: Path, manifest: dict | None = None, raw: bytes | None = None) -> None:
    """Rewrite a saved trajectory's manifest and the pointer's checksum, as a forger who knows the format would."""
    data = raw if raw is not None else json.dumps(manifest).encode()
    (snapshot(path) / "manifest.json").write_bytes(data)
    pointer = json.loads((path / "CURRENT").read_text())
    pointer["sha256"] = hashlib.sha256(data).hexdigest()
    (path / "CURRENT").write_text(json.dumps(pointer))


MLP = dict(inputs=3, hidden=4, classes=3)  # random_run's model, as run_factories.tanh_mlp's arguments
DESCRIPTION = dk.RunDescription("run_factories:tanh_mlp", MLP, metadata={"topology": "random directed", "seed": 5})


def described_run(**kwargs) -> RandomRun:
    """random_run's run, recorded with DESCRIPTION: a saved copy rebuilds its own model."""
    return random_run(5, rounds=5, seed=5, model=run_factories.tanh_mlp(**MLP), loss_fn=dk.losses.softmax_cross_entropy,
                      description=DESCRIPTION, **kwargs)


@pytest.fixture
def described_saved(tmp_path) -> tuple[RandomRun, Path, Path]:
    """A described run saved to tmp_path/run and its test set written to tmp_path/test.safetensors."""
    from safetensors.torch import save_file

    run = described_run()
    run.trajectory.save(tmp_path / "run")
    save_file({"inputs": run.test[0], "targets": run.test[1]}, tmp_path / "test.safetensors")
    return run, tmp_path / "run", tmp_path / "test.safetensors"


# ---- per-node torch modules and optimizers recorded live, and the two replay oracles of DICE ----

import copy  # noqa: E402


@dataclass
class ModuleRun:
    """A run trained the way users train, recorded with ``record(t, models, x, y, W=W, optimizers=opts)``.

    Attributes:
        nodes: nodes[t] is a deep copy of (models, optimizers) at the start of round t.
    """

    trajectory: dk.Trajectory
    test: tuple[torch.Tensor, torch.Tensor]
    q: torch.Tensor
    nodes: list[tuple[list[nn.Module], list[torch.optim.Optimizer]]]

    def nodes_at(self, step: int) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        """Fresh copies of every node's model and optimizer at the start of round step."""
        return copy.deepcopy(self.nodes[step])


def module_run(make_model, make_optimizer, data, n: int, rounds: int, *, seed: int, batch: int = 5, lr: float = 0.1,
               dtype: torch.dtype = torch.float64, tests: int = 6, loss_fn=cross_entropy) -> ModuleRun:
    """make_model() per node (each its own initialisation), stepped by make_optimizer(params) on
    data(n, batch) with per-node learning rates in [lr, 2 lr) and a fresh directed W every round,
    then gossiped by dk.mix_; test = data(tests). The nodes train on cross_entropy; the recorder
    (which replays every round) is given loss_fn, cross-entropy too (dk.losses' to reach the closed form)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = [make_model().to(dtype) for _ in range(n)]
    optimizers = [make_optimizer(m.parameters()) for m in models]
    rec = dk.Recorder(models[0], loss_fn, optimizer=optimizers, replay_check="every")
    nodes = []
    for t in range(rounds):
        x, y = data(n, batch, generator=g, dtype=dtype)
        W = random_mixing(n, g).to(dtype)
        rates = lr * (1 + torch.rand(n, generator=g, dtype=dtype))
        for opt, rate in zip(optimizers, rates):
            opt.param_groups[0]["lr"] = float(rate)
        nodes.append(copy.deepcopy((models, optimizers)))
        rec.record(t, models, x, y, W=W, optimizers=optimizers)
        torch_optim_steps(models, optimizers, x, y, rates)
        dk.mix_(models, W)
    rec.record(rounds, models, optimizers=optimizers)
    test = data(tests, generator=g, dtype=dtype)
    q = torch.rand(n, generator=g, dtype=dtype) + 0.2
    return ModuleRun(rec.trajectory(), test, q / q.sum(), nodes)


def replayed_losses(traj: dk.Trajectory, step: int, test, q: torch.Tensor, hops: int, weights: torch.Tensor, models, optimizers) -> torch.Tensor:
    """(hops+1, N) q_k L(theta_k; z') at theta^{t+1/2}, theta^{t+1}, ..., theta^{t+hops}, replayed by
    the nodes' own models and torch optimizers (those of round step, stepped in place) with round
    step's batch weighted by weights (N, B) and every later round as recorded."""
    def test_loss() -> torch.Tensor:  # in eval mode: BatchNorm by each node's running statistics
        losses = []
        for m in models:
            m.eval()
            losses.append(cross_entropy(m(test[0]), test[1]).mean().detach())
            m.train()
        return torch.stack(losses)

    losses = []
    for s in range(max(hops, 1)):
        rnd = traj[step + s]
        torch_optim_steps(models, optimizers, rnd.inputs, rnd.targets, rnd.lr, weights if s == 0 else None)
        if s == 0:
            losses.append(test_loss())
        torch_optim_gossip(models, optimizers, rnd.W, traj.mix_state)
        losses.append(test_loss())
    return q * torch.stack(losses[: hops + 1])


def assert_terms_are_derivatives(traj: dk.Trajectory, step: int, test, q: torch.Tensor, hops: int, replay, per_hop: torch.Tensor,
                                 source: int, sample: int, step_size: float = 1e-5) -> torch.Tensor:
    """Every term e[s, k] of cascade (exact curvature) for (source, sample), and hop s of per_hop
    (dice_e(per_hop=True), (hops+1, N, B)) there, equals (1/B) d replay(w)[s, k] / d w_sample:
    a central difference of replay (weights (N, B) -> (hops+1, N)) to 1e-6 of each hop's scale.
    Returns the cascade (hops+1, N)."""
    n, batch = per_hop.shape[1:]
    # a central difference is exact to O(step^2) truncation plus rounding / step: at step 1e-5,
    # 1e-6 of each hop's scale bounds the method's error, not dicekern's (DICE.md's oracle); a
    # replay with more curvature in the weight (Adam over BatchNorm) takes a smaller step
    finite_difference_rtol = 1e-6
    weights = torch.full((n, batch), 1 / batch, dtype=per_hop.dtype)
    weights[source, sample] += step_size
    plus = replay(weights)
    weights[source, sample] -= 2 * step_size
    minus = replay(weights)
    finite = (plus - minus) / (2 * step_size) / batch  # (hops+1, N)
    flow = dk.cascade(traj, step, source, test, hops, samples=[sample], q=q)
    for s in range(hops + 1):
        scale = finite[s].abs().max()
        assert scale > 0
        assert (flow[s] - finite[s]).abs().max() <= finite_difference_rtol * scale, (s, flow[s], finite[s])
        assert abs(per_hop[s, source, sample] - finite[s].sum()) <= finite_difference_rtol * scale
    return flow


def assert_dice_gt_is_the_replay(traj: dk.Trajectory, step: int, test, q: torch.Tensor, hops: int, replay, source: int,
                                 removed: list[int], rtol: float) -> None:
    """dice_gt of removed and dice_gt_samples of every sample of source equal the factual replay
    minus the replay without them (replay: weights (N, B) -> (hops+1, N)), to rtol of their scale."""
    n, batch = traj[step].inputs.shape[:2]
    full = torch.full((n, batch), 1 / batch, dtype=traj[step].params.dtype)
    factual = replay(full)

    def removal(samples: list[int]) -> torch.Tensor:
        without = full.clone()
        without[source, samples] = 0
        expected = factual - replay(without)
        expected[0, torch.arange(n) != source] = 0  # hop 0 is the source's own half step
        return expected

    assert_close(dk.dice_gt(traj, step, source, test, hops, samples=removed, q=q), removal(removed), rtol)
    per_sample = dk.dice_gt_samples(traj, step, test, hops, nodes=[source], q=q, per_hop=True)
    for b in range(batch):
        assert_close(per_sample[:, 0, b], removal([b]).sum(-1), rtol)


def weighted_replay(traj: dk.Trajectory, step: int, test, q: torch.Tensor, hops: int):
    """weights (N, B) -> (hops+1, N) q_k L(theta_k; z') of dicekern's own replay of round step with
    those loss weights (BatchNorm statistics weighted by B w_b). dk.dice_gt is this replay at
    weights 0 and 1/B, and equals the nodes' own modules there; this is the one replay that also
    takes the weights in between a BatchNorm model's finite difference needs."""
    from dicekern.truth.ground_truth import _replay_test_losses

    rounds = traj.window(step, hops)
    return lambda weights: q * _replay_test_losses(traj, rounds, test, (weights * weights.shape[-1])[None])[0]
