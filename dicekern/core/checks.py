"""Input validation shared by the public API: each check raises an error that names the problem."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def as_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite value(s)")


def to_float(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy on like's device; floating tensors take like's dtype, integer ones (labels) keep theirs."""
    check_finite(name, tensor)
    dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(dtype=dtype, device=like.device, copy=True)


def check_mixing(name: str, W: object, num_nodes: int, like: torch.Tensor, *, atol: float = 1e-5) -> torch.Tensor:
    """A validated (N, N) row-stochastic mixing matrix in like's dtype and device."""
    W = as_tensor(name, W)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(W.shape)}")
    if W.shape[0] != num_nodes:
        raise ValueError(f"{name} is {W.shape[0]}x{W.shape[1]} but the params hold N={num_nodes} nodes")
    if W.is_complex() or W.dtype == torch.bool:
        raise TypeError(f"{name} must hold real weights, got dtype {W.dtype}")
    given = W.dtype
    W = W.detach().to(dtype=like.dtype, device=like.device, copy=True)
    check_finite(name, W)
    if (W < 0).any():
        raise ValueError(f"{name} has negative entries (min {W.min().item():.3g}); mixing weights must be >= 0")
    row_error = (W.double().sum(dim=1) - 1).abs()  # in float64, whatever W's dtype: a float16 W hides its errors
    if (row_error > atol).any():
        worst = int(row_error.argmax())
        hint = f"; {given} cannot hold these weights exactly: pass W in the params' dtype" if given.is_floating_point and torch.finfo(given).eps > atol else ""
        raise ValueError(
            f"{name} is not row-stochastic: row {worst} sums to {W[worst].double().sum().item():.6g} "
            f"(W[k, j] is the weight node k gives node j, so every row must sum to 1; "
            f"a BlueFog-style W[src, dst] must be transposed){hint}"
        )
    return W


def check_q(q: object) -> torch.Tensor | None:
    """Node weights of the global objective sum_k q_k L_k: a 1-D floating tensor, non-negative,
    summing to 1 (a distribution over nodes; divide by its sum to get one). None means 1/N."""
    if q is None:
        return None
    q = as_tensor("q", q)
    if not q.is_floating_point():
        raise TypeError(f"q must hold floating-point weights, got dtype {q.dtype}")
    if q.dim() != 1 or q.numel() == 0:
        raise ValueError(f"q must be a vector (N,) of node weights, got shape {tuple(q.shape)}")
    check_finite("q", q)
    if (q < 0).any():
        raise ValueError("q must be non-negative: node weights of the global objective")
    total = q.double().sum().item()
    if abs(total - 1) > 1e-6:
        raise ValueError(f"q must sum to 1 (it weighs the nodes' losses in the global objective), got {total:.6g}; pass q / q.sum()")
    return q.detach()


def check_node_weights(q: object, num_nodes: int, like: torch.Tensor) -> torch.Tensor:
    """(N,) node weights q of the global objective in like's dtype and device; None means 1/N."""
    q = check_q(q)
    if q is None:
        return like.new_full((num_nodes,), 1.0 / num_nodes)
    if q.shape != (num_nodes,):
        raise ValueError(f"q must have shape (N,) = ({num_nodes},), got {tuple(q.shape)}")
    return q.to(dtype=like.dtype, device=like.device)


def check_batch(inputs: object, targets: object, like: torch.Tensor, *, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets with matching leading dimensions, finite, on like's device."""
    inputs = as_tensor(f"{prefix}inputs", inputs)
    targets = as_tensor(f"{prefix}targets", targets)
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{prefix}inputs {tuple(inputs.shape)} and {prefix}targets {tuple(targets.shape)} "
            f"must share their leading dimension"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{prefix}inputs is empty")
    return to_float(f"{prefix}inputs", inputs, like), to_float(f"{prefix}targets", targets, like)


def check_test(test: object, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test objective z' as (inputs (M, ...), targets (M, ...)) on like's dtype and device."""
    if not isinstance(test, (tuple, list)) or len(test) != 2:
        raise TypeError("test must be a pair (inputs, targets) of the evaluation points")
    return check_batch(test[0], test[1], like, prefix="test ")


def check_samples(samples: object, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """(B,) 0/1 mask of the chosen samples of a node's batch; None chooses all of them."""
    mask = like.new_zeros(batch_size)
    if samples is None:
        return mask.fill_(1.0)
    index = torch.as_tensor(samples).reshape(-1)
    if index.numel() == 0 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"samples must be a non-empty sequence of int indices, got {samples!r}")
    index = index.long()  # any integer dtype; a uint8 or bool tensor would index as a mask
    if (index < 0).any() or (index >= batch_size).any():
        raise ValueError(f"samples out of range: indices must lie in [0, {batch_size}), got {index.tolist()}")
    if index.unique().numel() != index.numel():
        raise ValueError(f"samples has repeated indices: {index.tolist()}")
    mask[index.to(mask.device)] = 1.0
    return mask


def check_node(name: str, node: object, num_nodes: int) -> int:
    node = check_int(name, node)
    if not 0 <= node < num_nodes:
        raise ValueError(f"{name} must be a node index in [0, {num_nodes}), got {node}")
    return node


def check_finite_result(name: str, result: torch.Tensor) -> torch.Tensor:
    """A query's result, or a ValueError when it overflowed: a NaN score is never returned."""
    bad = ~torch.isfinite(result)
    if bad.any():
        raise ValueError(
            f"{name} is not finite in {int(bad.sum())} of {result.numel()} entries: the recorded rounds overflow "
            f"(a huge learning rate, parameters or inputs?)"
        )
    return result
