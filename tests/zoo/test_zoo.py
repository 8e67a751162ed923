"""The zoo's models under DICE, checked without dicekern's own math: every term of DICE-E against a
finite difference of a replay by the nodes' own torch modules and optimizers, DICE-GT against that
replay itself; float64, tiny sizes that are not powers of two."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import dicekern as dk
from dicekern import zoo
from conftest import (TOL, assert_close, assert_dice_gt_is_the_replay, assert_terms_are_derivatives, cross_entropy, module_run,
                      replayed_losses, weighted_replay)

# every model at its smallest: 2 input channels, 3 classes, 6x6 or 8x8 images, sequences of 10
TINY = {
    "resnet-bn": dict(num_classes=3, in_channels=2, width=4, blocks=[1, 1], groups=2),
    "resnet-gn": dict(num_classes=3, in_channels=2, width=4, blocks=[1, 1], groups=2),
    "vit": dict(num_classes=3, in_channels=2, image_size=8, patch=4, dim=8, depth=1, heads=2, mlp_ratio=2),
    "cnn1d": dict(num_classes=3, in_channels=2, length=10, width=3, kernel=3),
    "mlp": dict(inputs=6, hidden=5, classes=3),
}
DATA_ONLY = {"resnet-bn": dict(image_size=6), "resnet-gn": dict(image_size=6)}  # the ResNets take any image size
SCORED = [name for name in zoo.MODELS if name != "resnet-bn"]  # resnet-bn: its own test below
OPTIMIZERS = {
    "momentum-wd": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), 0.1),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01), 0.01),
}
STEP, HOPS = 1, 2  # rounds 0..3: the optimizer state has history at the scored round


def tiny_data(name: str, *shape: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
    return zoo.random_data(name, *shape, generator=generator, dtype=dtype, **TINY[name], **DATA_ONLY.get(name, {}))


@functools.cache
def zoo_run(name: str, optimizer: str, n: int) -> object:
    """A recorded tiny run of model name (built from zoo.MODELS) under optimizer, batch 4, rounds 0..STEP+HOPS."""
    make, lr = OPTIMIZERS[optimizer]
    return module_run(lambda: zoo.build(name, **TINY[name]), make, functools.partial(tiny_data, name), n, STEP + HOPS, seed=n + 11,
                      batch=4, lr=lr, loss_fn=dk.losses.softmax_cross_entropy)


def replay(run, hops: int = HOPS):
    """weights (N, B) -> (hops+1, N): replayed_losses from deep copies of the nodes' own modules and optimizers at round STEP."""
    return lambda weights: replayed_losses(run.trajectory, STEP, run.test, run.q, hops, weights, *run.nodes_at(STEP))


CASES = [pytest.param(name, optimizer, id=f"{name}-{optimizer}") for name in SCORED for optimizer in OPTIMIZERS]


@pytest.mark.parametrize("name, optimizer", CASES)
def test_every_term_is_the_derivative_of_the_replay(name: str, optimizer: str) -> None:
    """Every term of cascade and dice_e(per_hop=True), exact curvature, hops 0..2, N=3: central
    differences of the torch replay in the sample's weight agree to 1e-6 of each hop's scale."""
    n = 3
    run = zoo_run(name, optimizer, n)
    traj = run.trajectory
    assert dk.plan_query(traj, STEP, run.test, HOPS).backend == ("closed_form" if name == "mlp" else "torch")
    per_hop = dk.dice_e(traj, STEP, run.test, HOPS, q=run.q, per_hop=True)  # (hops+1, N, B)
    for source, sample in ((n - 1, 0), (0, 3)):
        flow = assert_terms_are_derivatives(traj, STEP, run.test, run.q, HOPS, replay(run), per_hop, source, sample)
        assert flow[1:, source].abs().min() > 0  # momentum and Adam keep part of the sample in the source's state


@pytest.mark.parametrize("name, optimizer", CASES)
def test_dice_gt_is_the_torch_replay(name: str, optimizer: str) -> None:
    """dice_gt and dice_gt_samples (N=5, every sample of a source) equal the replay by the nodes'
    own torch modules and deep-copied torch.optim optimizers to 1e-9."""
    run = zoo_run(name, optimizer, 5)
    assert_dice_gt_is_the_replay(run.trajectory, STEP, run.test, run.q, HOPS, replay(run), 2, [0, 3], TOL[torch.float64].chain)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resnet_with_batch_norm_is_exact(optimizer: str) -> None:
    """The authors' model, train-mode BatchNorm: dice_gt and dice_gt_samples equal the nodes' own
    modules replayed without the sample, and every DICE-E term is the derivative of the weighted
    replay (nn.BatchNorm2d cannot weigh a sample by 1 +- h, so the finite difference uses
    dicekern's replay, which equals the modules' at the weights 0 and 1/B)."""
    run = zoo_run("resnet-bn", optimizer, 4)
    assert run.trajectory[STEP].buffers is not None
    assert_dice_gt_is_the_replay(run.trajectory, STEP, run.test, run.q, HOPS, replay(run), 2, [0, 3], TOL[torch.float64].chain)
    per_hop = dk.dice_e(run.trajectory, STEP, run.test, HOPS, q=run.q, per_hop=True)
    # Adam's step over BatchNorm bends in the weight: at a step of 1e-5 the central difference's own
    # truncation is 1e-6 of the hop (measured: 1e-4 at 1e-4, 1e-8 at 1e-6), so it steps 1e-6
    assert_terms_are_derivatives(run.trajectory, STEP, run.test, run.q, HOPS, weighted_replay(run.trajectory, STEP, run.test, run.q, HOPS),
                                 per_hop, 1, 2, step_size=1e-6)


def test_every_model_builds_and_fits_its_data() -> None:
    """MODELS names the command line's models; each factory is rebuildable, its defaults build the
    paper-shaped model, and random_data fits it, node-batched and as a test set."""
    assert list(zoo.MODELS) == ["resnet-bn", "resnet-gn", "vit", "cnn1d", "mlp"]
    g = torch.Generator().manual_seed(0)
    for name, (factory, kwargs, data) in zoo.MODELS.items():
        assert getattr(factory, "__dicekern_rebuildable__", False) and callable(data)
        model = zoo.build(name)
        x, y = zoo.random_data(name, 3, 2, generator=g)
        assert x.dtype == torch.float32 and y.shape == (3, 2) and int(y.max()) < 10
        assert model(x[0]).shape == (2, 10)
        small = zoo.build(name, torch.float64, **TINY[name])
        x, y = tiny_data(name, 4, generator=g)
        assert small(x).shape == (4, 3) and x.dtype == torch.float64 and int(y.max()) < 3
    assert zoo.arguments("resnet-bn") == dict(num_classes=10, in_channels=3, width=16, blocks=[1, 1], norm="batch", groups=4)
    assert zoo.arguments("vit") == dict(num_classes=10, in_channels=3, image_size=12, patch=4, dim=32, depth=2, heads=4, mlp_ratio=2)
    assert zoo.arguments("cnn1d") == dict(num_classes=10, in_channels=1, length=32, width=16, kernel=5)
    assert zoo.arguments("mlp") == dict(inputs=64, hidden=32, classes=10, activation="tanh")


def test_resnet_has_the_resnet18_block_structure() -> None:
    """Stem conv3x3-norm-relu; BasicBlocks whose width doubles per stage with stride 2 and a 1x1
    conv + norm shortcut where the stride or width changes; pooled linear head."""
    model = zoo.resnet(num_classes=7, in_channels=2, width=4, blocks=[2, 1, 1], norm="group", groups=2)
    blocks = [m for m in model if isinstance(m, zoo.models.BasicBlock)]
    assert [b.conv1.out_channels for b in blocks] == [4, 4, 8, 16] and [b.conv1.stride for b in blocks] == [(1, 1), (1, 1), (2, 2), (2, 2)]
    assert [isinstance(b.shortcut, nn.Identity) for b in blocks] == [True, True, False, False]
    assert all(isinstance(b.norm1, nn.GroupNorm) and b.norm1.num_groups == 2 for b in blocks)
    assert model(torch.randn(3, 2, 9, 9)).shape == (3, 7)
    assert isinstance(zoo.resnet(norm="batch").get_submodule("1"), nn.BatchNorm2d)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda: zoo.resnet(norm="layer"), ValueError, "norm must be one of", id="resnet-norm"),
    pytest.param(lambda: zoo.resnet(width=6, norm="group", groups=4), ValueError, "groups=4 must divide", id="resnet-groups"),
    pytest.param(lambda: zoo.resnet(blocks=3), TypeError, "blocks must be a non-empty sequence", id="resnet-blocks"),
    pytest.param(lambda: zoo.vit(image_size=10, patch=4), ValueError, "patch=4 must divide image_size=10", id="vit-patch"),
    pytest.param(lambda: zoo.vit(dim=10, heads=4), ValueError, "heads=4 must divide dim=10", id="vit-heads"),
    pytest.param(lambda: zoo.vit(image_size=8)(torch.randn(2, 3, 12, 12)), ValueError, "built for 8x8 images", id="vit-size"),
    pytest.param(lambda: zoo.cnn1d(kernel=4), ValueError, "kernel must be odd", id="cnn1d-kernel"),
    pytest.param(lambda: zoo.mlp(activation="relu6"), ValueError, "activation must be one of", id="mlp-activation"),
    pytest.param(lambda: zoo.build("resnet"), ValueError, "name must be one of", id="unknown-model"),
    pytest.param(lambda: zoo.build("vit", width=3), TypeError, "vit\\(\\) takes no argument 'width'", id="unknown-argument"),
    pytest.param(lambda: zoo.random_data("mlp", 2, size=3), TypeError, "takes no argument 'size'", id="unknown-data-argument"),
])
def test_bad_arguments_are_refused_naming_them(call, error, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_the_digits_mlp_is_the_zoos() -> None:
    """apps.examples.mlp is the zoo's factory, so "dicekern.apps.examples:mlp" and "dicekern.zoo:mlp"
    rebuild the same model, and the digits run trains it."""
    assert dk.examples.mlp is zoo.mlp
    old, new = (dk.RunDescription(path, {"hidden": 8}).build_model() for path in ("dicekern.apps.examples:mlp", "dicekern.zoo:mlp"))
    assert str(old) == str(new)


@pytest.mark.parametrize("name", SCORED)
def test_a_saved_zoo_run_rebuilds_its_model(name: str, tmp_path) -> None:
    """zoo.description names the factory as "dicekern.zoo:<factory>"; a saved run loads without
    the model and scores as the run in memory."""
    run = zoo_run(name, "momentum-wd", 3)
    description = zoo.description(name, metadata={"zoo": name}, **TINY[name])
    assert description.model == f"dicekern.zoo:{zoo.MODELS[name].factory.__name__}"
    run.trajectory.save(tmp_path / "run", description=description)
    loaded = dk.Trajectory.load(tmp_path / "run")
    assert loaded.description == description.naming(dk.losses.softmax_cross_entropy)
    assert_close(dk.dice_e(loaded, STEP, run.test, 1), dk.dice_e(run.trajectory, STEP, run.test, 1), TOL[torch.float64].same)


@pytest.mark.parametrize("name", SCORED)
def test_default_sized_models_run_every_query(name: str) -> None:
    """The models at their default sizes (float32) record a live momentum + weight decay run that
    the recorder replays, and answer dice_e, cascade and dice_gt_samples; cascade sums to dice_e."""
    make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = functools.partial(zoo.random_data, name)
    run = module_run(lambda: zoo.build(name), make, data, 5, 3, seed=0, batch=6, lr=0.05, dtype=torch.float32,
                     loss_fn=dk.losses.softmax_cross_entropy)
    e = dk.dice_e(run.trajectory, 0, run.test, 2, per_hop=True)
    flow = dk.cascade(run.trajectory, 0, 1, run.test, 2)
    gt = dk.dice_gt_samples(run.trajectory, 0, run.test, 2, nodes=[1], per_hop=True)
    assert e.shape == (3, 5, 6) and flow.shape == (3, 5) and gt.shape == (3, 1, 6)
    assert torch.isfinite(e).all() and torch.isfinite(flow).all() and torch.isfinite(gt).all()
    assert_close(flow.sum(-1), e[:, 1].sum(-1), TOL[torch.float32].chain)
