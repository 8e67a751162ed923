"""The baseline suspicion scores, on a constructed run whose answers are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dicekern as dk

LR = 0.1


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(-1) - targets) ** 2


@pytest.fixture
def opposed():
    """3 nodes at theta = 0 fitting y = <w, x> with no bias, on the same inputs; node 0's targets are
    the negated targets of nodes 1 and 2. At theta = 0 each update is lr (2/B) sum_b y_b x_b, so
    u_0 = -u_1 = -u_2, and the complete graph averages them."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    inputs, targets = x.expand(3, 5, 4).clone(), torch.stack([-y, y, y])
    rec = dk.Recorder(nn.Linear(4, 1, bias=False), squared_error)
    theta = torch.zeros(3, 4, dtype=torch.float64)
    W = dk.topology.complete(3)
    rec.record(0, {"weight": theta[:, None]}, inputs, targets, lr=LR, W=W)
    u = LR * (2 / 5) * (targets[:, :, None] * inputs).sum(1)  # (3, 4)
    rec.record(1, {"weight": (W @ u)[:, None]})
    test = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64))
    return rec.trajectory(), test, x, y, u


def test_node_baselines_on_opposed_updates(opposed) -> None:
    traj, test, x, y, u = opposed
    norm = u[1].norm()
    torch.testing.assert_close(dk.baselines.training_loss(traj, [0]), (y**2).mean().expand(3))
    torch.testing.assert_close(dk.baselines.update_norm(traj, [0]), norm.expand(3))
    torch.testing.assert_close(dk.baselines.update_distance(traj, [0]), torch.stack([2 * norm, norm, norm]))
    # node 0 points against its neighbours' mean; the mean of node 1's neighbours (u_0 + u_2) / 2 is 0
    torch.testing.assert_close(dk.baselines.update_disagreement(traj, [0]), torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    after = (dk.topology.complete(3) @ u)[0]  # every node ends the round at the mean update
    torch.testing.assert_close(dk.baselines.evaluation_loss(traj, [0], test), ((test[0] @ after - test[1]) ** 2).mean().expand(3))


def test_sample_baselines_on_opposed_updates(opposed) -> None:
    traj, _, x, y, _ = opposed
    torch.testing.assert_close(dk.baselines.sample_losses(traj, [0])[0], (y**2).expand(3, 5))
    torch.testing.assert_close(dk.baselines.sample_grad_norms(traj, [0])[0], (2 * y.abs() * x.norm(dim=1)).expand(3, 5))
    ids = torch.tensor([[[7, 8], [7, 9]], [[9, 9], [8, 7]]])
    values = torch.arange(8, dtype=torch.float64).view(2, 2, 2)
    assert dk.baselines.by_sample(values, ids) == {7: (0 + 2 + 7) / 3, 8: (1 + 6) / 2, 9: (3 + 4 + 5) / 3}


def test_baselines_refuse_what_they_cannot_score(opposed) -> None:
    traj, test, *_ = opposed
    with pytest.raises(ValueError, match="steps must name at least one round"):
        dk.baselines.update_norm(traj, [])
    with pytest.raises(ValueError, match="round 2 is missing"):
        dk.baselines.training_loss(traj, [2])
    with pytest.raises(ValueError, match="round\\(s\\) \\[2\\] are not recorded"):
        dk.baselines.evaluation_loss(traj, [1], test)
    with pytest.raises(ValueError, match="must have the same shape"):
        dk.baselines.by_sample(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long))
