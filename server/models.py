"""Resident models: one worker thread per loaded model, and the manager that swaps them.

Every MLX operation of a model (load, warm-up, inference) runs on that model's own worker thread, since
MLX streams belong to the thread that made them. A new model loads and warms up on its own thread while
the active one keeps serving; the swap is one reference assignment, so requests already queued at the
old model finish there and nothing is dropped. The previous model stays resident for rollback
(Triton's model-control semantics).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policy_core.policy import ObservationError
from policy_core.rtc import ActionPrefix
from proto.messages import ErrorCode, InferOptions, ProtocolError, Request
from server.metrics import Metrics

log = logging.getLogger("dpmlx.server")

# The PushT keypoint policy trained by `dpmlx train` (configs/pusht_keypoint_small.yaml), shipped with
# the package: `dpmlx serve` without --checkpoint and `dpmlx demo` serve it.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "shipped" / "pusht_keypoint_small.safetensors"


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8  # rows per executed batch (a single larger request runs alone)
    # How long the first request of a batch may wait for company, and only for the company the last batch
    # of the same options had: its requests plus those waiting when its inference finished (an upper bound
    # where some of those asked with other options). A lone robot never waits (2 ms is ~40% of a GPU
    # lowdim request); synchronised robots are gathered into one batch (4 closed-loop clients on the CPU
    # took 561 ms a round trip when nobody waited, 346 ms with this rule).
    max_wait_ms: float = 2.0
    max_queue: int = 64  # queued requests per model before `overloaded`
    dtype: str | None = None  # weight dtype override for loaded checkpoints

    def buckets(self, exact: Iterable[int] = ()) -> list[int]:
        """The sizes a batch is padded up to, so that only these few are compiled: powers of two, the
        largest ``max_batch``, and the sizes in ``exact`` (those a model runs as one CUDA kernel, whose
        time grows with every padded row: ``DiffusionUnetPolicy.unpadded_batch_sizes``)."""
        sizes = {self.max_batch, *(e for e in exact if 1 <= e <= self.max_batch)}
        b = 1
        while b < self.max_batch:
            sizes.add(b)
            b *= 2
        return sorted(sizes)


@dataclass
class ModelInfo:
    name: str
    version: int
    sha256: str
    path: str
    metadata: dict[str, Any] = field(repr=False)

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def describe(self) -> dict[str, Any]:
        return {**self.wire(), "path": self.path, "training_step": self.metadata.get("training_step")}

    @property
    def obs_schema(self) -> dict[str, dict[str, Any]]:
        return self.metadata["obs_schema"]


class NonFiniteActions(RuntimeError):
    """The policy produced NaN or Inf actions: never sent to a robot. At load (NaN or Inf weights) the
    checkpoint is refused; for a request (observations far outside the training range, or a CUDA sampler
    that aborted unnoticed) the batch is answered with an internal error."""


@dataclass
class PendingInfer:
    """A validated infer request waiting for a worker; ``reply`` sends the encoded answer back."""

    request: Request
    obs: dict[str, np.ndarray]  # with batch axis
    batched: bool
    received: float  # time.perf_counter() at receipt
    reply: Callable[[dict[str, Any]], None]

    @property
    def rows(self) -> int:
        return next(iter(self.obs.values())).shape[0]


def _row_prefixes(batch: list[PendingInfer], rows: int) -> list[ActionPrefix | None] | None:
    """Each row's real-time chunking prefix (None for rows without one, padding rows included), or None
    where no request of the batch has one."""
    if all(p.request.options.prefix is None for p in batch):
        return None
    prefixes: list[ActionPrefix | None] = []
    for p in batch:
        options = p.request.options
        if options.prefix is None:
            prefixes += [None] * p.rows
            continue
        actions = options.prefix if p.batched else options.prefix[None]
        prefixes += [ActionPrefix(a, options.delay, **options.rtc) for a in actions]
    return prefixes + [None] * (rows - len(prefixes))


def load_error_message(path: Path, error: Exception) -> str:
    """One line naming the error's type and the checkpoint (once: checkpoint errors name it already)."""
    message = " ".join(str(error).split())
    if str(path) not in message:
        message = f"{path}: {message}"
    return f"{type(error).__name__}: {message}"


class ModelWorker(threading.Thread):
    """Loads one checkpoint, warms it up, then serves batches from its queue until retired."""

    def __init__(
        self,
        path: Path,
        version: int,
        batching: BatchingConfig,
        metrics: Metrics,
        on_ready: Callable[[ModelWorker], None],
        on_failed: Callable[[ModelWorker, Exception], None],
        log_failure: bool = True,
    ):
        super().__init__(name=f"model-worker-v{version}", daemon=True)
        self.path = path
        self.version = version
        self.batching = batching
        self.metrics = metrics
        self.info: ModelInfo | None = None
        self.log_failure = log_failure  # else whoever started the load reports its failure
        self.error: Exception | None = None  # why the load failed
        self.loaded = threading.Event()  # set once the load has succeeded or failed
        self.queue: queue.Queue[PendingInfer] = queue.Queue(maxsize=batching.max_queue)
        self._deferred: deque[PendingInfer] = deque()
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._retired = threading.Event()
        # Guards the decision to exit against a concurrent submit, so no accepted request is orphaned.
        self._submit_lock = threading.Lock()
        self._closed = False
        # (batch key, requests) the last batch saw: see BatchingConfig.max_wait_ms.
        self._company: tuple[tuple, int] = ((), 1)
        self.buckets = batching.buckets()  # with the model's own sizes once it is loaded
        self.policy = None

    # ---- called from other threads ----

    def submit(self, pending: PendingInfer) -> None:
        with self._submit_lock:
            if self._closed:
                raise ProtocolError(ErrorCode.NOT_READY, "model has been retired")
            try:
                self.queue.put_nowait(pending)
            except queue.Full:
                raise ProtocolError(
                    ErrorCode.OVERLOADED, f"queue full ({self.batching.max_queue} requests)"
                ) from None

    def retire(self) -> None:
        """Stop after serving what is already queued."""
        self._retired.set()

    def depth(self) -> int:
        return self.queue.qsize() + len(self._deferred)

    # ---- worker thread ----

    def run(self) -> None:
        from policy_core.threads import release_mlx_thread_state

        try:
            self._serve()
        finally:
            self.policy = None
            release_mlx_thread_state()

    def _serve(self) -> None:
        try:
            self._load()
        except Exception as e:  # a failed load must never take the server down
            self.error = e
            self._on_failed(self, e)
            self.loaded.set()
            return
        self._on_ready(self)
        self.loaded.set()
        while True:
            batch = self._next_batch()
            if batch:
                try:
                    self._execute(batch)
                except Exception:  # e.g. a reply that cannot be sent: keep serving the queue
                    log.exception("failed to answer a batch")
            elif self._retired.is_set() and self.depth() == 0:
                with self._submit_lock:
                    if self.depth() == 0:
                        self._closed = True
                        break

    def _load(self) -> None:
        from policy_core.checkpoint import policy_from_checkpoint, read_checkpoint

        ckpt = read_checkpoint(self.path)
        policy = policy_from_checkpoint(ckpt, dtype=self.batching.dtype)
        name = ckpt.metadata.get("provenance", {}).get("name") or self.path.stem
        self.info = ModelInfo(name, self.version, ckpt.sha256, str(self.path), ckpt.metadata)
        # Warm-up: compile the default sampler for every batch bucket, so the first request is fast.
        self.buckets = self.batching.buckets(policy.unpadded_batch_sizes(self.batching.max_batch))
        schema = self.info.obs_schema
        for rows in self.buckets:
            obs = {k: np.zeros((rows, *spec["shape"]), dtype=spec["dtype"]) for k, spec in schema.items()}
            if not np.isfinite(policy.predict_action(obs, seed=0)["action_pred"]).all():
                raise NonFiniteActions("the policy's actions for zero observations are not finite")
        self.policy = policy

    def _take(self, timeout: float) -> PendingInfer | None:
        if self._deferred:
            return self._deferred.popleft()
        try:
            return self.queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _next_batch(self) -> list[PendingInfer]:
        first = self._take(timeout=0.05)
        if first is None:
            return []
        batch, rows, key = [first], first.rows, first.request.options.batch_key()
        company_key, company = self._company
        expected = company if key == company_key else 1  # requests of other options can't join it
        deadline = time.perf_counter() + self.batching.max_wait_ms / 1e3
        skipped: list[PendingInfer] = []
        while rows < self.batching.max_batch:
            # Wait only while fewer requests are here than last time; else take only what already queued.
            waiting = len(batch) < expected
            nxt = self._take(timeout=deadline - time.perf_counter() if waiting else 0)
            if nxt is None:
                break
            if nxt.request.options.batch_key() == key and rows + nxt.rows <= self.batching.max_batch:
                batch.append(nxt)
                rows += nxt.rows
            else:
                skipped.append(nxt)
        self._deferred.extendleft(reversed(skipped))  # keep arrival order for the next batch
        return batch

    def _note_batch(self, batch: list[PendingInfer]) -> None:
        """After a batch's inference, before its replies (a lone client's next request is not company):
        how many requests the next batch may wait to gather."""
        self._company = (batch[0].request.options.batch_key(), len(batch) + self.depth())

    def _execute(self, batch: list[PendingInfer]) -> None:
        import mlx.core as mx

        policy = self.policy
        opts: InferOptions = batch[0].request.options
        start = time.perf_counter()
        try:
            cfg = policy.config
            kind = opts.scheduler or cfg.sampler
            steps = opts.num_inference_steps or cfg.default_inference_steps
            rows = sum(p.rows for p in batch)
            padded = next(b for b in self.buckets if b >= rows)  # rows <= max_batch (front end)
            obs = {k: np.concatenate([p.obs[k] for p in batch]) for k in batch[0].obs}
            # Each request's noise comes from its own seed, so results do not depend on batching.
            noises = [policy.sample_noise(p.rows, steps, p.request.options.seed) for p in batch]
            x_init, step_noise = noises[0]  # a lone request's as drawn: no copies
            if len(noises) > 1:
                x_init = mx.concatenate([n[0] for n in noises])
                step_noise = mx.concatenate([n[1] for n in noises], axis=1)
            if padded > rows:
                obs = {
                    k: np.concatenate([v, np.repeat(v[-1:], padded - rows, axis=0)]) for k, v in obs.items()
                }
                x_init = mx.concatenate([x_init, mx.zeros((padded - rows, *x_init.shape[1:]))])
                step_noise = mx.concatenate(
                    [step_noise, mx.zeros((steps, padded - rows, *step_noise.shape[2:]))], axis=1
                )
            out = policy.predict_action(
                obs,
                scheduler=kind,
                num_inference_steps=steps,
                noise=x_init,
                step_noise=step_noise,
                prefixes=_row_prefixes(batch, padded),
            )
            action_pred = out["action_pred"][:rows]
            if not np.isfinite(action_pred).all():
                raise NonFiniteActions("the policy produced non-finite actions")
            self._note_batch(batch)
        except Exception as e:  # report to every request of the batch; keep serving
            log.exception("inference failed")
            self._note_batch(batch)
            # Inputs were validated before queuing; an observation error here means the schema changed.
            code = ErrorCode.SCHEMA_MISMATCH if isinstance(e, ObservationError) else ErrorCode.INTERNAL
            for p in batch:
                self.metrics.error(code)
                p.reply(
                    {
                        "type": "infer",
                        "id": p.request.id,
                        "ok": False,
                        "error": {"code": code, "message": str(e)},
                    }
                )
            return
        done = time.perf_counter()
        infer_ms = (done - start) * 1e3
        self.metrics.batch(rows, infer_ms)
        first = policy.config.n_obs_steps - 1
        offset = 0
        for p in batch:
            n_actions = p.request.options.n_action_steps or policy.config.n_action_steps
            chunk = action_pred[offset : offset + p.rows, first : first + n_actions]
            offset += p.rows
            server_ms = (time.perf_counter() - p.received) * 1e3
            queue_ms = (start - p.received) * 1e3
            self.metrics.reply(server_ms, queue_ms)
            p.reply(
                {
                    "type": "infer",
                    "id": p.request.id,
                    "ok": True,
                    "action": chunk if p.batched else chunk[0],
                    "model": self.info.wire(),
                    "timing": {"server_ms": server_ms, "queue_ms": queue_ms, "infer_ms": infer_ms},
                }
            )


class ModelManager:
    """Active / previous / loading models; every transition is atomic under one lock."""

    def __init__(self, batching: BatchingConfig, metrics: Metrics):
        self.batching = batching
        self.metrics = metrics
        self._lock = threading.Lock()
        # Loads run one at a time and a failed one gives its number to the next: versions count the
        # models that were served.
        self._next_version = 1
        self.active: ModelWorker | None = None
        self.previous: ModelWorker | None = None
        self.loading: ModelWorker | None = None
        self.loading_since: float | None = None
        self.last_error: str | None = None
        self._load_done = threading.Condition(self._lock)

    def load(self, path: Path, log_failure: bool = True) -> ModelWorker:
        """Start loading ``path`` in the background; its worker tells the version and, once ``loaded``
        is set, the ``error`` if it failed. Raises RuntimeError if busy."""
        with self._lock:
            if self.loading is not None:
                raise RuntimeError(f"already loading {self.loading.path}")
            worker = ModelWorker(
                path, self._next_version, self.batching, self.metrics, self._ready, self._failed, log_failure
            )
            self.loading, self.loading_since = worker, time.time()
        worker.start()
        return worker

    def wait_for_load(self, timeout: float | None = None) -> bool:
        """Block until no load is in progress; True if it finished in time."""
        with self._lock:
            return self._load_done.wait_for(lambda: self.loading is None, timeout)

    def _ready(self, worker: ModelWorker) -> None:
        with self._lock:
            retired = self.previous
            replaced = self.active
            self.previous, self.active = self.active, worker
            self._next_version = worker.version + 1
            self.loading = self.loading_since = None
            self._load_done.notify_all()
        if retired is not None:
            retired.retire()
        if replaced is not None:  # the first load is not a swap
            self.metrics.swapped()
        log.info("serving %s v%d (%s)", worker.info.name, worker.version, worker.path)

    def _failed(self, worker: ModelWorker, error: Exception) -> None:
        message = load_error_message(worker.path, error)
        with self._lock:
            self.last_error = message
            self.loading = self.loading_since = None
            self._load_done.notify_all()
        self.metrics.load_failed()
        if worker.log_failure:
            log.warning("load failed: %s", message)

    def rollback(self) -> ModelInfo:
        with self._lock:
            if self.previous is None:
                raise RuntimeError("no previous model to roll back to")
            self.active, self.previous = self.previous, self.active
            info = self.active.info
        self.metrics.swapped()
        return info

    def queue_depth(self) -> int:
        return sum(w.depth() for w in (self.active, self.previous) if w is not None)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "active": self.active.info.describe() if self.active else None,
                "previous": self.previous.info.describe() if self.previous else None,
                "loading": (
                    {
                        "path": str(self.loading.path),
                        "version": self.loading.version,
                        "since": self.loading_since,
                    }
                    if self.loading
                    else None
                ),
                "last_error": self.last_error,
            }

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Retire every worker after it has served its queue and wait for them; True if all finished."""
        with self._lock:
            workers = [w for w in (self.active, self.previous, self.loading) if w is not None]
        for w in workers:
            w.retire()
        for w in workers:
            w.join(timeout)
        return not any(w.is_alive() for w in workers)
