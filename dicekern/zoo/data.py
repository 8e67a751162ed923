"""Small random data that fits the zoo's models: standard normal inputs and uniform class targets.

Every maker takes the leading shape first (``(N, B)`` for every node's batch, ``(M,)`` for a test
set), then keyword arguments named as the models' own, and returns (inputs (*shape, ...),
targets (*shape,) int64).
"""

from __future__ import annotations

import torch

from dicekern.core.checks import check_int

IMAGE_SIZE = 8  # the side of images for models that accept any size (the ResNets)


def _draw(shape: tuple[int, ...], sample: tuple[int, ...], classes: int, generator: torch.Generator | None,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(check_int("shape", s, minimum=0) for s in shape)
    classes = check_int("classes", classes, minimum=1)
    inputs = torch.randn(*shape, *sample, generator=generator, dtype=dtype)
    return inputs, torch.randint(classes, shape, generator=generator)


def images(*shape: int, in_channels: int = 3, image_size: int = IMAGE_SIZE, num_classes: int = 10,
           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (*shape, in_channels, image_size, image_size), targets (*shape,)).

    Example:
        >>> x, y = images(4, 5, in_channels=1, image_size=6)
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 5, 1, 6, 6), (4, 5))
    """
    side = check_int("image_size", image_size, minimum=1)
    return _draw(shape, (check_int("in_channels", in_channels, minimum=1), side, side), num_classes, generator, dtype)


def sequences(*shape: int, in_channels: int = 1, length: int = 32, num_classes: int = 10,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (*shape, in_channels, length), targets (*shape,))."""
    sample = (check_int("in_channels", in_channels, minimum=1), check_int("length", length, minimum=1))
    return _draw(shape, sample, num_classes, generator, dtype)


def vectors(*shape: int, inputs: int = 64, classes: int = 10, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (*shape, inputs), targets (*shape,))."""
    return _draw(shape, (check_int("inputs", inputs, minimum=1),), classes, generator, dtype)
