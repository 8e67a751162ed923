"""DiceOptions.chunk_size: the per-node work of a query in chunks of nodes, with the same numbers."""

from __future__ import annotations

import functools

import pytest
import torch

import dicekern as dk
from conftest import TOL, assert_close, module_run, random_run
from dicekern import zoo
from dicekern.curvature.torch_func import TorchFuncBackend
from dicekern.engine import evaluation, step

N, ROUNDS, STEP, HOPS = 4, 4, 1, 2
SMALL_RESNET = dict(width=4, blocks=[1], groups=2)


def resnet_run(name: str, make_optimizer):
    data = functools.partial(zoo.random_data, name, image_size=6, **SMALL_RESNET)
    return module_run(lambda: zoo.build(name, torch.float64, **SMALL_RESNET), make_optimizer, data, N, ROUNDS, seed=3, batch=4)


RUNS = {
    "resnet-gn-momentum": lambda: resnet_run("resnet-gn", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "resnet-bn-adam": lambda: resnet_run("resnet-bn", lambda p: torch.optim.Adam(p, lr=0.01)),
    "mlp-sgd": lambda: random_run(N, ROUNDS, seed=5),
}


@pytest.fixture
def dots_calls(monkeypatch) -> list[int]:
    """The node counts of the per_sample_dots calls made while the test runs."""
    calls = []
    dots = TorchFuncBackend.per_sample_dots
    monkeypatch.setattr(TorchFuncBackend, "per_sample_dots", lambda self, params, *rest: calls.append(len(params)) or dots(self, params, *rest))
    return calls


def queries(traj: dk.Trajectory, test, *, order: int = 1, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    options = dk.DiceOptions(backend="torch", order=order, chunk_size=chunk_size)
    results = {
        "dice_e per hop": dk.dice_e(traj, STEP, test, HOPS, per_hop=True, options=options),
        "cascade": dk.cascade(traj, STEP, 1, test, HOPS, samples=[0, 2], options=options),
        "influence_matrix": dk.influence_matrix(traj, STEP, test, HOPS, options=options),
    }
    if order == 1:
        results["dice_e per test"] = dk.dice_e(traj, STEP, test, HOPS, per_test=True, options=options)
    return results


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_every_query_is_the_same_in_chunks(name: str, chunk_size: int, dots_calls) -> None:
    """float64, to 1e-12 of each result's scale: chunks of 1 and 3 of 4 nodes (a short last chunk)."""
    run = RUNS[name]()
    orders = (1,) if name.startswith("resnet-bn") else (1, 2)  # BatchNorm runs are first order
    expected = {order: queries(run.trajectory, run.test, order=order) for order in orders}
    dots_calls.clear()
    for order in orders:
        for query, result in queries(run.trajectory, run.test, order=order, chunk_size=chunk_size).items():
            assert result.shape == expected[order][query].shape
            assert_close(result, expected[order][query], TOL[torch.float64].same)
    if not name.startswith("resnet-bn"):  # BatchNorm scores by weight_vjp
        assert dots_calls and max(dots_calls) <= chunk_size, "the queries did not run in chunks"


def test_last_layer_queries_are_the_same_in_chunks() -> None:
    run = random_run(N, ROUNDS, seed=7)
    head, test = dk.last_layer(run.trajectory, run.test)
    expected = queries(head, test, order=2)
    for query, result in queries(head, test, order=2, chunk_size=2).items():
        assert_close(result, expected[query], TOL[torch.float64].same)


def test_chunk_size_round_trips_and_is_checked() -> None:
    options = dk.DiceOptions(chunk_size=2)
    assert dk.DiceOptions.from_dict(options.to_dict()).chunk_size == 2
    assert dk.DiceOptions.from_dict({}).chunk_size is None
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            dk.DiceOptions(chunk_size=bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            dk.DiceOptions(chunk_size=bad)
    run = random_run(N, ROUNDS, seed=5)
    with pytest.raises(ValueError, match="chunk_size"):
        dk.dice_e(run.trajectory, STEP, run.test, HOPS, chunk_size=0)
