"""The zoo's model factories: small, CPU-sized versions of the models people train by gossip.

Every factory is marked ``@rebuildable`` and takes JSON keyword arguments only, so a saved run can
name it ("dicekern.zoo:resnet", {"width": 8}). Every forward is written for torch.func
(``functional_call`` under ``vmap`` with ``grad``, ``jvp``, ``vjp`` and double backward): no
in-place op on a tensor the autograd graph needs, no control flow on values, no
``nn.MultiheadAttention``. Inputs carry a batch axis: images (B, C, H, W), sequences (B, C, L),
vectors (B, F).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dicekern.core.checks import check_choice, check_int
from dicekern.record.description import rebuildable

NORMS = ("batch", "group")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if channels % groups:
        raise ValueError(f"groups={groups} must divide every stage's width, but a stage has {channels} channels")
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """ResNet-18's block: relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x)); the shortcut
    is a 1x1 conv and norm when the stride or the width changes, the identity otherwise."""

    def __init__(self, inputs: int, outputs: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, outputs, groups)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, outputs, groups)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), _norm(norm, outputs, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@rebuildable
def resnet(num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: Sequence[int] = (1, 1), norm: str = "batch",
           groups: int = 4) -> nn.Module:
    """The ResNet-18 family, small: a stem, one stage of BasicBlocks per entry of blocks, a linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: channels of the input images (B, in_channels, H, W); any H, W >= 1.
        width: channels of the stem and the first stage; stage i has width * 2**i channels and
            (for i >= 1) halves the resolution with stride 2. ResNet-18 is width 64, blocks (2, 2, 2, 2).
        blocks: the number of BasicBlocks of every stage.
        norm: "batch" (nn.BatchNorm2d, train mode: the authors' model) or "group" (nn.GroupNorm).
        groups: GroupNorm's groups; must divide every stage's width. Unused with "batch".

    Example:
        >>> import torch
        >>> model = resnet(num_classes=3, width=4, blocks=[1, 1], norm="group", groups=2)
        >>> model(torch.randn(5, 3, 8, 8)).shape
        torch.Size([5, 3])
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    in_channels = check_int("in_channels", in_channels, minimum=1)
    width = check_int("width", width, minimum=1)
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(f"blocks must be a non-empty sequence of ints (blocks per stage), got {blocks!r}")
    blocks = [check_int(f"blocks[{i}]", b, minimum=1) for i, b in enumerate(blocks)]
    check_choice("norm", norm, NORMS)
    groups = check_int("groups", groups, minimum=1)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width, groups), nn.ReLU()]
    channels = width
    for stage, count in enumerate(blocks):
        outputs = width * 2**stage
        for i in range(count):
            layers.append(BasicBlock(channels, outputs, 2 if stage > 0 and i == 0 else 1, norm, groups))
            channels = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class SelfAttention(nn.Module):
    """Softmax multi-head self-attention, written out: qkv projection, scaled dot products, softmax, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # [B, T, 3D] -> [3, B, heads, T, D / heads]
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads), dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(norm(x)), then x + mlp(norm(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, learned position embedding, encoder blocks, final LayerNorm, mean pooling over patches, linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, D, H/p, W/p] -> [B, T, D]
        if tokens.shape[1] != self.position.shape[1]:
            raise ValueError(f"the ViT was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        return self.head(self.norm(self.blocks(tokens + self.position)).mean(dim=1))


@rebuildable
def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 12, patch: int = 4, dim: int = 32, depth: int = 2,
        heads: int = 4, mlp_ratio: int = 2) -> nn.Module:
    """A small Vision Transformer for (B, in_channels, image_size, image_size) images.

    Args:
        patch: side of the square patches (a Conv2d with stride patch); must divide image_size.
        dim: token width; heads must divide it.
        depth: encoder blocks.
        mlp_ratio: the GELU MLP's hidden width over dim.

    Example:
        >>> import torch
        >>> model = vit(num_classes=3, image_size=8, patch=4, dim=8, depth=1, heads=2)
        >>> model(torch.randn(5, 3, 8, 8)).shape
        torch.Size([5, 3])
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    in_channels = check_int("in_channels", in_channels, minimum=1)
    image_size = check_int("image_size", image_size, minimum=1)
    patch = check_int("patch", patch, minimum=1)
    dim, depth, heads = check_int("dim", dim, minimum=1), check_int("depth", depth, minimum=0), check_int("heads", heads, minimum=1)
    mlp_ratio = check_int("mlp_ratio", mlp_ratio, minimum=1)
    if image_size % patch:
        raise ValueError(f"patch={patch} must divide image_size={image_size}")
    if dim % heads:
        raise ValueError(f"heads={heads} must divide dim={dim}")
    return ViT(num_classes, in_channels, image_size, patch, dim, depth, heads, mlp_ratio * dim)


class GlobalAveragePool1d(nn.Module):
    """(B, C, L) -> (B, C): the mean over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


@rebuildable
def cnn1d(num_classes: int = 10, in_channels: int = 1, length: int = 32, width: int = 16, kernel: int = 5) -> nn.Module:
    """A 1-D CNN for sequences (B, in_channels, L): Conv1d-ReLU, a strided Conv1d-ReLU of twice the
    width, global average pooling, linear head.

    Args:
        length: the sequence length L the model is built for; the convolutions pad to keep it, so
            the model accepts any L >= 1 and length only sizes the zoo's random data.
        kernel: the convolutions' odd kernel size.

    Example:
        >>> import torch
        >>> model = cnn1d(num_classes=3, width=4, kernel=3)
        >>> model(torch.randn(5, 1, 32)).shape
        torch.Size([5, 3])
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    in_channels = check_int("in_channels", in_channels, minimum=1)
    check_int("length", length, minimum=1)
    width, kernel = check_int("width", width, minimum=1), check_int("kernel", kernel, minimum=1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (the convolutions pad kernel // 2 on each side), got {kernel}")
    return nn.Sequential(
        nn.Conv1d(in_channels, width, kernel, padding=kernel // 2), nn.ReLU(),
        nn.Conv1d(width, 2 * width, kernel, stride=2, padding=kernel // 2), nn.ReLU(),
        GlobalAveragePool1d(), nn.Linear(2 * width, num_classes),
    )


@rebuildable
def mlp(inputs: int = 64, hidden: int = 32, classes: int = 10, activation: str = "tanh") -> nn.Module:
    """inputs-hidden-classes MLP with one activation: the bundled digits' model (tanh), which the
    closed-form backend and the kernels cover.

    Example:
        >>> mlp(hidden=16)
        Sequential(
          (0): Linear(in_features=64, out_features=16, bias=True)
          (1): Tanh()
          (2): Linear(in_features=16, out_features=10, bias=True)
        )
    """
    inputs, hidden, classes = check_int("inputs", inputs, minimum=1), check_int("hidden", hidden, minimum=1), check_int("classes", classes, minimum=1)
    check_choice("activation", activation, list(ACTIVATIONS))
    return nn.Sequential(nn.Linear(inputs, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, classes))
