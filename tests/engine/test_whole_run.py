"""Whole-run attribution (DICE.md, "Whole-run attribution"): final_influence, node_contributions and
final_gt, checked without dicekern's own math where possible: the nodes' own modules and torch
optimizers replay the run to the final models; float64, tiny sizes that are not powers of two."""

from __future__ import annotations

import functools
import hashlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import dicekern as dk
from dicekern import zoo
from conftest import TOL, assert_close, cross_entropy, module_run, torch_optim_gossip, torch_optim_steps
from dicekern.engine.queries import plan_whole_run
from dicekern.engine.sweep import RunSweep

ROUNDS = 4
TINY = {
    "mlp": dict(inputs=6, hidden=5, classes=3),
    "resnet-bn": dict(num_classes=3, in_channels=2, width=4, blocks=[1, 1], groups=2),
}
DATA_ONLY = {"resnet-bn": dict(image_size=6)}
OPTIMIZERS = {
    "momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
}
CASES = [pytest.param("mlp", "momentum-wd", id="mlp-momentum"), pytest.param("mlp", "adam", id="mlp-adam"),
         pytest.param("resnet-bn", "momentum-wd", id="resnet-bn-momentum")]


def tiny_data(name: str, *shape: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
    return zoo.random_data(name, *shape, generator=generator, dtype=dtype, **TINY[name], **DATA_ONLY.get(name, {}))


@functools.cache
def recorded(name: str, optimizer: str, n: int = 3):
    lr = 0.01 if optimizer == "adam" else 0.1
    return module_run(lambda: zoo.build(name, **TINY[name]), OPTIMIZERS[optimizer], functools.partial(tiny_data, name), n, ROUNDS,
                      seed=n + 5, batch=4, lr=lr, loss_fn=dk.losses.softmax_cross_entropy)


def replay_to_the_end(run, weights: torch.Tensor) -> list[nn.Module]:
    """The final models of a replay by the nodes' own modules and optimizers from round 0, with
    round t's batch weighted by weights[t] (N, B) (the batch mean at 1/B)."""
    models, optimizers = run.nodes_at(0)
    traj = run.trajectory
    for t in traj.steps[:-1]:
        rnd = traj[t]
        torch_optim_steps(models, optimizers, rnd.inputs, rnd.targets, rnd.lr, weights[t])
        torch_optim_gossip(models, optimizers, rnd.W)
    return models


def final_losses(run, weights: torch.Tensor) -> torch.Tensor:
    """(N,) q_k L(theta_k^T; z') of replay_to_the_end, in eval mode (BatchNorm: running statistics)."""
    losses = []
    for model in replay_to_the_end(run, weights):
        model.eval()
        losses.append(cross_entropy(model(run.test[0]), run.test[1]).mean().detach())
    return run.q * torch.stack(losses)


def mean_weights(run) -> torch.Tensor:
    """(T, N, B) 1/B everywhere: the recorded run."""
    n, batch = run.trajectory[0].inputs.shape[:2]
    return torch.full((ROUNDS, n, batch), 1 / batch, dtype=torch.float64)


@pytest.mark.parametrize("name, optimizer", CASES)
def test_final_influence_is_the_last_hop_of_dice_e(name: str, optimizer: str) -> None:
    """Entry [t] equals hop T - t of dice_e(per_hop=True) from round t, to 1e-10 of its scale."""
    run = recorded(name, optimizer)
    final = dk.final_influence(run.trajectory, run.test, q=run.q)
    assert final.shape == (ROUNDS, 3, 4)
    for t in range(ROUNDS):
        expected = dk.dice_e(run.trajectory, t, run.test, ROUNDS - t, q=run.q, per_hop=True)[-1]
        assert expected.abs().max() > 0
        assert_close(final[t], expected, TOL[torch.float64].op)


@pytest.mark.parametrize("name, optimizer", CASES[:2])
def test_final_influence_is_the_derivative_of_the_replay(name: str, optimizer: str) -> None:
    """final_influence[t, j, b] is (1/B) d/dw of the nodes' own replay's final loss in the sample's
    weight: a central difference (step 1e-5) agrees to 1e-6 of the round's scale. (BatchNorm
    modules take no sample weights between 0 and 1/B; the BatchNorm case is dice_e's, whose
    terms tests/engine/test_batchnorm.py differentiates.)"""
    run = recorded(name, optimizer)
    final = dk.final_influence(run.trajectory, run.test, q=run.q)
    h = 1e-5
    for t, j, b in [(0, 1, 2), (2, 0, 3), (ROUNDS - 1, 2, 0)]:
        weights = mean_weights(run)
        weights[t, j, b] += h
        plus = final_losses(run, weights).sum()
        weights[t, j, b] -= 2 * h
        minus = final_losses(run, weights).sum()
        finite = (plus - minus) / (2 * h) / weights.shape[-1]
        assert abs(final[t, j, b] - finite) <= 1e-6 * final[t].abs().max(), (t, j, b, final[t, j, b], finite)


@pytest.mark.parametrize("name, optimizer", CASES[::2])
def test_final_gt_is_the_replay_without_the_removed_data(name: str, optimizer: str) -> None:
    """Whole nodes, single samples and mixed sets: factual minus the nodes' own replay without them, to 1e-9."""
    run = recorded(name, optimizer)
    removals = [1, (2, 0, 3), [(0, 2, 1), (1, 2, 1), 0], (ROUNDS - 1, 1, 0)]
    got = dk.final_gt(run.trajectory, run.test, remove=removals, q=run.q, per_node=True, chunk_size=2)
    factual = final_losses(run, mean_weights(run))
    for i, removal in enumerate(removals):
        weights = mean_weights(run)
        for entry in removal if isinstance(removal, list) else [removal]:
            if isinstance(entry, int):
                weights[:, entry] = 0
            else:
                weights[entry] = 0
        assert_close(got[i], factual - final_losses(run, weights), 1e-9)
    assert_close(dk.final_gt(run.trajectory, run.test, remove=removals, q=run.q), got.sum(-1), 1e-12)


def test_node_contributions_order_1_sums_final_influence() -> None:
    run = recorded("mlp", "momentum-wd")
    expected = dk.final_influence(run.trajectory, run.test, q=run.q).sum(dim=(0, 2))
    assert_close(dk.node_contributions(run.trajectory, run.test, q=run.q), expected, 1e-12)


@pytest.mark.parametrize("optimizer", ["momentum-wd", "adam"])
def test_node_contributions_order_2_reads_the_second_order_perturbation(optimizer: str) -> None:
    """Order 2 is Simpson's rule for the final test loss's change along delta = d1 - d2 / 2, where
    d1, d2 are the first and second derivatives of the nodes' own replay's final params in the
    scale (1 + u) of node j's loss weights at every round (central differences, step 3e-4); and
    d1 is the linearised perturbation of order 1's forward sweep."""
    run = recorded("mlp", optimizer)
    model = zoo.build("mlp", **TINY["mlp"]).double()
    names = [name for name, _ in model.named_parameters()]
    layout = run.trajectory.objective.layout

    def test_grad(flat: torch.Tensor) -> torch.Tensor:
        params = {name: value[0] for name, value in zip(names, layout.unflatten(flat[None]).values())}
        loss = lambda p: cross_entropy(functional_call(model, p, (run.test[0],)), run.test[1]).mean()
        return torch.cat([g.flatten() for g in grad(loss)(params).values()])

    def final_params(weights: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in replay_to_the_end(run, weights)])

    theta = run.trajectory[ROUNDS].params
    order_2 = dk.node_contributions(run.trajectory, run.test, order=2, q=run.q)
    plan = plan_whole_run(run.trajectory, run.test, None, {"q": run.q}, "test")
    linearised = RunSweep(plan).advance(None, 0, torch.arange(3))
    for tau in range(1, ROUNDS):
        linearised = RunSweep(plan).advance(linearised, tau, torch.arange(3))
    h = 3e-4  # a second difference errs by O(h^2) truncation plus O(eps / h^2) rounding: under Adam, 7e-10 at 1e-4 and 3e-5 was rounding, 7e-9 at 1e-3 truncation
    for j in range(3):
        scaled = lambda u: mean_weights(run).index_fill_(1, torch.tensor([j]), (1 + u) / 4)
        plus, at, minus = final_params(scaled(h)), final_params(scaled(0.0)), final_params(scaled(-h))
        d1, d2 = (plus - minus) / (2 * h), (plus - 2 * at + minus) / h**2
        assert_close(linearised[:, j, 0], d1, 1e-6)
        delta = d1 - d2 / 2
        simpson = lambda k: (test_grad(theta[k]) + 4 * test_grad(theta[k] - delta[k] / 2) + test_grad(theta[k] - delta[k])) / 6
        expected = sum(run.q[k] * simpson(k) @ delta[k] for k in range(3))
        assert abs(order_2[j] - expected) <= 1e-6 * order_2.abs().max(), (j, order_2[j], expected)


def test_order_2_is_refused_for_batchnorm_by_name() -> None:
    run = recorded("resnet-bn", "momentum-wd")
    with pytest.raises(ValueError, match="BatchNorm layers"):
        dk.node_contributions(run.trajectory, run.test, order=2)


def test_a_saved_run_streams_from_disk(tmp_path) -> None:
    """A saved run read one round at a time gives the same scores as the run in memory."""
    run = dk.examples.digits_run(num_nodes=4, rounds=5, batch_size=3)
    run.trajectory.save(tmp_path, description=dk.RunDescription("dicekern.apps.examples:mlp"))
    streamed = dk.Trajectory.load(tmp_path, cache_rounds=1)
    assert torch.equal(dk.final_influence(streamed, run.test), dk.final_influence(run.trajectory, run.test))


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path).encode() + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def test_bad_input_is_refused_by_name_and_nothing_on_disk_changes(tmp_path) -> None:
    run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=3)
    run.trajectory.save(tmp_path, description=dk.RunDescription("dicekern.apps.examples:mlp"))
    before = folder_digest(tmp_path)
    traj = dk.Trajectory.load(tmp_path)
    x, y = run.test
    bad_calls = {
        "shape": lambda: dk.final_influence(traj, (x[:, :5], y)),
        "targets": lambda: dk.final_influence(traj, (x, y + 100)),
        "sum to 1": lambda: dk.node_contributions(traj, run.test, q=torch.full((4,), 0.3, dtype=traj.dtype)),
        "round 7": lambda: dk.final_gt(traj, run.test, remove=[(7, 0, 0)]),
        "sample 3": lambda: dk.final_gt(traj, run.test, remove=[(0, 0, 3)]),
        "node": lambda: dk.final_gt(traj, run.test, remove=[9]),
        "at least one": lambda: dk.final_gt(traj, run.test, remove=[]),
        "first order": lambda: dk.final_influence(traj, run.test, order=2),
        "order must be 1 or 2": lambda: dk.node_contributions(traj, run.test, order=3),
    }
    for needle, call in bad_calls.items():
        with pytest.raises(ValueError, match=needle):
            call()
    with pytest.raises(TypeError, match="remove"):
        dk.final_gt(traj, run.test, remove=3)
    assert folder_digest(tmp_path) == before


def test_a_missing_round_in_the_middle_is_named() -> None:
    run = dk.examples.digits_run(num_nodes=4, rounds=4, batch_size=3)
    traj = run.trajectory
    gapped = dk.Trajectory(traj.objective, {t: traj[t] for t in traj.steps if t != 2}, traj.optimizer)
    for call in (lambda: dk.final_influence(gapped, run.test), lambda: dk.node_contributions(gapped, run.test, order=2),
                 lambda: dk.final_gt(gapped, run.test, remove=[0])):
        with pytest.raises(ValueError, match="round 2 is missing"):
            call()
