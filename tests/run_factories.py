"""Model factories and a loss that the saved runs of the tests name by import path ("run_factories:...")."""

from __future__ import annotations

import torch
from torch import nn

import dicekern as dk
from dicekern import zoo


@dk.rebuildable
def tanh_mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    """The zoo's MLP, named from a module of the user's own."""
    return zoo.mlp(inputs, hidden, classes)


@dk.rebuildable
def relu_mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    """tanh_mlp's parameters under another activation: the same names and shapes, other outputs."""
    return zoo.mlp(inputs, hidden, classes, activation="relu")


@dk.rebuildable
def halved_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss outside dk.losses, named by import path."""
    return 0.5 * nn.functional.cross_entropy(outputs, targets, reduction="none")


def unmarked_mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    """tanh_mlp without @dk.rebuildable: a saved run may not name it."""
    return tanh_mlp(inputs, hidden, classes)
