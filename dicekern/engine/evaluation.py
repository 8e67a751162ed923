"""Test objectives: the gradients of the evaluation loss L(theta; z') that the chain reads.

``grads(points, hops, nodes, per_test)`` gives, for R (hop, node) pairs at parameters points
(R, D), the gradient of the mean test loss (O = 1 column) or of each test point's own loss
(O = M columns): (R, O, D). ``direct_curvature(points, vectors, kind)`` gives H V for the mean
test loss's curvature H at every node's hop-0 point (N, D), vectors (N, C, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dicekern.curvature.protocol import Curvature, CurvatureBackend
from dicekern.curvature.torch_func import mean_weights
from dicekern.engine.last_layer import PerNodeTest


class SharedTestSet:
    """One test set (inputs (M, ...), targets (M, ...)) that every node is evaluated on."""

    cacheable = True  # a round's mean-loss gradients are the same in every window that reads them

    def __init__(self, backend: CurvatureBackend, test: tuple[torch.Tensor, torch.Tensor]):
        self.backend, self.test = backend, test
        self.points = len(test[0])  # M

    def grads(self, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor, per_test: bool) -> torch.Tensor:
        x, y = self.test
        if per_test:
            return self.backend.test_point_grads(points, x.expand(len(points), *x.shape), y)
        return self.backend.test_grads(points, self.test)[:, None]

    def direct_curvature(self, points: torch.Tensor, vectors: torch.Tensor, kind: Curvature) -> torch.Tensor:
        x, y = self.test
        return self.backend.curvature_products(points, x.expand(len(points), *x.shape), y.expand(len(points), *y.shape), vectors, kind)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test


class PerNodeTestSet:
    """Last-layer mode: node k sees the test points through its own extractor at every round."""

    cacheable = False

    def __init__(self, backend: CurvatureBackend, test: PerNodeTest, steps: Sequence[int], like: torch.Tensor):
        self.backend, self.targets = backend, test.targets
        self.features = test.rows(steps, like)  # (hops+1, N, M, F)
        self.points = len(test.targets)  # M

    def grads(self, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor, per_test: bool) -> torch.Tensor:
        x, y = self.features[hops, nodes], self.targets
        if per_test:
            return self.backend.test_point_grads(points, x, y)
        return self.backend.node_grads(points, x, y.expand(len(points), *y.shape), mean_weights(x.shape[:2], points))[:, None]

    def direct_curvature(self, points: torch.Tensor, vectors: torch.Tensor, kind: Curvature) -> torch.Tensor:
        y = self.targets
        return self.backend.curvature_products(points, self.features[0], y.expand(len(points), *y.shape), vectors, kind)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features, self.targets
