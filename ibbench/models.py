"""Encoders x -> z: (N, C, H, W) pixels in [0, 1] -> (N, latent_dim); input normalisation lives inside."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ibbench.registry import Registry

logger = logging.getLogger(__name__)

# Without dataset statistics, map [0, 1] to [-1, 1]: centred and of unit order for any image data.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


class EncoderFactory(Protocol):
    """Builds an encoder for (C, H, W) inputs with per-channel normalisation statistics."""

    def __call__(
        self,
        input_shape: tuple[int, int, int],
        latent_dim: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> nn.Module: ...


ENCODERS: Registry[EncoderFactory] = Registry("encoder")


class Normalize(nn.Module):
    """(x - mean) / std per channel; x (N, C, H, W) in [0, 1] pixels."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # Buffers, so the statistics follow .to(device) and are saved in checkpoints with the weights.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W), same memory format as x."""
        return (x - self.mean) / self.std


class Encoder(nn.Module):
    """normalize, body, then the latent layer: (N, C, H, W) pixels in [0, 1] -> (N, latent_dim) float32.

    The latent layer (a Linear from the body's features) always runs in float32, outside any autocast: under
    bf16 autocast the latent would otherwise be rounded to 8 bits of mantissa before the entropy estimator sees
    it, and a collapsed latent's entropy then depends on the precision of the run (see docs/decisions.md).
    """

    def __init__(self, normalize: Normalize, body: nn.Module, latent: nn.Linear, input_shape: tuple[int, int, int]):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.latent = latent
        self.input_shape = input_shape
        self.latent_dim = latent.out_features

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, latent_dim) float32."""
        features = self.body(self.normalize(x))
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.latent(features.float())


def _normalize(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    """Normalize with the dataset's per-channel statistics, or DEFAULT_MEAN/DEFAULT_STD where None."""
    mean = [DEFAULT_MEAN] * channels if mean is None else list(mean)
    std = [DEFAULT_STD] * channels if std is None else list(std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(f"{label} has {len(values)} values but the input has {channels} channels")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive per channel, got {std}")
    return Normalize(mean, std)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@ENCODERS.register("resnet18")
def resnet18(
    input_shape: tuple[int, int, int],
    latent_dim: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, BasicBlocks [2,2,2,2]) -> (N, latent_dim)."""
    # Imported here: torchvision costs seconds to import and only this factory needs it.
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=latent_dim)
    # The CIFAR stem keeps full resolution: 32x32 inputs would shrink to 8x8 before the first block otherwise.
    net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    latent, net.fc = net.fc, nn.Identity()  # torchvision's final Linear(512, latent_dim) is the latent layer
    return Encoder(_normalize(input_shape[0], mean, std), net, latent, input_shape)


@ENCODERS.register("cnn")
def cnn(
    input_shape: tuple[int, int, int],
    latent_dim: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """Four conv-BN-ReLU layers (32, 64, 128, 128; two stride 2), global average pool -> (N, latent_dim)."""
    # Two stride-2 layers leave 2x2 maps at 8x8 inputs and 8x8 maps at 32x32; the pool makes both work.
    body = nn.Sequential(
        *_conv_bn_relu(input_shape[0], 32, 1),
        *_conv_bn_relu(32, 64, 2),
        *_conv_bn_relu(64, 128, 2),
        *_conv_bn_relu(128, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Encoder(_normalize(input_shape[0], mean, std), body, nn.Linear(128, latent_dim), input_shape)


@ENCODERS.register("mlp")
def mlp(
    input_shape: tuple[int, int, int],
    latent_dim: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """Flatten, two hidden layers of 256 with ReLU -> (N, latent_dim); meant for tiny inputs like digits."""
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, 256),
        nn.ReLU(inplace=True),
    )
    return Encoder(_normalize(input_shape[0], mean, std), body, nn.Linear(256, latent_dim), input_shape)


def make_encoder(
    name: str,
    input_shape: Sequence[int],
    latent_dim: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Encoder `name` for (C, H, W) inputs in [0, 1]; mean/std per channel, None: 0.5 ([0, 1] -> [-1, 1])."""
    factory = ENCODERS.get(name)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be positive, got {latent_dim}")
    model = factory((shape[0], shape[1], shape[2]), latent_dim, mean, std)
    logger.debug(
        "encoder %s for %s -> %d: %d parameters",
        name,
        shape,
        latent_dim,
        sum(p.numel() for p in model.parameters()),
    )
    return model
