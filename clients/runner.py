"""ActionChunkRunner: a control loop that executes action chunks while the next one is being computed.

Actions are scheduled on absolute control ticks. A chunk computed from the observation of tick ``j``
holds the actions for ticks ``j, j+1, ...``; when it arrives at tick ``j + d`` its first ``d`` actions
are already in the past and are dropped. Where the new chunk overlaps actions still queued, the new one
wins (``merge="latest"``) or they are blended (``merge="weighted"``: ``(1 - w) * old + w * new``, LeRobot's
default ``w = 0.7``). The next chunk is requested in the background as soon as the chunk's own actions
(its first ``n_action_steps``) cover less time than the measured inference latency (plus a margin), or
fewer than ``min_queue`` actions remain, so inference latency stays hidden from the loop. In real time the
runner asks for the whole predicted trajectory (``horizon - n_obs_steps + 1`` actions): its tail is used
only where no newer chunk has arrived yet, which bridges latencies longer than half a chunk. A tick
with no action at all is *starved*: the previous action is held and the tick counted. With
``noise_seed``, request ``k`` of the episode reset with seed ``s`` draws its noise from the seed
``(noise_seed, s, k)``, so a synchronous episode is reproducible.

Works with any environment that follows the gymnasium step API (``reset(seed=) -> (obs, info)``,
``step(action) -> (obs, reward, terminated, truncated, info)``); gymnasium itself is not imported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.policy_client import ClientError, InferResult, PolicyClient


@dataclass
class EpisodeResult:
    steps: int = 0
    rewards: list[float] = field(default_factory=list)
    terminated: bool = False
    starved_ticks: int = 0
    chunks: int = 0
    dropped_actions: int = 0
    failed_requests: int = 0
    last_error: str | None = None
    round_trip_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_reward(self) -> float:
        return max(self.rewards, default=0.0)


class ActionChunkRunner:
    def __init__(
        self,
        client: PolicyClient,
        env: Any,
        control_hz: float | None = None,
        realtime: bool = True,
        merge: str = "latest",
        merge_weight: float = 0.7,
        min_queue: int = 1,
        latency_margin: float = 1.5,
        reach: bool = True,
        infer_options: dict[str, Any] | None = None,
        on_step: Callable[[int, Any, float, dict], None] | None = None,
        noise_seed: int | None = None,
    ):
        if merge not in ("latest", "weighted"):
            raise ValueError("merge must be 'latest' or 'weighted'")
        self.client = client
        self.env = env
        self.control_hz = control_hz or float(client.server_info["control_hz"])
        self.realtime = realtime
        self.merge = merge
        self.merge_weight = merge_weight
        self.min_queue = min_queue
        self.latency_margin = latency_margin
        self.infer_options = dict(infer_options or {})
        info = client.server_info
        self.n_action_steps = int(info["action"]["n_action_steps"])
        if realtime and reach:
            self.infer_options.setdefault(
                "n_action_steps", info["action"]["horizon"] - info["n_obs_steps"] + 1
            )
        self.on_step = on_step
        self.noise_seed = noise_seed
        self._latency_s: float | None = None  # running estimate of request latency
        self._primary_until = -1  # last tick covered by a chunk's own n_action_steps

    # ---- scheduling ----

    def _merge(self, queue: dict[int, np.ndarray], chunk: np.ndarray, first_tick: int, now_tick: int) -> int:
        """Insert a chunk for ticks first_tick...; returns how many of its actions were already past."""
        dropped = 0
        for i, action in enumerate(chunk):
            tick = first_tick + i
            if tick < now_tick:
                dropped += 1
            elif tick in queue and self.merge == "weighted":
                queue[tick] = (1 - self.merge_weight) * queue[tick] + self.merge_weight * action
            else:
                queue[tick] = action
        return dropped

    def _needs_request(self, tick: int) -> bool:
        ahead = self._primary_until - tick + 1
        if ahead < self.min_queue:
            return True
        if not self.realtime or self._latency_s is None:
            return False
        return ahead / self.control_hz <= self._latency_s * self.latency_margin

    def _observe_latency(self, seconds: float) -> None:
        self._latency_s = seconds if self._latency_s is None else 0.7 * self._latency_s + 0.3 * seconds

    # ---- the loop ----

    def run_episode(self, seed: int | None = None, max_steps: int = 300) -> EpisodeResult:
        result = EpisodeResult()
        obs, _ = self.env.reset(seed=seed)
        self.client.reset()
        self.client.observe(obs)
        queue: dict[int, np.ndarray] = {}
        self._primary_until = -1
        pending: dict[str, Any] = {}  # {"thread", "tick", "result" | "error"}
        dt = 1.0 / self.control_hz
        requests = 0

        def request(stacked: dict[str, np.ndarray], options: dict[str, Any]) -> None:
            start = time.perf_counter()
            try:
                pending["result"] = self.client.infer_stacked(stacked, **options)
            except Exception as e:  # counted as a failed request; the loop goes on with what it has
                pending["error"] = e
            pending["seconds"] = time.perf_counter() - start

        def launch(tick: int) -> None:
            nonlocal requests
            pending.clear()
            pending["tick"] = tick
            # The history is taken now, on the control thread: it ends with the observation of `tick`.
            stacked = self.client.stacked_history()
            options = dict(self.infer_options)
            if self.noise_seed is not None:
                key = [self.noise_seed, seed or 0, requests]
                options["seed"] = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
            requests += 1
            pending["thread"] = threading.Thread(target=request, args=(stacked, options), daemon=True)
            pending["thread"].start()

        def collect(now_tick: int, wait: bool) -> None:
            thread = pending.get("thread")
            if thread is None or (thread.is_alive() and not wait):
                return
            thread.join()
            if "result" in pending:
                res: InferResult = pending["result"]
                self._observe_latency(pending["seconds"])
                result.chunks += 1
                result.round_trip_ms.append(res.round_trip_ms)
                result.server_ms.append(res.server_timing["server_ms"])
                result.dropped_actions += self._merge(queue, res.actions, pending["tick"], now_tick)
                self._primary_until = max(self._primary_until, pending["tick"] + self.n_action_steps - 1)
            else:
                result.failed_requests += 1
                result.last_error = repr(pending.get("error"))
            pending.clear()

        # The first chunk is awaited before the clock starts.
        while not queue:
            launch(0)
            collect(0, wait=True)
            if not queue and result.failed_requests >= 10:
                raise ClientError(f"no action chunk after 10 attempts; last error: {result.last_error}")
        last_action = queue[0]
        next_time = time.perf_counter()
        for tick in range(max_steps):
            collect(tick, wait=not self.realtime and tick not in queue)
            if tick in queue:
                last_action = queue.pop(tick)
            else:
                result.starved_ticks += 1
            for t in [t for t in queue if t < tick]:
                del queue[t]
            obs, reward, terminated, truncated, info = self.env.step(last_action)
            result.steps += 1
            result.rewards.append(float(reward))
            result.infos.append(info)
            if self.on_step is not None:
                self.on_step(tick, last_action, float(reward), info)
            self.client.observe(obs)  # the observation of tick + 1
            if terminated or truncated:
                result.terminated = bool(terminated)
                break
            if "thread" not in pending and self._needs_request(tick + 1):
                launch(tick + 1)
                if not self.realtime:
                    collect(tick + 1, wait=True)
            if self.realtime:
                next_time += dt
                time.sleep(max(0.0, next_time - time.perf_counter()))
        if "thread" in pending:
            pending["thread"].join()
        return result
