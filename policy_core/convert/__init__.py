"""Convert LeRobot and real-stanford/diffusion_policy checkpoints to our ``.safetensors`` format.

``convert(src, out)`` picks the reader from ``src``: a folder (LeRobot ``pretrained_model/``, or a folder
holding one) or a file (a Diffusion Policy workspace ``.ckpt``). The result loads with ``load_policy`` and
serves with ``dpmlx serve`` unchanged. A ``.ckpt`` is a pickle: it is read weights-only, refusing any type
that upstream checkpoints do not hold, unless ``trust_pickle`` (then only convert files you trust).
"""

from __future__ import annotations

import os
from pathlib import Path

from policy_core.checkpoint import save_policy
from policy_core.convert.common import ConversionError, Converted
from policy_core.convert.lerobot import convert_lerobot, find_model_folder
from policy_core.convert.upstream import UnsafeCheckpointError, UnsafePickleWarning, convert_upstream

__all__ = [
    "ConversionError",
    "Converted",
    "UnsafeCheckpointError",
    "UnsafePickleWarning",
    "convert",
    "convert_lerobot",
    "convert_upstream",
]


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    use_ema: bool | None = None,
    control_hz: float | None = None,
    trust_pickle: bool = False,
) -> tuple[Converted, str]:
    """Convert ``src`` and write ``out`` atomically; return the conversion and the file's content hash.

    ``use_ema``: Diffusion Policy checkpoints only; None takes ``ema_model`` when present. LeRobot folders
    hold one set of weights. ``control_hz`` overrides the default control rate (10 Hz) in the metadata.
    ``trust_pickle``: read a ``.ckpt`` with full unpickling, running whatever it holds (trusted files only).
    """
    src = Path(src)
    if src.is_dir():
        if find_model_folder(src) is None:
            raise ConversionError(f"{src}: a folder, but no LeRobot config.json here or in pretrained_model/")
        if use_ema:
            raise ConversionError(f"{src}: LeRobot folders hold one set of weights; --use-ema does not apply")
        converted = convert_lerobot(src, control_hz)
    elif src.is_file():
        converted = convert_upstream(src, use_ema, control_hz, trust_pickle)
    else:
        raise ConversionError(f"{src}: no such file or folder")
    sha = save_policy(
        converted.policy, out, provenance={"converter": "dpmlx convert", **converted.provenance}
    )
    return converted, sha
