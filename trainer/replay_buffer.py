"""Upstream Diffusion Policy's zarr replay-buffer layout: ``data/<key>`` rows of all episodes back to
back, ``meta/episode_ends`` (int64) the exclusive end row of each episode. The original
``pusht_cchi_v7_replay.zarr`` and the files ``dpmlx data pusht`` writes share it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc

COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def write_replay_buffer(path: str | Path, data: dict[str, np.ndarray], episode_ends: np.ndarray) -> None:
    """Write (overwrite) a zarr v2 directory store readable by upstream's ReplayBuffer."""
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    n = int(episode_ends[-1]) if len(episode_ends) else 0
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    group = root.create_group("data")
    for key, value in data.items():
        if len(value) != n:
            raise ValueError(f"data/{key} has {len(value)} rows, episode_ends says {n}")
        chunks = (min(max(n, 1), 100 if value.ndim > 2 else 10_000), *value.shape[1:])
        array = group.create_array(
            key, shape=value.shape, dtype=value.dtype, chunks=chunks, compressors=COMPRESSOR
        )
        array[...] = value
    meta = root.create_group("meta")
    ends = meta.create_array(
        "episode_ends", shape=episode_ends.shape, dtype=np.int64, chunks=(max(len(episode_ends), 1),)
    )
    ends[...] = episode_ends


def read_replay_buffer(
    path: str | Path, keys: list[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Load ``data/<key>`` arrays (all, or ``keys``) and ``meta/episode_ends`` into memory."""
    root = zarr.open_group(str(path), mode="r")
    data_group = root["data"]
    names = keys if keys is not None else sorted(data_group.array_keys())
    missing = [k for k in names if k not in data_group]
    if missing:
        raise KeyError(f"{path}: no data/{missing[0]} (has {sorted(data_group.array_keys())})")
    return {k: np.asarray(data_group[k][...]) for k in names}, np.asarray(
        root["meta"]["episode_ends"][...], np.int64
    )
