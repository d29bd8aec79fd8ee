"""``dpmlx data pusht``: PushT demonstrations from the planning expert, in upstream's zarr layout.

Episodes start from upstream's seeded initial states (seeds S, S+1, ...); only successful episodes are
kept, until N are collected, so the file is reproducible from S. Row t of ``data/state`` (and
``keypoint``, ``img``) is the observation on which ``data/action`` row t was taken; ``n_contacts`` row t
counts the contacts that action caused. dtypes as upstream: float32 data (``img`` 0..255 as float32),
int64 ``meta/episode_ends``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.sim.pusht import PushTEnv
from trainer.pusht_expert import PushTExpert
from trainer.replay_buffer import write_replay_buffer


@dataclass
class Episode:
    seed: int
    success: bool
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.rows["action"])


def run_expert_episode(seed: int, with_images: bool = False, max_steps: int = 300) -> Episode:
    obs_keys = ("state", "keypoint", "image") if with_images else ("state", "keypoint")
    env = PushTEnv(obs_keys=obs_keys, max_episode_steps=max_steps)
    expert = PushTExpert(np.random.default_rng(seed))
    obs, _ = env.reset(seed=seed)
    episode = Episode(seed, False, {k: [] for k in ("state", "keypoint", "action", "n_contacts", "img")})
    while True:
        action = expert.act(env)
        episode.rows["state"].append(obs["state"])
        episode.rows["keypoint"].append(obs["keypoint"][:18].reshape(9, 2))
        if with_images:
            episode.rows["img"].append(obs["image"])
        episode.rows["action"].append(action)
        obs, _, terminated, truncated, info = env.step(action)
        episode.rows["n_contacts"].append(np.array([info["n_contacts"]]))
        if terminated or truncated:
            episode.success = bool(terminated)
            return episode


def generate(
    episodes: int,
    seed: int = 0,
    with_images: bool = False,
    max_attempts: int | None = None,
    progress: bool = True,
) -> tuple[list[Episode], int]:
    """Collect ``episodes`` successful demonstrations; returns them and the number of attempts."""
    from tqdm import tqdm

    kept: list[Episode] = []
    attempts = 0
    limit = max_attempts or 2 * episodes + 10
    with tqdm(total=episodes, desc="demonstrations", unit="ep", disable=not progress) as bar:
        while len(kept) < episodes and attempts < limit:
            episode = run_expert_episode(seed + attempts, with_images)
            attempts += 1
            if episode.success:
                kept.append(episode)
                bar.update(1)
            bar.set_postfix(success_rate=f"{len(kept) / attempts:.3f}", steps=episode.length)
    if len(kept) < episodes:
        raise RuntimeError(f"only {len(kept)} of {episodes} demonstrations succeeded in {attempts} attempts")
    return kept, attempts


def save(episodes: list[Episode], path: str | Path, with_images: bool) -> None:
    keys = ["state", "keypoint", "action", "n_contacts"] + (["img"] if with_images else [])
    data = {k: np.concatenate([np.asarray(e.rows[k]) for e in episodes]).astype(np.float32) for k in keys}
    write_replay_buffer(path, data, np.cumsum([e.length for e in episodes]))


def main(args: argparse.Namespace) -> int:
    kept, attempts = generate(args.episodes, args.seed, args.with_images)
    save(kept, args.out, args.with_images)
    steps = [e.length for e in kept]
    print(
        f"wrote {args.out}: {len(kept)} episodes, {sum(steps)} steps (mean {np.mean(steps):.1f}); "
        f"expert success rate {len(kept)}/{attempts} = {len(kept) / attempts:.3f} on seeds {args.seed}.."
        f"{args.seed + attempts - 1}"
    )
    return 0
