"""Test objectives: the gradients of the evaluation loss L(theta; z') that the chain reads.

``grads(points, hops, nodes, per_test)`` gives, for R (hop, node) pairs at parameters points
(R, D), the gradient of the mean test loss (O = 1 column) or of each test point's own loss
(O = M columns): (R, O, D). ``direct_curvature(points, vectors, kind)`` gives H V for the mean
test loss's curvature H at every node's hop-0 point (N, D), vectors (N, C, D). Both run on at most
``chunk_size`` rows per call of the backend (None: all at once). ``scaled_test_grads`` and
``segment_grads`` weight them by the node weights q, as every query reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dicekern.curvature.protocol import Curvature, CurvatureBackend
from dicekern.curvature.torch_func import mean_weights
from dicekern.engine.last_layer import PerNodeTest
from dicekern.engine.step import in_row_chunks


class SharedTestSet:
    """One test set (inputs (M, ...), targets (M, ...)) that every node is evaluated on."""

    cacheable = True  # a round's mean-loss gradients are the same in every window that reads them

    def __init__(self, backend: CurvatureBackend, test: tuple[torch.Tensor, torch.Tensor], chunk_size: int | None = None):
        self.backend, self.test, self.chunk_size = backend, test, chunk_size
        self.points = len(test[0])  # M

    def grads(self, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor, per_test: bool) -> torch.Tensor:
        x, y = self.test
        if per_test:
            grads = lambda p: self.backend.test_point_grads(p, x.expand(len(p), *x.shape), y)
        else:
            grads = lambda p: self.backend.test_grads(p, self.test)[:, None]
        return in_row_chunks(grads, self.chunk_size, points)

    def direct_curvature(self, points: torch.Tensor, vectors: torch.Tensor, kind: Curvature) -> torch.Tensor:
        x, y = self.test
        products = lambda p, v: self.backend.curvature_products(p, x.expand(len(p), *x.shape), y.expand(len(p), *y.shape), v, kind)
        return in_row_chunks(products, self.chunk_size, points, vectors)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test


class PerNodeTestSet:
    """Last-layer mode: node k sees the test points through its own extractor at every round."""

    cacheable = False

    def __init__(self, backend: CurvatureBackend, test: PerNodeTest, steps: Sequence[int], like: torch.Tensor, chunk_size: int | None = None):
        self.backend, self.targets, self.chunk_size = backend, test.targets, chunk_size
        self.features = test.rows(steps, like)  # (hops+1, N, M, F)
        self.points = len(test.targets)  # M

    def grads(self, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor, per_test: bool) -> torch.Tensor:
        y = self.targets
        if per_test:
            grads = lambda p, x: self.backend.test_point_grads(p, x, y)
        else:
            grads = lambda p, x: self.backend.node_grads(p, x, y.expand(len(p), *y.shape), mean_weights(x.shape[:2], p))[:, None]
        return in_row_chunks(grads, self.chunk_size, points, self.features[hops, nodes])

    def direct_curvature(self, points: torch.Tensor, vectors: torch.Tensor, kind: Curvature) -> torch.Tensor:
        y = self.targets
        products = lambda p, x, v: self.backend.curvature_products(p, x, y.expand(len(p), *y.shape), v, kind)
        return in_row_chunks(products, self.chunk_size, points, self.features[0], vectors)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features, self.targets


TestSet = SharedTestSet | PerNodeTestSet


def scaled_test_grads(tests: TestSet, q: torch.Tensor, points: torch.Tensor, hops: torch.Tensor, nodes: torch.Tensor,
                      per_test: bool = False) -> torch.Tensor:
    """(R, O, D) q_k grad L(theta; z') at points (R, D) of (hop, node) pairs (R,) each; q (rows,)."""
    return tests.grads(points, hops, nodes, per_test).mul_(q[nodes, None, None])  # the gradients are fresh


RULES = {"trapezoid": ((0.0, 0.5), (1.0, 0.5)), "simpson": ((0.0, 1 / 6), (0.5, 4 / 6), (1.0, 1 / 6))}  # (fraction of delta, weight)


def segment_grads(tests: TestSet, q: torch.Tensor, grads: torch.Tensor, points: torch.Tensor, deltas: torch.Tensor,
                  hops: torch.Tensor, nodes: torch.Tensor, rule: str = "trapezoid") -> torch.Tensor:
    """(R, D) the mean of q_k g along the segment from the factual points (R, D) to points - deltas
    (R, D) of (hop, node) pairs, by the trapezoid rule (exact for a quadratic test loss) or Simpson's
    (exact for a cubic one), from q_k g(theta) (R, D) at the factual points: dotted with delta, the
    test loss's change L(theta) - L(theta - delta)."""
    mean = grads * RULES[rule][0][1]
    for fraction, weight in RULES[rule][1:]:
        mean.add_(scaled_test_grads(tests, q, points - fraction * deltas, hops, nodes)[:, 0], alpha=weight)
    return mean
