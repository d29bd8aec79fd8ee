"""In-process PushT rollouts during training, scored as upstream's env runner.

Synchronous like upstream's evaluation: keep the last n_obs_steps observations (the first repeated at
the start), predict a chunk, execute its n_action_steps actions, repeat; an episode's score is its
maximum reward. The trainer uses the mean over seeds to rank checkpoints when rollouts are on.
"""

from __future__ import annotations

import numpy as np

from clients.policy_client import ObservationHistory
from clients.sim.pusht import PushTEnv
from policy_core.policy import DiffusionPolicy


def rollout_score(policy: DiffusionPolicy, seeds: list[int], max_steps: int = 300) -> float:
    """Mean over ``seeds`` of each episode's maximum reward."""
    cfg = policy.config
    env = PushTEnv(obs_keys=tuple(cfg.obs), max_episode_steps=max_steps)
    scores = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        history = ObservationHistory(cfg.n_obs_steps)
        history.append(obs)
        best, done, chunk_index = 0.0, False, 0
        while not done:
            stacked = {k: v[None] for k, v in history.stacked().items()}
            # A fresh, reproducible noise draw for every chunk of every episode.
            chunk = policy.predict_action(stacked, seed=seed * 10_000 + chunk_index)["action"][0]
            chunk_index += 1
            for action in chunk:
                obs, reward, terminated, truncated, _ = env.step(action.astype(np.float64))
                history.append(obs)
                best = max(best, reward)
                done = terminated or truncated
                if done:
                    break
        scores.append(best)
    return float(np.mean(scores))
