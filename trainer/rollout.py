"""In-process PushT rollouts during training, scored as upstream's env runner.

Synchronous like upstream's evaluation: keep the last n_obs_steps observations (the first repeated at
the start), predict a chunk, execute its n_action_steps actions, repeat; an episode's score is its
maximum reward. The trainer uses the mean over seeds to rank checkpoints when rollouts are on.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from clients.sim.pusht import PushTEnv
from policy_core.policy import DiffusionUnetPolicy


def rollout_score(policy: DiffusionUnetPolicy, seeds: list[int], max_steps: int = 300) -> float:
    """Mean over ``seeds`` of each episode's maximum reward."""
    cfg = policy.config
    env = PushTEnv(obs_keys=tuple(cfg.obs), max_episode_steps=max_steps)
    scores = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        history: deque[dict[str, np.ndarray]] = deque([obs] * cfg.n_obs_steps, maxlen=cfg.n_obs_steps)
        best, done = 0.0, False
        while not done:
            stacked = {k: np.stack([o[k] for o in history])[None] for k in cfg.obs}
            chunk = np.array(policy.predict_action(stacked, seed=seed)["action"][0])
            for action in chunk:
                obs, reward, terminated, truncated, _ = env.step(action.astype(np.float64))
                history.append(obs)
                best = max(best, reward)
                done = terminated or truncated
                if done:
                    break
        scores.append(best)
    return float(np.mean(scores))
