"""Image observation encoder of Diffusion Policy's hybrid image policy (NHWC).

ResNet18 trunk with GroupNorm instead of BatchNorm (or, for converted checkpoints
whose backbone was trained with BatchNorm, a frozen BatchNorm), robomimic-style
spatial softmax keypoints, and the crop randomizer (random crop per image in
training, center crop at inference). Pixel normalization is the policy
normalizer's job. Attribute names mirror torchvision / robomimic so pretrained or
reference weights map 1:1 (conv weights transposed to (out, kh, kw, in)).
"""

import functools
import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

__all__ = ["FrozenBatchNorm", "ResNet18Trunk", "SpatialSoftmax", "RgbEncoder"]

NORMS = ("group", "batch")


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d with inference semantics only: always normalizes with the stored running statistics.

    Exists for converted checkpoints whose backbone was trained with BatchNorm (LeRobot's default
    pretrained ResNet18). ``running_mean`` / ``running_var`` are saved with the weights but frozen (not in
    ``trainable_parameters()``, so optimizers never touch them), and training normalizes with them too
    (never with batch statistics), so a fine-tuned policy behaves like the eval-mode original.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps  # torch.nn.BatchNorm2d's default
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.freeze(keys=["running_mean", "running_var"], recurse=False)

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.running_mean) * mx.rsqrt(self.running_var + self.eps) * self.weight + self.bias


def _norm(channels: int, norm: str) -> nn.Module:
    if norm == "batch":
        return FrozenBatchNorm(channels)
    # Diffusion Policy swaps every BatchNorm for GroupNorm with 16 channels per group.
    return nn.GroupNorm(num_groups=channels // 16, dims=channels, pytorch_compatible=True)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
    # torchvision's ResNet init: kaiming normal, fan_out, ReLU gain.
    conv.weight = nn.init.he_normal()(conv.weight, mode="fan_out", gain=math.sqrt(2.0))
    return conv


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1, norm: str = "group"):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 3, stride, 1)
        self.bn1 = _norm(channels, norm)
        self.conv2 = _conv(channels, channels, 3, 1, 1)
        self.bn2 = _norm(channels, norm)
        if stride != 1 or in_channels != channels:
            self.downsample = [_conv(in_channels, channels, 1, stride, 0), _norm(channels, norm)]

    def __call__(self, x: mx.array) -> mx.array:
        out = nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x
        if "downsample" in self:
            conv, norm = self.downsample
            identity = norm(conv(x))
        return nn.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """torchvision resnet18 minus avgpool/fc, GroupNorm or frozen BN. (N, H, W, 3) -> (N, h, w, 512)."""

    out_channels = 512

    def __init__(self, in_channels: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}")
        self.conv1 = _conv(in_channels, 64, 7, 2, 3)
        self.bn1 = _norm(64, norm)
        # MLX pads max-pooling with -inf, matching torch.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = [BasicBlock(64, 64, norm=norm), BasicBlock(64, 64, norm=norm)]
        self.layer2 = [BasicBlock(64, 128, 2, norm), BasicBlock(128, 128, norm=norm)]
        self.layer3 = [BasicBlock(128, 256, 2, norm), BasicBlock(256, 256, norm=norm)]
        self.layer4 = [BasicBlock(256, 512, 2, norm), BasicBlock(512, 512, norm=norm)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.maxpool(nn.relu(self.bn1(self.conv1(x))))
        for block in self.layer1 + self.layer2 + self.layer3 + self.layer4:
            x = block(x)
        return x


class SpatialSoftmax(nn.Module):
    """robomimic SpatialSoftmax: 1x1 conv to keypoint maps, then per-map soft-argmax.

    (N, H, W, C) -> (N, 2 * num_kp) ordered [x_0, y_0, x_1, y_1, ...] in [-1, 1].
    """

    def __init__(self, in_channels: int = 512, num_kp: int = 32, temperature: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.num_kp = num_kp
        # A plain float is not a parameter, so the temperature stays fixed.
        self.temperature = temperature

    def __call__(self, x: mx.array) -> mx.array:
        n, h, w, _ = x.shape
        maps = self.conv(x).reshape(n, h * w, self.num_kp).transpose(0, 2, 1)
        attention = mx.softmax(maps / self.temperature, axis=-1)
        # One product with the cells' (x, y) gives (N, kp, 2): [x_0, y_0, x_1, y_1, ...] once flattened.
        keypoints = attention @ _cell_positions(h, w)
        return keypoints.reshape(n, 2 * self.num_kp)


@functools.cache
def _cell_positions(h: int, w: int) -> mx.array:
    """(h * w, 2) float32 (x, y) in [-1, 1] of every cell of an h x w map, row-major. Made once per
    shape from host data (no graph, so any thread may use it) and kept out of the modules' trees."""
    x, y = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
    return mx.array(np.stack([x.reshape(-1), y.reshape(-1)], axis=-1).astype(np.float32))


def _center_crop(images: mx.array, crop_h: int, crop_w: int) -> mx.array:
    _, h, w, _ = images.shape
    # Same rounding as torchvision's center_crop.
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return images[:, top : top + crop_h, left : left + crop_w]


def _random_crop(images: mx.array, crop_h: int, crop_w: int) -> mx.array:
    n, h, w, _ = images.shape
    # Offsets as in robomimic / Diffusion Policy: floor(u * (H - ch)), u ~ U[0, 1).
    top = (mx.random.uniform(shape=(n,)) * (h - crop_h)).astype(mx.int32)
    left = (mx.random.uniform(shape=(n,)) * (w - crop_w)).astype(mx.int32)
    rows = top[:, None, None] + mx.arange(crop_h)[None, :, None]
    cols = left[:, None, None] + mx.arange(crop_w)[None, None, :]
    # One gather for the whole batch: (N, 1, 1), (N, ch, 1), (N, 1, cw) broadcast.
    return images[mx.arange(n)[:, None, None], rows, cols]


class RgbEncoder(nn.Module):
    """Crop randomizer + ResNet18-GN trunk + pooling head for one camera.

    pool="spatial_softmax": keypoints -> Linear(2 * num_kp, 64) -> ReLU (robomimic
    VisualCore plus ObservationEncoder's feature activation), output_dim 64.
    pool="avg": global average pooling (torchvision fc=Identity), output_dim 512.
    norm="batch" swaps the trunk's GroupNorms for FrozenBatchNorm (converted BatchNorm backbones).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        crop_shape: tuple[int, int] | None = None,
        pool: str = "spatial_softmax",
        num_keypoints: int = 32,
        norm: str = "group",
    ):
        super().__init__()
        height, width, channels = image_shape
        if crop_shape is not None and (crop_shape[0] > height or crop_shape[1] > width):
            raise ValueError(f"crop_shape {crop_shape} exceeds image_shape {image_shape}")
        if pool not in ("spatial_softmax", "avg"):
            raise ValueError(f"unknown pool {pool!r}")
        self.image_shape = tuple(image_shape)
        self.crop_shape = None if crop_shape is None else tuple(crop_shape)
        self.pool = pool
        self.trunk = ResNet18Trunk(channels, norm)
        if pool == "spatial_softmax":
            self.spatial_softmax = SpatialSoftmax(ResNet18Trunk.out_channels, num_keypoints)
            self.out = nn.Linear(2 * num_keypoints, 64)
            self.output_dim = 64
        else:
            self.output_dim = ResNet18Trunk.out_channels

    def crop(self, images: mx.array, random_crop: bool) -> mx.array:
        """Random crop per image (training augmentation) or the center crop (inference)."""
        if self.crop_shape is None:
            return images
        return (_random_crop if random_crop else _center_crop)(images, *self.crop_shape)

    def __call__(
        self,
        images: mx.array,
        random_crop: bool = False,
        trunk: Callable[[mx.array], mx.array] | None = None,
    ) -> mx.array:
        """images: (N, H, W, C) float, already normalized (the policy's normalizer maps pixels to [-1, 1]).

        ``random_crop`` is explicit rather than read from ``self.training`` so inference can never crop
        randomly by accident; the policy passes True only from its training loss. ``trunk`` replaces
        ``self.trunk`` with another form of it (the policy's inference conditioning passes
        the CUDA backend's kernel).
        """
        features = (trunk or self.trunk)(self.crop(images, random_crop))
        if self.pool == "avg":
            return features.mean(axis=(1, 2))
        return nn.relu(self.out(self.spatial_softmax(features)))
