"""backend="triton" (kernels, via Triton's interpreter on CPU) against backend="torch", end to end."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import dicekern as dk
from dicekern.curvature.triton import mlp_plan
from conftest import DEVICE, TOL, assert_close, random_mixing, random_run, recast
from dicekern.curvature.round import gossip_round

pytestmark = pytest.mark.kernels


def assert_matches(run_kernel, traj, test) -> None:
    """backend="triton" against backend="torch" on the same recorded values.

    float64: within 1e-10 of the result's scale. float32: scores are dot products that cancel, so
    no float32 engine can promise 1e-5 on every score; the kernels themselves meet 1e-5 on their
    outputs (test_kernels.py), and here both engines must be within 1e-4 of the float64 result's
    scale on identical values.
    """
    expected = run_kernel(traj, test, "torch")
    actual = run_kernel(traj, test, "triton")
    assert actual.dtype == expected.dtype
    if expected.dtype == torch.float64:
        assert_close(actual.cpu(), expected.cpu(), TOL[torch.float64].op)
        return
    traj64, test64 = recast(traj, test, torch.float64, DEVICE)
    exact = run_kernel(traj64, test64, "torch").cpu()
    for result in (actual, expected):
        assert_close(result.cpu().double(), exact, TOL[torch.float32].chain)


ACTIVATIONS = [nn.Tanh, nn.GELU, nn.ReLU, nn.SiLU]


def kernel_model(outputs: int, *, hidden: int | None, activation=nn.Tanh, bias: bool = True) -> nn.Module:
    """nn.Linear(13, K) (the linear head), or 13-hidden-K with the activation between."""
    if hidden is None:
        return nn.Linear(13, outputs, bias=bias)
    return nn.Sequential(nn.Linear(13, hidden, bias=bias), activation(), nn.Linear(hidden, outputs))


def kernel_run(loss: dk.losses.ClosedFormLoss, n: int, hops: int, *, seed: int, dtype: torch.dtype, bias: bool = True, optimizer=None,
               hidden: int | None = None, activation=nn.Tanh):
    """A recorded gossip run of a model the kernels cover under a closed-form loss, fresh directed W
    and per-node learning rates each round."""
    g = torch.Generator().manual_seed(seed)
    features, batch = 13, 7
    outputs = 1 if loss.kind == "binary_logistic" else 3

    def targets(*lead):
        if loss.kind == "softmax_cross_entropy":
            return torch.randint(outputs, lead, generator=g)
        if loss.kind == "binary_logistic":
            return torch.rand(*lead, generator=g, dtype=dtype).round()
        return torch.randn(*lead, outputs, generator=g, dtype=dtype)

    rec = dk.Recorder(kernel_model(outputs, hidden=hidden, activation=activation, bias=bias), loss, optimizer=optimizer, replay_check="off")
    obj, spec = rec.objective, rec.optimizer
    theta = 0.4 * torch.randn(n, obj.layout.dim, generator=g, dtype=dtype)
    state = spec.initial_state(n, obj.layout.dim, theta)
    on_device = lambda st: {k: v.to(DEVICE) for k, v in st.items()}
    for t in range(hops + 1):
        x = torch.randn(n, batch, features, generator=g, dtype=dtype)
        y = targets(n, batch)
        W = random_mixing(n, g).to(dtype)
        lr = 0.2 + 0.2 * torch.rand(n, generator=g, dtype=dtype)
        rec.record(t, obj.layout.unflatten(theta.to(DEVICE)), x.to(DEVICE), y.to(DEVICE), lr=lr, W=W.to(DEVICE), state=on_device(state))
        _, theta, state, _ = gossip_round(obj, spec, theta, state, x, y, lr, W)
    rec.record(hops + 1, obj.layout.unflatten(theta.to(DEVICE)), state=on_device(state))
    test = (torch.randn(5, features, generator=g, dtype=dtype).to(DEVICE), targets(5).to(DEVICE))
    return rec.trajectory(), test


LOSSES = [dk.losses.softmax_cross_entropy, dk.losses.binary_logistic, dk.losses.squared_error]
# Every loss at every hop count 0..4, with the dtype taken diagonally rather than as a third axis
# (the interpreter is slow): (hops // 2 + loss index) % 2 gives each loss both dtypes on both the
# linear head (even hops) and the MLP (odd hops, see shape_of), and each hop count both dtypes.
CASES = [
    pytest.param(loss, (3, 5, 7)[hops % 3], hops, dtype, hops % 2 == 0, id=f"{loss.kind}-hops{hops}-{str(dtype)[6:]}")
    for i, loss in enumerate(LOSSES)
    for hops in range(5)
    for dtype in [(torch.float64, torch.float32)[(hops // 2 + i) % 2]]
]


def shape_of(hops: int) -> dict:
    """The linear head at even hops, a two-layer MLP with one of the activations at odd ones."""
    return dict(hidden=None) if hops % 2 == 0 else dict(hidden=19, activation=ACTIVATIONS[hops % 4])


@pytest.mark.parametrize("loss, n, hops, dtype, bias", CASES)
def test_mlp_kernels_match_torch(loss, n: int, hops: int, dtype: torch.dtype, bias: bool) -> None:
    traj, test = kernel_run(loss, n, hops, seed=hops + 10 * n, dtype=dtype, bias=bias, **shape_of(hops))
    q = torch.rand(n, dtype=dtype, device=DEVICE) + 0.1
    q = q / q.sum()
    for curvature_at in ("sender", "receiver"):
        assert_matches(
            lambda tr, te, backend, at=curvature_at: dk.dice_e(tr, 0, te, hops, q=q.to(tr.dtype), curvature_at=at, per_hop=True, backend=backend),
            traj, test,
        )
    assert_matches(
        lambda tr, te, backend: dk.cascade(tr, 0, n - 1, te, hops, samples=[1, 4], q=q.to(tr.dtype), backend=backend), traj, test
    )


ONE_LAUNCH_CASES = [
    pytest.param(loss, hops, (torch.float64, torch.float32)[hops % 2], ("sender", "receiver")[(hops // 2) % 2],
                 id=f"{loss.kind}-hops{hops}")
    for loss in LOSSES
    for hops in range(4)
]
EXTRA_CURVATURE = {2: "none", 3: "ggn"}  # the interpreter is slow: one more linearisation per case


@pytest.mark.parametrize("loss, hops, dtype, curvature_at", ONE_LAUNCH_CASES)
def test_one_launch_chains_match_torch(loss, hops: int, dtype: torch.dtype, curvature_at: str) -> None:
    """dice_e(per_test=True) and influence_matrix run each objective column's whole chain in one launch."""
    traj, test = kernel_run(loss, 3, hops, seed=7 * hops + 1, dtype=dtype, bias=hops != 1, **shape_of(hops + 1))
    q = torch.rand(3, dtype=dtype, device=DEVICE) + 0.1
    q = q / q.sum()
    curvatures = ("exact",) + ((EXTRA_CURVATURE[hops],) if hops in EXTRA_CURVATURE else ())
    for curvature in curvatures:
        opts = dict(curvature=curvature, curvature_at=curvature_at)
        assert_matches(lambda tr, te, backend, o=opts: dk.dice_e(tr, 0, te, hops, q=q.to(tr.dtype), per_test=True, backend=backend, **o), traj, test)
        assert_matches(lambda tr, te, backend, o=opts: dk.influence_matrix(tr, 0, te, hops, q=q.to(tr.dtype), backend=backend, **o), traj, test)


@pytest.mark.parametrize("optimizer", [dk.optim.SGD(0.9, nesterov=True, weight_decay=0.01), dk.optim.AdamW(weight_decay=0.1)], ids=["nesterov", "adamw"])
def test_mlp_kernels_serve_every_optimizer(optimizer) -> None:
    """The kernels give gradients, curvature products and per-sample dots; the optimizer's
    linearisation composes with them (the one-launch chains cover plain SGD only)."""
    traj, test = kernel_run(dk.losses.softmax_cross_entropy, 5, 3, seed=3, dtype=torch.float64, optimizer=optimizer, hidden=9)
    q = torch.rand(5, dtype=torch.float64, device=DEVICE) + 0.1
    q = q / q.sum()
    assert_matches(lambda tr, te, backend: dk.dice_e(tr, 0, te, 3, q=q, per_hop=True, backend=backend), traj, test)
    assert_matches(lambda tr, te, backend: dk.dice_e(tr, 0, te, 2, q=q, per_test=True, backend=backend), traj, test)
    assert_matches(lambda tr, te, backend: dk.influence_matrix(tr, 0, te, 3, q=q, backend=backend), traj, test)
    assert_matches(lambda tr, te, backend: dk.cascade(tr, 0, 2, te, 3, q=q, samples=[0, 6], backend=backend), traj, test)
    assert_matches(lambda tr, te, backend: dk.final_influence(tr, te, q=q, backend=backend), traj, test)


def test_triton_refuses_a_model_the_kernels_do_not_cover() -> None:
    """A Softplus MLP has no kernel: backend="triton" names why instead of running another backend."""
    run = random_run(5, rounds=4, seed=8, loss_fn=dk.losses.softmax_cross_entropy,
                     model=nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 3)))
    traj, test = recast(run.trajectory, run.test, torch.float64, DEVICE)
    with pytest.raises(ValueError, match="backend='triton' cannot run this query: module 1 is a Softplus"):
        dk.dice_e(traj, 0, test, 3, backend="triton")


def test_the_kernels_cover_mlps_with_one_activation_at_most_256_wide() -> None:
    covers = lambda model, loss_fn: not isinstance(mlp_plan(model, loss_fn), str)
    assert covers(nn.Linear(3, 2), dk.losses.squared_error)
    assert covers(nn.Sequential(nn.Flatten(), nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)), dk.losses.squared_error)
    assert not covers(nn.Linear(3, 2), dk.losses.binary_logistic)  # logistic needs one output
    assert not covers(nn.Linear(3, 2), lambda o, y: (o - y).pow(2).mean(-1))
    assert not covers(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), dk.losses.squared_error)
    assert not covers(nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 2)), dk.losses.squared_error)


def test_the_self_check_passes_correct_kernels_and_refuses_wrong_ones(monkeypatch) -> None:
    """Run here in the interpreter (on CPU tensors): the same checks "auto" runs once per CUDA device,
    of the node kernels and of the one-launch chains."""
    from dicekern.curvature import triton as selfcheck
    from dicekern.curvature.triton import TritonBackend
    from dicekern.engine import fused

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    head, device = nn.Linear(7, 4), torch.device(DEVICE)
    assert selfcheck.kernels_agree(head, dk.losses.softmax_cross_entropy, device, torch.float64)
    assert fused.one_launch_agrees(head, dk.losses.softmax_cross_entropy, device, torch.float64)
    mlp = nn.Sequential(nn.Linear(7, 6), nn.SiLU(), nn.Linear(6, 4))
    assert selfcheck.kernels_agree(mlp, dk.losses.squared_error, device, torch.float32)
    assert fused.one_launch_agrees(mlp, dk.losses.squared_error, device, torch.float32)
    real = TritonBackend.per_sample_dots
    monkeypatch.setattr(TritonBackend, "per_sample_dots", lambda self, *a: real(self, *a) * 1.001)
    with pytest.warns(RuntimeWarning, match="Triton kernels .* disagree with the closed-form backend .* backend='auto' does not use them"):
        assert not selfcheck.kernels_agree(nn.Linear(7, 3), dk.losses.softmax_cross_entropy, device, torch.float64)
    assert not selfcheck.kernels_agree(nn.Linear(7, 3), dk.losses.softmax_cross_entropy, device, torch.float64)  # remembered
    real_chain = fused.forward_chain
    monkeypatch.setattr(fused, "forward_chain", lambda *a, **k: real_chain(*a, **k) * 1.001)
    with pytest.warns(RuntimeWarning, match="Triton one-launch chains .* disagree with the closed-form backend"):
        assert not fused.one_launch_agrees(nn.Linear(7, 2), dk.losses.squared_error, device, torch.float64)


def test_backend_choice(monkeypatch) -> None:
    run = random_run(3, rounds=2, seed=1)
    auto = dk.dice_e(run.trajectory, 0, run.test, 1, backend="auto")
    assert torch.equal(auto, dk.dice_e(run.trajectory, 0, run.test, 1, backend="torch"))  # a loss outside dk.losses: torch
    covered = random_run(3, rounds=2, seed=1, loss_fn=dk.losses.softmax_cross_entropy)  # a model and loss the kernels cover
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            dk.dice_e(covered.trajectory, 0, covered.test, 1, backend="triton")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            dk.cascade(covered.trajectory, 0, 0, covered.test, 1, backend="triton")


DICEKERN_OPS = ("gossip_mix", "mlp", "mlp_adjoint_chain", "mlp_forward_chain")


def calls_of_registered_ops(monkeypatch, queries) -> dict[str, tuple]:
    """Run queries() and return the arguments of the first call of each dicekern op it makes."""
    importlib.import_module("dicekern.bindings.mlp")  # registers the ops (and imports gossip_mix's)
    calls: dict[str, tuple] = {}

    def recording(name: str, op):
        def call(*args):
            calls.setdefault(name, args)
            return op(*args)
        return call

    for name in DICEKERN_OPS:
        monkeypatch.setattr(torch.ops.dicekern, name, recording(name, getattr(torch.ops.dicekern, name)))
    queries()
    monkeypatch.undo()
    return calls


def calls_of_three_queries(monkeypatch) -> dict[str, tuple]:
    """The dicekern op calls of dice_e (per_hop: gossip_mix and mlp; per_test: the adjoint chain)
    and influence_matrix (the forward chain) with backend="triton" on a small run."""
    traj, test = kernel_run(dk.losses.softmax_cross_entropy, 3, 2, seed=11, dtype=torch.float64, hidden=9)

    def queries() -> None:
        dk.dice_e(traj, 0, test, 2, per_hop=True, backend="triton")
        dk.dice_e(traj, 0, test, 2, per_test=True, backend="triton")
        dk.influence_matrix(traj, 0, test, 2, backend="triton")

    return calls_of_registered_ops(monkeypatch, queries)


def test_three_queries_reach_every_registered_op(monkeypatch) -> None:
    """The premise of the opcheck test below, checked where it can run (here, the interpreter)."""
    calls = calls_of_three_queries(monkeypatch)
    assert sorted(calls) == sorted(DICEKERN_OPS)
    assert all(isinstance(arg, torch.Tensor) for args in calls.values() for arg in args[:3])


@pytest.mark.skipif(DEVICE != "cuda", reason="opcheck's fake-tensor checks do not run under Triton's interpreter (CPU); checked on CUDA")
def test_registered_ops_pass_opcheck(monkeypatch) -> None:
    """Every dicekern op composes with torch.compile (schema, fake tensors, AOT dispatch), on the
    arguments a real query gives it."""
    calls = calls_of_three_queries(monkeypatch)
    assert sorted(calls) == sorted(DICEKERN_OPS)
    for name, args in calls.items():
        torch.library.opcheck(getattr(torch.ops.dicekern, name).default, args)
