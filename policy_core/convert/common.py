"""Pieces shared by the converters: the error type, typed config access, key renaming, weight loading.

Weight conversion is split in two, as in mlx-examples' ``sanitize()``:

1. ``rename`` maps every source tensor name to one of our parameter names through full-match regex rules,
   or to an explicit ignore list (aliases, buffers checked elsewhere); any other tensor is an error.
2. ``load_weights`` converts PyTorch layouts to MLX ones (decided by the type of the module that owns the
   parameter), checks shapes, and requires every parameter of our policy to be assigned exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from policy_core.checkpoint import key_mismatch
from policy_core.config import ConfigError, PolicyConfig
from policy_core.nets.transformer import TransformerForDiffusion
from policy_core.normalizer import FeatureNorm, LinearNormalizer
from policy_core.policy import DiffusionPolicy, build_policy
from policy_core.schedulers import SchedulerConfig

Rule = tuple[str, str]  # (full-match regex over a source name, re.Match.expand template of our name)
_MISSING = object()


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file and the field or tensor."""


@dataclass
class Converted:
    """A converted policy (weights and normalizer loaded) plus the provenance to store with it."""

    policy: DiffusionPolicy
    provenance: dict[str, Any]


def get(
    cfg: Mapping[str, Any], path: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING
) -> Any:
    """``cfg[a][b]...`` for a dotted ``path``, type-checked; errors name ``where`` and the field."""
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not _MISSING:
                return default
            raise ConversionError(f"{where}: missing field {path!r}")
        node = node[part]
    if isinstance(node, str) and "${" in node:
        # Diffusion Policy's train.py resolves its config before saving; an interpolation left over
        # (an ${eval:...} in particular) cannot be evaluated safely here.
        raise ConversionError(f"{where}: field {path!r} is an unresolved interpolation {node!r}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)  # JSON and YAML write 1.0 as 1
    if not isinstance(node, kinds) or (isinstance(node, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ConversionError(f"{where}: field {path!r} must be {names}, got {node!r}")
    return node


def scheduler_config(values: Mapping[str, Any], where: str) -> SchedulerConfig:
    try:
        return SchedulerConfig.from_dict(dict(values))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: unsupported noise scheduler setting: {e}") from None


def feature_norm(
    scale: np.ndarray, offset: np.ndarray, stats: Mapping[str, np.ndarray], dim: int, name: str
) -> FeatureNorm:
    """A FeatureNorm with the exact given affine map. Statistics the source lacks are derived from the
    map (the input range that maps onto [-1, 1]) so every stored tensor has a meaning."""

    def vec(x: Any, what: str) -> np.ndarray:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if v.size == 1:
            v = np.full(dim, v[0])
        if v.size != dim:
            raise ConversionError(f"normalizer {name}.{what} has {v.size} values, expected {dim}")
        return v

    scale, offset = vec(scale, "scale"), vec(offset, "offset")
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset)) and np.all(scale != 0)):
        raise ConversionError(f"normalizer {name}: statistics give a non-finite or zero scale")
    derived = {
        "min": (-1 - offset) / scale,
        "max": (1 - offset) / scale,
        "mean": -offset / scale,
        "std": 1 / scale,
    }
    values = {k: vec(stats[k], k) if k in stats else v for k, v in derived.items()}
    f32 = {k: v.astype(np.float32) for k, v in values.items()}
    return FeatureNorm(scale.astype(np.float32), offset.astype(np.float32), **f32)


def build(config: dict[str, Any], normalizer: LinearNormalizer, where: str) -> DiffusionPolicy:
    try:
        return build_policy(PolicyConfig.from_dict(config), normalizer)
    except ConfigError as e:
        raise ConversionError(f"{where}: the converted config is not supported: {e}") from None


# ---- weights --------------------------------------------------------------------------------------


def rename(
    source: Mapping[str, np.ndarray], rules: Iterable[Rule], ignore: Iterable[str], where: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Source state dict -> ({our parameter name: tensor in source layout}, ignored source names).

    Every source tensor must fully match one ignore pattern or one rule (first match wins), and no two
    source tensors may land on the same parameter.
    """
    compiled = [(re.compile(p), t) for p, t in rules]
    skip = [re.compile(p) for p in ignore]
    mapped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    ignored = []
    for key, value in source.items():
        if any(p.fullmatch(key) for p in skip):
            ignored.append(key)
            continue
        name = next((m.expand(t) for p, t in compiled if (m := p.fullmatch(key))), None)
        if name is None:
            raise ConversionError(f"{where}: unexpected tensor {key!r} (no mapping to this architecture)")
        if name in mapped:
            raise ConversionError(f"{where}: tensors {origin[name]!r} and {key!r} both map to {name!r}")
        mapped[name], origin[name] = value, key
    return mapped, ignored


def _to_mlx_layout(module: nn.Module, w: np.ndarray) -> np.ndarray:
    # Linear weights, biases, norm parameters and the transformer's (1, T, E) position embeddings share
    # PyTorch's layout.
    if w.ndim < 3 or isinstance(module, TransformerForDiffusion):
        return w
    if isinstance(module, nn.ConvTranspose1d):
        return w.transpose(1, 2, 0)  # torch (in, out, k) -> (out, k, in)
    if isinstance(module, nn.Conv1d):
        return w.transpose(0, 2, 1)  # torch (out, in, k) -> (out, k, in)
    if isinstance(module, nn.Conv2d):
        return w.transpose(0, 2, 3, 1)  # torch (out, in, kh, kw) -> (out, kh, kw, in)
    raise ConversionError(f"no layout rule for a {w.ndim}-d tensor of {type(module).__name__}")


def source_name(name: str, rules: Iterable[Rule]) -> str | None:
    """The source tensor name that the first rule mapping to our parameter ``name`` would read, or None:
    the rule run backwards (its template's groups matched in ``name``, put in place of the pattern's
    capturing groups), checked by running it forwards."""
    for pattern, template in rules:
        parts = re.split(r"\\(\d+)", template)  # literal, group number, literal, ...
        backwards = "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<g{part}>.+?)" for i, part in enumerate(parts)
        )
        match = re.fullmatch(backwards, name)
        if match is None:
            continue
        groups = {int(k[1:]): v for k, v in match.groupdict().items()}
        candidate = _fill_groups(pattern, groups)
        forward = re.fullmatch(pattern, candidate) if candidate is not None else None
        if forward is not None and forward.expand(template) == name:
            return candidate
    return None


def _fill_groups(pattern: str, groups: dict[int, str]) -> str | None:
    """``pattern`` with each top-level capturing group replaced by its value in ``groups``; None unless
    what remains is literal (escaped characters and plain text)."""
    out, number, i = [], 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
        elif char == "(" and not pattern.startswith("(?", i):
            number += 1
            if number not in groups:
                return None
            out.append(re.escape(groups[number]))
            depth, j = 0, i
            while True:  # to the matching parenthesis; capturing groups nested in it keep their numbers
                if pattern[j] == "\\":
                    j += 2
                    continue
                if pattern[j] == "(":
                    depth += 1
                    number += j > i and not pattern.startswith("(?", j)
                elif pattern[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            i = j + 1
        elif char in ".^$*+?{}[]|()":
            return None
        else:
            out.append(char)
            i += 1
    return re.sub(r"\\(.)", r"\1", "".join(out))


def load_weights(
    policy: DiffusionPolicy,
    weights: Mapping[str, np.ndarray],
    where: str,
    rules: Iterable[Rule] = (),
) -> None:
    """Assign renamed source tensors to ``policy``: each parameter exactly once, in MLX layout. With the
    ``rules`` that renamed them, a missing parameter is named as the source tensor it would come from."""
    params = dict(tree_flatten(policy.parameters()))
    missing = sorted(set(params) - set(weights))
    if missing:
        rules = list(rules)
        names = [f"{source_name(n, rules) or '?'!r} (our {n!r})" for n in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConversionError(f"{where}: missing source tensor(s) {', '.join(names)}{more}")
    mismatch = key_mismatch(params, weights)
    if mismatch:
        raise ConversionError(f"{where}: source weights do not match the converted architecture: {mismatch}")
    modules = dict(policy.named_modules())
    update = []
    for name, value in weights.items():
        value = _to_mlx_layout(modules[name.rsplit(".", 1)[0]], np.asarray(value, dtype=np.float32))
        if value.shape != tuple(params[name].shape):
            raise ConversionError(
                f"{where}: tensor for {name!r} has shape {value.shape} (MLX layout), "
                f"expected {tuple(params[name].shape)}"
            )
        update.append((name, mx.array(value)))
    policy.update(tree_unflatten(update))
    mx.eval(policy.parameters())


def unet_rules(prefix: str, *, lerobot: bool) -> list[Rule]:
    """Upstream ConditionalUnet1D (``lerobot=False``) or LeRobot's port -> ``unet.*``."""
    p = re.escape(prefix)
    crb = r"(down_modules\.\d+\.[01]|mid_modules\.[01]|up_modules\.\d+\.[01])"  # a residual block
    wb = r"(weight|bias)"
    rules = [
        # Sequential(SinusoidalPosEmb, Linear, Mish, Linear): the Linears sit at 1 and 3.
        (rf"{p}diffusion_step_encoder\.1\.{wb}", r"unet.diffusion_step_encoder.0.\1"),
        (rf"{p}diffusion_step_encoder\.3\.{wb}", r"unet.diffusion_step_encoder.1.\1"),
        (rf"{p}{crb}\.cond_encoder\.1\.{wb}", r"unet.\1.cond_encoder.\2"),  # Sequential(Mish, Linear, ...)
        (rf"{p}{crb}\.residual_conv\.{wb}", r"unet.\1.residual_conv.\2"),
        (rf"{p}final_conv\.0\.block\.0\.{wb}", r"unet.final_conv.0.conv.\1"),
        (rf"{p}final_conv\.0\.block\.1\.{wb}", r"unet.final_conv.0.norm.\1"),
        (rf"{p}final_conv\.1\.{wb}", r"unet.final_conv.1.\1"),
    ]
    if lerobot:
        # LeRobot names a block's two Conv1dBlocks conv1/conv2; its down/up samplers are bare convs.
        return rules + [
            (rf"{p}{crb}\.conv1\.block\.0\.{wb}", r"unet.\1.blocks.0.conv.\2"),
            (rf"{p}{crb}\.conv1\.block\.1\.{wb}", r"unet.\1.blocks.0.norm.\2"),
            (rf"{p}{crb}\.conv2\.block\.0\.{wb}", r"unet.\1.blocks.1.conv.\2"),
            (rf"{p}{crb}\.conv2\.block\.1\.{wb}", r"unet.\1.blocks.1.norm.\2"),
            (rf"{p}((?:down|up)_modules\.\d+)\.2\.{wb}", r"unet.\1.2.\2"),
        ]
    # Upstream: blocks.{0,1}.block.{0: Conv1d, 1: GroupNorm}; Downsample1d / Upsample1d wrap a `.conv`.
    return rules + [
        (rf"{p}{crb}\.blocks\.([01])\.block\.0\.{wb}", r"unet.\1.blocks.\2.conv.\3"),
        (rf"{p}{crb}\.blocks\.([01])\.block\.1\.{wb}", r"unet.\1.blocks.\2.norm.\3"),
        (rf"{p}((?:down|up)_modules\.\d+)\.2\.conv\.{wb}", r"unet.\1.2.\2"),
    ]


def transformer_rules(prefix: str) -> list[Rule]:
    """Upstream TransformerForDiffusion -> ``transformer.*``: the same module names (PyTorch's
    Transformer{En,De}coderLayer and MultiheadAttention, the MLP memory encoder's Linears at 0 and 2)."""
    p = re.escape(prefix)
    wb = r"(weight|bias)"
    layer = r"((?:encoder|decoder)\.layers\.\d+)"
    attention = rf"{layer}\.(self_attn|multihead_attn)"
    return [
        (rf"{p}(pos_emb|cond_pos_emb)", r"transformer.\1"),
        (rf"{p}(input_emb|cond_obs_emb|ln_f|head)\.{wb}", r"transformer.\1.\2"),
        (rf"{p}encoder\.([02])\.{wb}", r"transformer.encoder.\1.\2"),
        (rf"{p}{attention}\.(in_proj_weight|in_proj_bias)", r"transformer.\1.\2.\3"),
        (rf"{p}{attention}\.out_proj\.{wb}", r"transformer.\1.\2.out_proj.\3"),
        (rf"{p}{layer}\.(linear[12]|norm[123])\.{wb}", r"transformer.\1.\2.\3"),
    ]


def check_attention_masks(
    sd: Mapping[str, np.ndarray], prefix: str, transformer: TransformerForDiffusion, where: str
) -> None:
    """Upstream's causal ``mask`` and ``memory_mask`` buffers (additive: 0 where attention looks, -inf
    elsewhere) must be the masks our transformer computes, and present exactly when it is causal."""
    for name, ours in zip(("mask", "memory_mask"), transformer.masks(), strict=True):
        theirs = sd.get(prefix + name)
        if ours is None or theirs is None:
            if ours is not None or theirs is not None:
                raise ConversionError(
                    f"{where}: {prefix}{name} is {'absent' if theirs is None else 'present'}"
                    f" but causal_attn is {ours is not None}"
                )
            continue
        if theirs.shape != tuple(ours.shape) or not np.array_equal(theirs == 0, np.array(ours)):
            raise ConversionError(f"{where}: {prefix}{name} is not the causal mask of this configuration")


def resnet_rules(prefix: str, key: str) -> list[Rule]:
    """A torchvision ResNet18 minus avgpool/fc as ``Sequential`` (children 0 conv1, 1 bn1, 4..7 layer1..4)
    -> ``rgb_encoders.<key>.trunk.*``. Norm tensors cover GroupNorm and BatchNorm (running statistics)."""
    p = re.escape(prefix)
    dst = f"rgb_encoders.{key}.trunk."
    norm = r"(?:weight|bias|running_mean|running_var)"
    block = rf"(conv[12]\.weight|bn[12]\.{norm}|downsample\.0\.weight|downsample\.1\.{norm})"
    rules = [(rf"{p}0\.weight", f"{dst}conv1.weight"), (rf"{p}1\.({norm})", dst + r"bn1.\1")]
    rules += [(rf"{p}{i + 4}\.([01])\.{block}", dst + f"layer{i + 1}" + r".\1.\2") for i in range(4)]
    return rules


# ---- spatial softmax ------------------------------------------------------------------------------


def trunk_feature_hw(height: int, width: int) -> tuple[int, int]:
    """Feature-map size of the ResNet18 trunk: conv1 (7, s2, p3), maxpool (3, s2, p1), 3 stride-2 stages."""

    def size(n: int) -> int:
        n = (n + 6 - 7) // 2 + 1
        for _ in range(4):
            n = (n + 2 - 3) // 2 + 1
        return n

    return size(height), size(width)


def check_keypoint_grid(pos_x: np.ndarray, pos_y: np.ndarray, hw: tuple[int, int], where: str) -> None:
    """The source's spatial-softmax position buffers must equal the grid our SpatialSoftmax computes
    (pos_x[h * W + w] = linspace(-1, 1, W)[w]); a mismatch means the crop or image shape was misread."""
    h, w = hw
    want_x = np.broadcast_to(np.linspace(-1, 1, w)[None, :], (h, w)).reshape(-1)
    want_y = np.broadcast_to(np.linspace(-1, 1, h)[:, None], (h, w)).reshape(-1)
    got_x, got_y = np.asarray(pos_x).reshape(-1), np.asarray(pos_y).reshape(-1)
    if got_x.shape != want_x.shape or not (
        np.allclose(got_x, want_x, atol=1e-6) and np.allclose(got_y, want_y, atol=1e-6)
    ):
        raise ConversionError(
            f"{where}: spatial-softmax position grid ({got_x.size} points) does not match the {h}x{w} "
            "feature map implied by the image and crop shapes"
        )
