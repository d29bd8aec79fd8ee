"""ActionChunkRunner: a control loop that executes action chunks while the next one is being computed.

Actions are scheduled on absolute control ticks. A chunk computed from the observation of tick ``j``
holds the actions for ticks ``j, j+1, ...``; when it arrives at tick ``j + d`` its first ``d`` actions
are already in the past and are dropped. Where the new chunk overlaps actions still queued:

- ``merge="latest"``: the new one wins (a naive switch);
- ``merge="weighted"``: they are blended, ``(1 - w) * old + w * new`` (LeRobot's default ``w = 0.7``);
- ``merge="ensemble"``: temporal ensembling (ACT): every chunk's action for a tick is averaged with
  weights ``exp(-m i)``, ``i = 0`` the oldest (ACT's ``m = 0.01``);
- ``merge="rtc"``: real-time chunking: each request carries the actions still queued from the tick of
  its observation on (``options.prefix``) and the delay it expects in ticks (``options.delay``, the
  measured latency), so the server inpaints the new chunk to continue them; the runner keeps executing
  the queued actions until that planned tick and switches there (later if the chunk comes later).

The next chunk is requested in the background as soon as the chunk's own actions (its first
``n_action_steps``) cover less time than the measured inference latency (plus a margin), or fewer than
``min_queue`` actions remain, so inference latency stays hidden from the loop. When it prefetches, the
runner asks for the whole predicted trajectory (``horizon - n_obs_steps + 1`` actions): its tail is used
only where no newer chunk has arrived yet, which bridges latencies longer than half a chunk. A tick
with no action at all is *starved*: the previous action is held and the tick counted. With
``noise_seed``, request ``k`` of the episode reset with seed ``s`` draws its noise from the seed
``(noise_seed, s, k)``, so an episode that does not run against the wall clock is reproducible.

``realtime=False`` runs on simulated time instead of the wall clock: each request is answered at once and
its chunk becomes usable ``delay_ticks`` ticks after its observation (the environment steps the queued
actions meanwhile). With ``prefetch`` the next request goes out as the current chunk's own actions come
within ``delay_ticks`` of running out; without it (synchronous execution) a request goes out only once
they have run out, the robot holds its last action while it waits, and the chunk starts at the tick it
arrives. With ``delay_ticks=0`` both are upstream's synchronous evaluation.

Works with any environment that follows the gymnasium step API (``reset(seed=) -> (obs, info)``,
``step(action) -> (obs, reward, terminated, truncated, info)``); gymnasium itself is not imported.
"""

from __future__ import annotations

import math
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
    actions: list[np.ndarray] = field(default_factory=list)  # executed, one per tick
    sources: list[int] = field(default_factory=list)  # the newest chunk (0, 1, ...) in each tick's action

    @property
    def max_reward(self) -> float:
        return max(self.rewards, default=0.0)


MERGES = ("latest", "weighted", "ensemble", "rtc")


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
        delay_ticks: int = 0,
        prefetch: bool = True,
        ensemble_decay: float = 0.01,
    ):
        """``delay_ticks`` and ``prefetch`` apply to simulated time (``realtime=False``) only."""
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}")
        if delay_ticks < 0 or (realtime and delay_ticks):
            raise ValueError("delay_ticks must be >= 0, and 0 in real time (the latency is measured)")
        self.client = client
        self.env = env
        self.control_hz = control_hz or float(client.server_info["control_hz"])
        self.realtime = realtime
        self.merge = merge
        self.merge_weight = merge_weight
        self.ensemble_decay = ensemble_decay
        self.min_queue = min_queue
        self.latency_margin = latency_margin
        self.delay_ticks = delay_ticks
        self.prefetch = realtime or prefetch
        self.infer_options = dict(infer_options or {})
        info = client.server_info
        self.n_action_steps = int(info["action"]["n_action_steps"])
        self.max_actions = info["action"]["horizon"] - info["n_obs_steps"] + 1
        # Prefetching runs ask for the whole trajectory (its tail bridges latency and is what "rtc" and
        # "ensemble" overlap); upstream's synchronous evaluation (simulated, no delay, "latest") does not.
        if reach and self.prefetch and (realtime or delay_ticks or merge != "latest"):
            self.infer_options.setdefault("n_action_steps", self.max_actions)
        self.on_step = on_step
        self.noise_seed = noise_seed
        self._latency_s: float | None = None  # running estimate of request latency
        self._primary_until = -1  # last tick covered by a chunk's own n_action_steps
        self._ensemble: dict[int, tuple[np.ndarray, float, int]] = {}  # tick: (sum w a, sum w, count)

    # ---- scheduling ----

    def _merge(
        self,
        queue: dict[int, np.ndarray],
        chunk: np.ndarray,
        first_tick: int,
        now_tick: int,
        switch_tick: int | None = None,
        sources: dict[int, int] | None = None,
        index: int = 0,
    ) -> int:
        """Insert a chunk for ticks first_tick...; returns how many of its actions were already past.
        With "rtc", queued actions before ``switch_tick`` (the tick the request planned for) stay.
        ``sources`` records ``index`` for every tick whose action the chunk now makes or joins."""
        dropped = 0
        for i, action in enumerate(chunk):
            tick = first_tick + i
            if tick < now_tick:
                dropped += 1
                continue
            if sources is not None and not (tick in queue and switch_tick is not None and tick < switch_tick):
                sources[tick] = index
            if tick in queue and self.merge == "weighted":
                queue[tick] = (1 - self.merge_weight) * queue[tick] + self.merge_weight * action
            elif self.merge == "ensemble":
                total, weights, count = self._ensemble.get(tick, (0.0, 0.0, 0))
                weight = math.exp(-self.ensemble_decay * count)
                total, weights = total + weight * action, weights + weight
                self._ensemble[tick] = (total, weights, count + 1)
                queue[tick] = total / weights
            elif tick in queue and switch_tick is not None and tick < switch_tick:
                continue  # frozen: executed from the current chunk
            else:
                queue[tick] = action
        return dropped

    def _latency_ticks(self) -> float | None:
        """The expected inference latency in ticks: the simulated delay, or the measured latency."""
        if not self.realtime:
            return self.delay_ticks if self.prefetch else None
        return None if self._latency_s is None else self._latency_s * self.control_hz

    def _needs_request(self, tick: int) -> bool:
        ahead = self._primary_until - tick + 1
        if ahead < self.min_queue:
            return True
        latency = self._latency_ticks()
        if latency is None:
            return False
        return ahead <= latency * (self.latency_margin if self.realtime else 1.0)

    def _rtc_options(self, queue: dict[int, np.ndarray], tick: int) -> dict[str, Any]:
        """The queued actions from ``tick`` on (the new chunk's first action is for ``tick``) and the
        delay the request expects, at most their number."""
        prefix = []
        while tick + len(prefix) in queue and len(prefix) < self.max_actions:
            prefix.append(queue[tick + len(prefix)])
        if not prefix:
            return {}
        delay = min(math.ceil(self._latency_ticks() or 0), len(prefix))
        return {"prefix": np.asarray(prefix, np.float32), "delay": int(delay)}

    def _observe_latency(self, seconds: float) -> None:
        self._latency_s = seconds if self._latency_s is None else 0.7 * self._latency_s + 0.3 * seconds

    # ---- the loop ----

    def run_episode(self, seed: int | None = None, max_steps: int = 300) -> EpisodeResult:
        result = EpisodeResult()
        obs, _ = self.env.reset(seed=seed)
        self.client.reset()
        self.client.observe(obs)
        queue: dict[int, np.ndarray] = {}
        sources: dict[int, int] = {}  # tick: the newest chunk in its queued action
        self._primary_until = -1
        self._ensemble = {}
        # {"tick", "ready" (simulated time), "switch" (rtc), "thread", "result" | "error", "seconds"}
        pending: dict[str, Any] = {}
        dt = 1.0 / self.control_hz
        requests = 0

        def request(stacked: dict[str, np.ndarray], options: dict[str, Any]) -> None:
            start = time.perf_counter()
            try:
                pending["result"] = self.client.infer_stacked(stacked, **options)
            except Exception as e:  # counted as a failed request; the loop goes on with what it has
                pending["error"] = e
            pending["seconds"] = time.perf_counter() - start

        def launch(tick: int, ready: int) -> None:
            nonlocal requests
            pending.clear()
            pending["tick"], pending["ready"] = tick, ready
            # The history is taken now, on the control thread: it ends with the observation of `tick`.
            stacked = self.client.stacked_history()
            options = dict(self.infer_options)
            if self.noise_seed is not None:
                key = [self.noise_seed, seed or 0, requests]
                options["seed"] = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
            if self.merge == "rtc":
                options.update(self._rtc_options(queue, tick))
                pending["switch"] = tick + options.get("delay", 0)
            requests += 1
            if self.realtime:
                pending["thread"] = threading.Thread(target=request, args=(stacked, options), daemon=True)
                pending["thread"].start()
            else:
                request(stacked, options)

        def collect(now_tick: int, wait: bool) -> None:
            thread = pending.get("thread")
            if not pending or (thread is not None and thread.is_alive() and not wait):
                return
            if thread is None and now_tick < pending["ready"]:
                return  # simulated time: not usable yet
            if thread is not None:
                thread.join()
            if "result" in pending:
                res: InferResult = pending["result"]
                self._observe_latency(pending["seconds"])
                # Synchronous execution: the robot waited for the chunk, which starts when it arrives.
                first = pending["tick"] if self.prefetch else now_tick
                result.dropped_actions += self._merge(
                    queue, res.actions, first, now_tick, pending.get("switch"), sources, result.chunks
                )
                result.chunks += 1
                result.round_trip_ms.append(res.round_trip_ms)
                result.server_ms.append(res.server_timing["server_ms"])
                self._primary_until = max(self._primary_until, first + self.n_action_steps - 1)
            else:
                result.failed_requests += 1
                result.last_error = repr(pending.get("error"))
            pending.clear()

        # The first chunk is awaited before the clock starts.
        while not queue:
            launch(0, ready=0)
            collect(0, wait=True)
            if not queue and result.failed_requests >= 10:
                raise ClientError(f"no action chunk after 10 attempts; last error: {result.last_error}")
        last_action, source = queue[0], 0
        next_time = time.perf_counter()
        for tick in range(max_steps):
            collect(tick, wait=False)
            if tick in queue:
                last_action, source = queue.pop(tick), sources.get(tick, source)
            else:
                result.starved_ticks += 1
            for stale in (queue, sources, self._ensemble):
                for t in [t for t in stale if t <= tick]:
                    del stale[t]
            obs, reward, terminated, truncated, info = self.env.step(last_action)
            result.steps += 1
            result.rewards.append(float(reward))
            result.infos.append(info)
            result.actions.append(np.asarray(last_action))
            result.sources.append(source)
            if self.on_step is not None:
                self.on_step(tick, last_action, float(reward), info)
            self.client.observe(obs)  # the observation of tick + 1
            if terminated or truncated:
                result.terminated = bool(terminated)
                break
            if not pending and tick + 1 < max_steps and self._needs_request(tick + 1):
                launch(tick + 1, ready=tick + 1 + self.delay_ticks)
            if self.realtime:
                next_time += dt
                time.sleep(max(0.0, next_time - time.perf_counter()))
        if "thread" in pending:
            pending["thread"].join()
        return result
