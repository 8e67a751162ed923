"""A one-time self-check per device and kernel configuration: the Triton kernels against the torch
engine on a tiny random run, before ``backend="auto"`` lets them score anything.

No GPU run of the kernels is committed yet (benchmarks/README.md), so "auto" trusts a kernel
configuration only after it has reproduced the torch engine on the device at hand. A mismatch or
a failure falls back to the torch engine with a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dicekern.bindings.plan import mlp_plan
from dicekern.core.losses import ClosedFormLoss

_VERDICTS: dict[tuple, bool] = {}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}  # of the result's scale: float32 scores are cancelling dot products


def kernels_agree(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels for this MLP (its layers, activation and loss) agree with the torch
    engine on device in dtype: checked once per configuration, then remembered for the process."""
    key = (str(device), dtype, mlp_plan(model, loss_fn))
    if key not in _VERDICTS:
        try:
            error = _worst_relative_error(model, loss_fn, device, dtype)
            _VERDICTS[key] = error <= RTOL.get(dtype, 1e-2)
            detail = f"relative error {error:.2e}"
        except Exception as failure:  # a kernel that does not even run must not be used either
            _VERDICTS[key] = False
            detail = f"{type(failure).__name__}: {failure}"
        if not _VERDICTS[key]:
            warnings.warn(
                f"dicekern: the Triton kernels for this {type(model).__name__} under {loss_fn.kind} disagree with the torch "
                f"engine on {device} in {dtype} ({detail}); backend='auto' uses the torch engine", RuntimeWarning, stacklevel=2,
            )
    return _VERDICTS[key]


def _worst_relative_error(model: nn.Module, loss_fn: ClosedFormLoss, device: torch.device, dtype: torch.dtype) -> float:
    """Both engines on a 3-node, 2-hop run of this architecture with random parameters and data:
    per-hop scores, per-test scores (one launch) and the influence matrix (one launch)."""
    from dicekern.core import topology
    from dicekern.curvature.round import gossip_round
    from dicekern.engine.queries import dice_e, influence_matrix
    from dicekern.record.trajectory import Recorder

    g = torch.Generator().manual_seed(0)
    plan = mlp_plan(model, loss_fn)
    n, batch, features, hops, outputs = 3, 5, plan.widths[0], 2, plan.widths[-1]

    def targets(*lead: int) -> torch.Tensor:
        if loss_fn.kind == "softmax_cross_entropy":
            return torch.randint(outputs, lead, generator=g)
        if loss_fn.kind == "binary_logistic":
            return torch.rand(*lead, generator=g, dtype=dtype).round()
        return torch.randn(*lead, outputs, generator=g, dtype=dtype)

    rec = Recorder(model, loss_fn, replay_check="off")
    theta = 0.5 * torch.randn(n, rec.objective.layout.dim, generator=g, dtype=dtype) / features**0.5
    W, lr = topology.ring(n, dtype=dtype), torch.full((n,), 0.3, dtype=dtype)
    on = lambda t: t.to(device)
    for t in range(hops + 1):
        x, y = torch.randn(n, batch, features, generator=g, dtype=dtype), targets(n, batch)
        rec.record(t, rec.objective.layout.unflatten(on(theta)), on(x), on(y), lr=on(lr), W=on(W))
        theta = gossip_round(rec.objective, rec.optimizer, theta, {}, x, y, lr, W)[1]
    rec.record(hops + 1, rec.objective.layout.unflatten(on(theta)))
    traj, test = rec.trajectory(), (on(torch.randn(4, features, generator=g, dtype=dtype)), on(targets(4)))
    queries = [
        lambda backend: dice_e(traj, 0, test, hops, per_hop=True, backend=backend),
        lambda backend: dice_e(traj, 0, test, hops, per_test=True, backend=backend),
        lambda backend: influence_matrix(traj, 0, test, hops, backend=backend),
    ]
    worst = 0.0
    for query in queries:
        expected, actual = query("torch"), query("triton")
        scale = expected.abs().max().clamp_min(torch.finfo(dtype).tiny)
        worst = max(worst, ((actual - expected).abs().max() / scale).item())
    return worst
