"""LinearNormalizer: per-feature affine maps fitted on data, as upstream Diffusion Policy.

``normalize(x) = x * scale + offset`` and ``unnormalize(y) = (y - offset) / scale``, broadcast over the
feature's last axis (the channel axis for channel-last images). Stored in checkpoints as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

STAT_NAMES = ("scale", "offset", "min", "max", "mean", "std")


@dataclass
class FeatureNorm:
    """Affine parameters of one feature plus the statistics they were fitted from, all float32 (D,)."""

    scale: np.ndarray
    offset: np.ndarray
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in STAT_NAMES}


def _stats(data: np.ndarray) -> dict[str, np.ndarray]:
    flat = np.asarray(data, dtype=np.float64).reshape(-1, data.shape[-1])
    return {
        "min": flat.min(axis=0),
        "max": flat.max(axis=0),
        "mean": flat.mean(axis=0),
        "std": flat.std(axis=0),
    }


def fit_limits(
    data: np.ndarray, output_min: float = -1.0, output_max: float = 1.0, range_eps: float = 1e-4
) -> FeatureNorm:
    """Map [min, max] of each dim to [output_min, output_max]; near-constant dims are only centred."""
    s = _stats(data)
    data_range = s["max"] - s["min"]
    ignore = data_range < range_eps
    data_range[ignore] = output_max - output_min
    scale = (output_max - output_min) / data_range
    offset = output_min - scale * s["min"]
    # Constant dims map to the middle of the output range, as upstream.
    offset[ignore] = (output_max + output_min) / 2 - s["min"][ignore]
    return _feature(scale, offset, s)


def fit_gaussian(data: np.ndarray, range_eps: float = 1e-4) -> FeatureNorm:
    """Zero mean, unit variance per dim; dims with std < range_eps are only centred."""
    s = _stats(data)
    std = s["std"].copy()
    std[std < range_eps] = 1.0
    scale = 1.0 / std
    return _feature(scale, -s["mean"] * scale, s)


def image_range(channels: int = 3) -> FeatureNorm:
    """Fixed map of [0, 1] pixels to [-1, 1] (upstream's image range normalizer)."""
    ones = np.ones(channels)
    stats = {"min": 0 * ones, "max": ones, "mean": 0.5 * ones, "std": np.sqrt(1 / 12) * ones}
    return _feature(2 * ones, -1 * ones, stats)


def mean_std(mean: np.ndarray, std: np.ndarray) -> FeatureNorm:
    """Fixed gaussian map from given statistics (e.g. ImageNet mean/std for pretrained backbones)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    stats = {"min": mean - std, "max": mean + std, "mean": mean, "std": std}
    return _feature(1 / std, -mean / std, stats)


def _feature(scale: np.ndarray, offset: np.ndarray, stats: dict[str, np.ndarray]) -> FeatureNorm:
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in stats.items()}
    return FeatureNorm(np.asarray(scale, np.float32), np.asarray(offset, np.float32), **f32)


class LinearNormalizer:
    """A named set of FeatureNorms; MLX copies of scale/offset are cached for inference."""

    def __init__(self, features: dict[str, FeatureNorm] | None = None):
        self.features: dict[str, FeatureNorm] = dict(features or {})
        self._mx_cache: dict[str, tuple[mx.array, mx.array]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.features

    def __setitem__(self, key: str, value: FeatureNorm) -> None:
        self.features[key] = value
        self._mx_cache.pop(key, None)

    def __getitem__(self, key: str) -> FeatureNorm:
        return self.features[key]

    def keys(self) -> list[str]:
        return list(self.features)

    def affine(self, key: str) -> tuple[mx.array, mx.array]:
        """(scale, offset) of ``key`` as MLX arrays: normalized = x * scale + offset."""
        if key not in self._mx_cache:
            f = self.features[key]
            self._mx_cache[key] = (mx.array(f.scale), mx.array(f.offset))
        return self._mx_cache[key]

    def normalize(self, key: str, x: mx.array, affine: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """``affine`` (from ``affine(key)``) may be passed in: a compiled caller takes it as an input, so a
        normalizer replaced after the first trace is still the one applied."""
        scale, offset = affine if affine is not None else self.affine(key)
        return x * scale + offset

    def unnormalize(self, key: str, y: np.ndarray) -> np.ndarray:
        """On the host, float32: the policy's outputs are host arrays (a GPU kernel writes them there)."""
        f = self.features[key]
        return (np.asarray(y, np.float32) - f.offset) / f.scale

    def to_tensors(self, prefix: str = "normalizer.") -> dict[str, np.ndarray]:
        return {
            f"{prefix}{key}.{stat}": value
            for key, feature in self.features.items()
            for stat, value in feature.arrays().items()
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], keys: list[str], prefix: str = "normalizer."
    ) -> LinearNormalizer:
        """Rebuild from checkpoint tensors; raises KeyError naming the first missing tensor."""
        features = {}
        for key in keys:
            values = {}
            for stat in STAT_NAMES:
                name = f"{prefix}{key}.{stat}"
                if name not in tensors:
                    raise KeyError(name)
                values[stat] = np.asarray(tensors[name], dtype=np.float32)
            features[key] = FeatureNorm(**values)
        return cls(features)
