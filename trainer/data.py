"""Training data: upstream's sequence sampling over a zarr replay buffer, task adapters, prefetching.

``SequenceSampler`` follows upstream Diffusion Policy: windows of ``horizon`` rows inside each episode,
starting up to ``pad_before`` rows before its start and ending up to ``pad_after`` rows after its end,
with out-of-episode rows filled by repeating the episode's first / last row (for every key, actions
included). Validation episodes are held out whole.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policy_core.normalizer import LinearNormalizer, fit_limits, image_range
from trainer.replay_buffer import read_replay_buffer

TASKS = ("pusht_lowdim", "pusht_image")


def task_arrays(task: str, path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-row arrays named as the policy's observation keys (+ ``action``), and the episode ends."""
    if task == "pusht_lowdim":
        raw, ends = read_replay_buffer(path, ["keypoint", "state", "action"])
        n = len(raw["action"])
        keypoint = np.concatenate([raw["keypoint"].reshape(n, -1), raw["state"][:, :2]], axis=1)
        return {"keypoint": keypoint.astype(np.float32), "action": raw["action"].astype(np.float32)}, ends
    if task == "pusht_image":
        raw, ends = read_replay_buffer(path, ["img", "state", "action"])
        # Images are stored 0..255 (as float32 upstream); uint8 is what cameras and the wire carry.
        image = np.clip(np.rint(raw["img"]), 0, 255).astype(np.uint8)
        return {
            "image": image,
            "agent_pos": raw["state"][:, :2].astype(np.float32),
            "action": raw["action"].astype(np.float32),
        }, ends
    raise ValueError(f"data.task must be one of {TASKS}, got {task!r}")


def fit_normalizer(arrays: dict[str, np.ndarray], image_keys: list[str]) -> LinearNormalizer:
    """Limits normalisation fitted on all rows (as upstream), fixed [0, 1] -> [-1, 1] for images."""
    return LinearNormalizer(
        {k: image_range(v.shape[-1]) if k in image_keys else fit_limits(v) for k, v in arrays.items()}
    )


def split_episodes(n_episodes: int, val_ratio: float, seed: int) -> np.ndarray:
    """Boolean mask of validation episodes (upstream's get_val_mask)."""
    mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0 or n_episodes < 2:
        return mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    mask[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    return mask


class SequenceSampler:
    def __init__(
        self,
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int,
        pad_after: int,
        episode_mask: np.ndarray | None = None,
    ):
        pad_before = min(max(pad_before, 0), horizon - 1)
        pad_after = min(max(pad_after, 0), horizon - 1)
        starts = np.concatenate([[0], episode_ends[:-1]])
        windows = []  # (buffer_start, buffer_end, sample_start, sample_end)
        for i, (start, end) in enumerate(zip(starts, episode_ends, strict=True)):
            if episode_mask is not None and not episode_mask[i]:
                continue
            length = int(end - start)
            for idx in range(-pad_before, length - horizon + pad_after + 1):
                buffer_start = max(idx, 0) + start
                buffer_end = min(idx + horizon, length) + start
                sample_start = buffer_start - (idx + start)
                windows.append(
                    (buffer_start, buffer_end, sample_start, sample_start + buffer_end - buffer_start)
                )
        self.windows = np.array(windows, dtype=np.int64).reshape(-1, 4)
        self.horizon = horizon

    def __len__(self) -> int:
        return len(self.windows)

    def sample(
        self, arrays: dict[str, np.ndarray], index: int, steps: dict[str, int]
    ) -> dict[str, np.ndarray]:
        """Window ``index``: each key's first ``steps[key]`` rows (edge rows repeated)."""
        b0, b1, s0, s1 = self.windows[index]
        out = {}
        for key, array in arrays.items():
            rows = steps.get(key, self.horizon)
            # Position in the padded window -> buffer row, clamped to the episode's first / last row.
            positions = np.clip(np.arange(rows), s0, s1 - 1) - s0 + b0
            out[key] = array[positions]
        return out


@dataclass
class BatchSpec:
    batch_size: int
    seed: int
    obs_steps: dict[str, int]  # rows of each observation key the policy reads (n_obs_steps)


def batches(
    arrays: dict[str, np.ndarray], sampler: SequenceSampler, spec: BatchSpec, start_step: int = 0
) -> Iterator[dict]:
    """Endless batches in a deterministic order: epoch e shuffles with (seed, e); drop_last. Batch k of the
    stream is the same whether the stream starts at 0 or resumes at ``start_step`` = k."""
    per_epoch = len(sampler) // spec.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(sampler)} training windows are fewer than one batch of {spec.batch_size}")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([spec.seed, epoch]).permutation(len(sampler))
        for k in range(offset, per_epoch):
            picks = order[k * spec.batch_size : (k + 1) * spec.batch_size]
            samples = [sampler.sample(arrays, int(i), spec.obs_steps) for i in picks]
            stacked = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
            action = stacked.pop("action")
            yield {"obs": stacked, "action": action}
            step += 1


@dataclass
class _Failure:
    error: BaseException


def prefetch(iterator: Iterator, depth: int = 4) -> Iterator:
    """Run ``iterator`` on a background thread so batch assembly overlaps the train step."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in iterator:
                put(item)
                if stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer instead of leaving it waiting
            put(_Failure(e))

    thread = threading.Thread(target=produce, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item = buffer.get()
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
