"""Resident models: a worker per loaded model on a thread of its own, and the manager that swaps them.

Every MLX operation of a model (load, warm-up, inference) runs on its worker's thread, since MLX streams
belong to the thread that made them. A new model loads and warms up while the active one keeps serving;
the swap is one reference assignment, so requests already queued at the old model finish there and
nothing is dropped. The previous model stays resident for rollback (Triton's model-control semantics);
the one before it is released.

Only the active and the previous model are resident, and the server's threads are a constant set:
  * A load runs on the thread of the previous model, which it replaces (the first two loads start the
    two threads). MLX gives every thread that runs operations a stream with a scheduler thread of its
    own that never exits: a thread per model grew the server by an OS thread and a malloc arena per swap.
  * A checkpoint of the architecture the previous model has (the usual hot load: a trainer's next
    checkpoint) takes over that model's policy object: new weights and normalizer, the same compiled
    functions, which take both as inputs. Nothing is traced again, so the active model does not stall:
    MLX holds the GIL through a trace's ~0.25 s of graph compilation, stopping every Python thread.
    Another architecture is built anew; its warm-up compiles one bucket at a time, each only while the
    active model has nothing to do, and the old policy is dropped (its compiled functions with it).
  * A thread that ends releases its MLX state while it can still take the GIL (policy_core/threads.py).

Warm-up (``--warmup``): ``full`` compiles the default sampler for every batch bucket before a model takes
traffic. ``lazy`` (a load with no model serving: the start) checks the model on one uncompiled batch and
serves at once. Either way, a request whose compiled path (``server.kernel_cache.CompileKey``: with
``lazy`` any, with ``full`` another sampler, step count or real-time chunking method) is not traced yet
runs MLX's operations uncompiled (the same results, slower), while a process of its own runs the paths
met, filling MLX's kernel cache on disk with the compiler's work; then the worker traces each path
against that cache, one at a time while it has nothing to do. No request waits for a compiler.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from policy_core.policy import ObservationError
from policy_core.rtc import ActionPrefix
from proto.messages import ErrorCode, InferOptions, ProtocolError, Request, error_reply
from server.kernel_cache import CompileKey, key_text, run_path
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
    # where some of those asked with other options). A lone robot never waits (2 ms is a large part of a
    # GPU request); synchronised robots are gathered into one batch, which shortened their round trips
    # (benchmarks/NOTES.md).
    max_wait_ms: float = 2.0
    max_queue: int = 64  # queued requests per model before `overloaded`
    dtype: str | None = None  # weight dtype override for loaded checkpoints
    warmup: str = "lazy"  # "full": compile every bucket before serving; "lazy": see the module's docstring

    def buckets(self, exact: Iterable[int] = ()) -> list[int]:
        """The sizes a batch is padded up to, so that only these few are compiled: powers of two, the
        largest ``max_batch``, and the sizes in ``exact`` (those a model runs as one CUDA kernel, whose
        time grows with every padded row: ``DiffusionPolicy.unpadded_batch_sizes``)."""
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
    # The samplers the model offers, each with its most steps (``PolicyConfig.samplers``), and its default.
    samplers: dict[str, int]
    default_sampler: tuple[str, int]
    # (scale, offset) of each low-dimensional key's normalizer, float64: the front end refuses values far
    # outside the range the model was trained on before they join a batch.
    obs_affine: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def describe(self) -> dict[str, Any]:
        return {**self.wire(), "path": self.path, "training_step": self.metadata.get("training_step")}

    @property
    def obs_schema(self) -> dict[str, dict[str, Any]]:
        return self.metadata["obs_schema"]


# glibc's malloc_trim (None elsewhere: macOS, musl).
_malloc_trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)

# How long one warm-up step waits for the serving model to be idle before it runs anyway (a model that is
# never idle must still be replaceable).
WARMUP_YIELD_S = 2.0


@contextmanager
def _uncompiled(on: bool) -> Iterator[None]:
    """With ``on``, MLX's compiled functions run as plain operations: nothing is traced or compiled.
    ``mx.disable_compile`` is process-wide: a model on another thread (a hot load's warm-up) that calls
    a compiled function meanwhile runs it uncompiled too, with the same results."""
    import mlx.core as mx

    if not on:
        yield
        return
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()


def _breakdown(startup: dict[str, Any]) -> str:
    """A load's ``startup`` for the log: ``read 0.04 s, verify 0.06 s, ..., warm-up 1:ddim:10 0.30 s``."""
    parts = []
    for name, value in startup.items():
        label = name.removesuffix("_s").replace("_", " ")
        if isinstance(value, dict):
            parts += [f"{label} {key} {seconds:.2f} s" for key, seconds in value.items()]
        elif isinstance(value, float):
            parts.append(f"{label} {value:.2f} s")
        else:
            parts.append(f"{label} {value}")
    return ", ".join(parts)


def _cache_filler_command(path: Path, keys: list[CompileKey], dtype: str | None) -> list[str]:
    """The process that runs ``keys``' paths of the checkpoint ``path`` once (``server.kernel_cache``)."""
    command = [sys.executable, "-m", "server.kernel_cache", str(path), *map(key_text, keys)]
    return command + (["--dtype", dtype] if dtype else [])


# MLX's compile cache sits behind one lock, and dropping its entries takes the GIL: a model thread
# clearing its streams (holding that lock, waiting for the GIL) and another collecting a policy's compiled
# functions (holding the GIL, waiting for the lock) deadlocked at shutdown. Model threads release in turn.
_MLX_RELEASE_LOCK = threading.Lock()


def _thread_main(worker: ModelWorker | None) -> None:
    """A model thread: each worker serves until it retires, then its successor continues here."""
    from policy_core.threads import release_mlx_thread_state

    try:
        while worker is not None:
            worker = worker.run()
    finally:
        with _MLX_RELEASE_LOCK:
            release_mlx_thread_state()


class NonFiniteActions(RuntimeError):
    """The policy's actions for zero observations are NaN or Inf (e.g. NaN weights): the checkpoint is
    refused at load. A request's non-finite actions are never sent either: that request alone is answered
    ``invalid_observation`` (``ModelWorker._execute``)."""


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


class LoadAborted(RuntimeError):
    """The server is shutting down: a load in progress stops between warm-up steps."""


class ModelWorker:
    """Loads one checkpoint, warms it up, then serves batches from its queue until retired.

    It runs on a thread of its own (``start``) or, loaded by ``host_load``, on the thread of the worker it
    replaces, which it continues once that one has retired.
    """

    def __init__(
        self,
        path: Path,
        version: int,
        batching: BatchingConfig,
        metrics: Metrics,
        on_ready: Callable[[ModelWorker], None],
        on_failed: Callable[[ModelWorker, Exception], None],
        active: Callable[[], ModelWorker | None] = lambda: None,
        log_failure: bool = True,
    ):
        self.name = f"model-worker-v{version}"
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
        self._active = active  # the model serving while this one loads: its warm-up yields to it
        self._retired = threading.Event()
        self._abort = threading.Event()  # stop a load in progress (shutdown)
        self.drain_deadline = float("inf")  # time.monotonic() after which queued requests are refused
        # Guards the decision to exit against a concurrent submit, so no accepted request is orphaned.
        self._submit_lock = threading.Lock()
        self._closed = False
        self._executing = False
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run between batches
        self.successor: ModelWorker | None = None  # continues on this thread once this one retires
        self.thread: threading.Thread | None = None
        # (batch key, requests) the last batch saw: see BatchingConfig.max_wait_ms.
        self._company: tuple[tuple, int] = ((), 1)
        self.buckets = batching.buckets()  # with the model's own sizes once it is loaded
        self.policy = None
        # Where the load's time went, in seconds (replaced, never changed in place: /v1/stats reads it).
        self.startup: dict[str, Any] = {}
        # The paths traced so far and those met but not yet traced, in order (a request of one runs
        # uncompiled); the process filling the kernel cache for some of them.
        self.compiled: set[CompileKey] = set()
        self.to_compile: dict[CompileKey, None] = {}
        self._compiling = True  # whether paths met are compiled in the background (until that fails)
        # (process, its paths, when it started: None once its end is noted)
        self._cache_filler: tuple[subprocess.Popen, list[CompileKey], float | None] | None = None

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

    def start(self) -> None:
        """Load and serve on a new thread."""
        self.thread = threading.Thread(target=_thread_main, args=(self,), name=self.name, daemon=True)
        self.thread.start()

    def host_load(self, worker: ModelWorker) -> None:
        """Load ``worker`` on this worker's thread, between its batches; if it loads, it replaces this one
        there (and may take over its policy object)."""
        self._tasks.put(lambda: worker._load_hosted(self))

    def retire(self) -> None:
        """Stop after serving what is already queued (until ``drain_deadline``)."""
        self._retired.set()

    def abort_load(self) -> None:
        self._abort.set()

    def depth(self) -> int:
        return self.queue.qsize() + len(self._deferred)

    def idle(self) -> bool:
        return not self._executing and self.depth() == 0

    # ---- worker thread ----

    def run(self) -> ModelWorker | None:
        """Load (unless loaded on a host's thread), serve until retired, release; return the worker that
        continues on this thread."""
        threading.current_thread().name = self.name
        try:
            if self.policy is None:
                try:
                    self._load()
                except Exception as e:  # a failed load must never take the server down
                    self._fail(e)
                    return None
                self._ready()
            self._serve()
            successor, self.successor = self.successor, None  # no chain of every model this thread ran
            return successor
        finally:
            self._release()

    def _serve(self) -> None:
        while True:
            if self._retired.is_set():
                if time.monotonic() > self.drain_deadline:
                    self._refuse_queued()
                with self._submit_lock:
                    if self.depth() == 0:
                        self._closed = True
                        return
            batch = self._next_batch()
            if batch:
                self._executing = True
                try:
                    self._execute(batch)
                except Exception:  # e.g. a reply that cannot be sent: keep serving the queue
                    log.exception("failed to answer a batch")
                finally:
                    self._executing = False
            elif not self._tasks.empty() and not self._retired.is_set():
                self._tasks.get()()  # a hosted load: only while nothing is queued here
            elif self._background_work():
                try:
                    self._compile_next()
                except Exception:  # background work never stops the serving: paths stay uncompiled
                    log.exception("v%d: compiling in the background failed; it stops", self.version)
                    self._compiling = False

    def _background_work(self) -> bool:
        """Whether to take a step of the background compilation now: a trace holds the GIL, so not while
        another model serves."""
        return (
            self._compiling
            and bool(self.to_compile)
            and not self._retired.is_set()
            and self._active() in (None, self)
        )

    def _refuse_queued(self) -> None:
        """Past the shutdown deadline: what is still queued is answered ``shutting_down``."""
        with self._submit_lock:
            self._closed = True
        while (pending := self._take(timeout=0)) is not None:
            self.metrics.error(ErrorCode.SHUTTING_DOWN)
            pending.reply(
                error_reply("infer", pending.request.id, ErrorCode.SHUTTING_DOWN, "server is shutting down")
            )

    def _release(self) -> None:
        """Drop this model's policy unless the successor took it over, with everything it holds (compiled
        functions and their traces, caches), and return MLX's freed buffers to the system."""
        import mlx.core as mx

        if self._cache_filler is not None:
            process = self._cache_filler[0]
            process.kill()
            process.wait()
            process.stderr.close()
            self._cache_filler = None
        self.policy = None
        with _MLX_RELEASE_LOCK:
            gc.collect()  # the policy and its compiled functions reference each other
            mx.clear_cache()
        if _malloc_trim is not None:
            # glibc keeps freed pages in the arena of the thread that freed them: each model thread kept
            # the high-water mark of a swap (the old and the new weights), +30 MB over the first swaps.
            _malloc_trim(0)

    def _ready(self) -> None:
        self._on_ready(self)
        self.loaded.set()

    def _fail(self, error: Exception) -> None:
        self.error = error
        self._on_failed(self, error)
        self.loaded.set()

    def _load_hosted(self, host: ModelWorker) -> None:
        """On ``host``'s thread: load, then take its place there (it retires when this one is ready)."""
        try:
            self._load(donor=host)
        except Exception as e:
            self._fail(e)
        else:
            self.thread = host.thread
            host.successor = self
            self._ready()
            return
        self._release()  # what the failed load built (out of the exception's frames by now)

    def _load(self, donor: ModelWorker | None = None) -> None:
        from policy_core.checkpoint import load_into, policy_from_checkpoint, read_checkpoint

        began = time.perf_counter()
        timings: dict[str, float] = {}
        ckpt = read_checkpoint(self.path, timings)
        read = time.perf_counter()
        self.startup = {"read_s": read - began - timings["verify_s"], "verify_s": timings["verify_s"]}
        schema = ckpt.metadata["obs_schema"]
        name = ckpt.metadata["provenance"].get("name") or self.path.stem
        dtype = self.batching.dtype
        adopted = False
        if donor is not None and donor.policy is not None:
            with donor._submit_lock:  # the donor is the previous model: nothing queued, nothing accepted
                donor._closed = donor.depth() == 0
            if donor._closed:
                policy = donor.policy
                saved = (tree_flatten(policy.parameters()), policy.normalizer)
                try:
                    adopted = load_into(policy, ckpt, dtype=dtype)
                    if adopted:
                        self._note(weights_s=time.perf_counter() - read, graphs="reused")
                        # The donor's traces are this policy's: so are its paths still to trace.
                        self.buckets, self.compiled = donor.buckets, donor.compiled
                        self.to_compile = donor.to_compile
                        self._check_finite(policy, schema, self.buckets[:1])
                except Exception:
                    if adopted:  # give the donor back its own weights: it stays the rollback model
                        policy.update(tree_unflatten(saved[0]))
                        policy.normalizer = saved[1]
                        adopted = False
                    raise
                finally:
                    if not adopted:
                        with donor._submit_lock:
                            donor._closed = False
        if not adopted:
            policy = policy_from_checkpoint(ckpt, dtype=dtype)
            self._note(weights_s=time.perf_counter() - read, graphs="built")
            self.buckets = self.batching.buckets(policy.unpadded_batch_sizes(self.batching.max_batch))
            cfg = policy.config
            # Lazy only where no model answers meanwhile (the start); a hot load of another architecture
            # warms up fully while the active model serves.
            lazy = self.batching.warmup == "lazy" and self._active() is None
            self._note(warmup_mode="lazy" if lazy else "full")
            keys = [(rows, cfg.sampler, cfg.default_inference_steps, None) for rows in self.buckets]
            if lazy:
                self.compiled, self.to_compile = set(), dict.fromkeys(keys)
                self._check_finite(policy, schema, self.buckets[:1])  # uncompiled: nothing is traced yet
            else:
                # Compile the default sampler for every batch bucket, so the first request is fast.
                self.compiled, self.to_compile = set(keys), {}
                self._check_finite(policy, schema, self.buckets, yield_to=self._active())
        affine = {
            key: (
                policy.normalizer[key].scale.astype(np.float64),
                policy.normalizer[key].offset.astype(np.float64),
            )
            for key, feat in policy.config.obs.items()
            if not feat.is_image
        }
        cfg = policy.config
        self.info = ModelInfo(
            name, self.version, ckpt.sha256, str(self.path), ckpt.metadata,
            cfg.samplers, (cfg.sampler, cfg.default_inference_steps), affine,
        )  # fmt: skip
        self.policy = policy
        self._note(ready_s=time.perf_counter() - began)
        log.info(
            "loaded %s (%s) in %.2f s",
            self.path,
            "weights swapped into the previous model's graphs" if adopted else "built",
            self.startup["ready_s"],
        )
        log.debug("load of v%d: %s", self.version, _breakdown(self.startup))

    def _note(self, **entries: Any) -> None:
        """Add to the load's breakdown (a new dict: /v1/stats may be reading the old one)."""
        self.startup = {**self.startup, **entries}

    def _untraced(self, key: CompileKey) -> bool:
        """Whether ``key``'s path must run uncompiled: it has not been traced yet."""
        return key not in self.compiled

    def _check_finite(
        self, policy: Any, schema: dict[str, Any], buckets: list[int], yield_to: ModelWorker | None = None
    ) -> None:
        """Run the default sampler on zero observations of each bucket size (compiled where its path is in
        ``compiled``, else uncompiled), refusing a policy whose actions are not finite. Each step waits
        until ``yield_to`` (the model serving now) has nothing to do: a trace holds the GIL, so it would
        stall every request in flight."""
        cfg = policy.config
        times = dict(self.startup.get("warmup_s", {}))
        for rows in buckets:
            deadline = time.monotonic() + WARMUP_YIELD_S
            while yield_to is not None and not yield_to.idle() and time.monotonic() < deadline:
                if self._abort.wait(0.002):
                    break
            if self._abort.is_set():
                raise LoadAborted("the server is shutting down")
            key = (rows, cfg.sampler, cfg.default_inference_steps, None)
            started = time.perf_counter()
            with _uncompiled(self._untraced(key)):
                actions = run_path(policy, schema, key)
            times[key_text(key)] = time.perf_counter() - started
            self._note(warmup_s=times)
            if not np.isfinite(actions).all():
                raise NonFiniteActions("the policy's actions for zero observations are not finite")

    def _compile_next(self) -> None:
        """One step of the background compilation, between batches: start a process that runs the paths met
        so far (the compiler's seconds pass there, filling MLX's kernel cache), and once it has ended trace
        one of those paths here, against the filled cache."""
        if self._cache_filler is None:
            keys = list(self.to_compile)
            process = subprocess.Popen(
                _cache_filler_command(self.path, keys, self.batching.dtype),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self._cache_filler = (process, keys, time.perf_counter())
            return
        process, keys, started = self._cache_filler
        if process.poll() is None:
            return
        if started is not None:  # it has just ended
            self._note(cache_fill_s=self.startup.get("cache_fill_s", 0.0) + time.perf_counter() - started)
            log.debug("v%d: kernel cache filled for %s", self.version, ", ".join(map(key_text, keys)))
            if process.returncode != 0:  # the paths still run; the traces below compile what is missing
                error = process.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                log.warning("filling the kernel cache failed (exit %s): %s", process.returncode, error)
            process.stderr.close()
            self._cache_filler = (process, keys, None)
        key = next((k for k in keys if k in self.to_compile), None)
        if key is None:  # all traced; paths met since then get a process of their own
            self._cache_filler = None
            return
        started = time.perf_counter()
        run_path(self.policy, self.info.obs_schema, key)
        self.compiled.add(key)
        del self.to_compile[key]
        traced = {**self.startup.get("compile_s", {}), key_text(key): time.perf_counter() - started}
        self._note(compile_s=traced)
        log.debug("v%d traced %s in %.2f s", self.version, key_text(key), traced[key_text(key)])

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
            methods = {p.request.options.rtc["method"] for p in batch if p.request.options.prefix is not None}
            key = (padded, kind, steps, ("guided" if "guided" in methods else "replace") if methods else None)
            uncompiled = self._untraced(key)
            if uncompiled:
                self.to_compile.setdefault(key)
            with _uncompiled(uncompiled):
                obs = {k: np.concatenate([p.obs[k] for p in batch]) for k in batch[0].obs}
                # Each request's noise comes from its own seed, so results do not depend on batching.
                noises = [policy.sample_noise(p.rows, steps, p.request.options.seed) for p in batch]
                x_init, step_noise = noises[0]  # a lone request's as drawn: no copies
                if len(noises) > 1:
                    x_init = mx.concatenate([n[0] for n in noises])
                    step_noise = mx.concatenate([n[1] for n in noises], axis=1)
                if padded > rows:
                    obs = {
                        k: np.concatenate([v, np.repeat(v[-1:], padded - rows, axis=0)])
                        for k, v in obs.items()
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
            finite = np.isfinite(action_pred).all(axis=(1, 2))  # rows are independent: judged one by one
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
        if uncompiled:
            self._note(uncompiled_batches=self.startup.get("uncompiled_batches", 0) + 1)
        self.metrics.batch(rows, infer_ms)
        first = policy.config.n_obs_steps - 1
        offset = 0
        for p in batch:
            n_actions = p.request.options.n_action_steps or policy.config.n_action_steps
            chunk = action_pred[offset : offset + p.rows, first : first + n_actions]
            bad = np.flatnonzero(~finite[offset : offset + p.rows])
            offset += p.rows
            if bad.size:  # never sent to a robot; the rest of the batch is answered as usual
                where = f" (rows {bad.tolist()})" if p.batched else ""
                self.metrics.error(ErrorCode.INVALID_OBSERVATION)
                p.reply(
                    error_reply(
                        "infer",
                        p.request.id,
                        ErrorCode.INVALID_OBSERVATION,
                        f"the policy produced non-finite actions for this observation{where}",
                    )
                )
                continue
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
        self._stopping = False
        self._load_done = threading.Condition(self._lock)

    def load(self, path: Path, log_failure: bool = True) -> ModelWorker:
        """Start loading ``path`` in the background; its worker tells the version and, once ``loaded``
        is set, the ``error`` if it failed. Raises RuntimeError if busy."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self.loading is not None:
                raise RuntimeError(f"already loading {self.loading.path}")
            worker = ModelWorker(
                path, self._next_version, self.batching, self.metrics, self._ready, self._failed,
                active=lambda: self.active, log_failure=log_failure,
            )  # fmt: skip
            self.loading, self.loading_since = worker, time.time()
            host = self.previous  # the model the new one replaces: its thread (and maybe graphs) serve on
        if host is not None:
            host.host_load(worker)
        else:
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
            if self.loading is not None:  # the load runs on the previous model's thread, may take it over
                raise RuntimeError(f"loading {self.loading.path}: roll back once the load is done")
            self.active, self.previous = self.previous, self.active
            info = self.active.info
        self.metrics.swapped()
        return info

    def queue_depth(self) -> int:
        return sum(w.depth() for w in (self.active, self.previous) if w is not None)

    def startup(self) -> dict[str, Any]:
        """Where the active and the previous model's loads spent their time (``ModelWorker.startup``),
        and the compiled paths each has still to trace."""
        with self._lock:
            workers = {"active": self.active, "previous": self.previous}
        return {
            role: {
                "version": w.version,
                **w.startup,
                "to_compile": [key_text(k) for k in w.to_compile.copy()],  # copy(): atomic under the GIL
            }
            for role, w in workers.items()
            if w is not None
        }

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

    def shutdown(self, timeout: float = 30.0, grace: float = 5.0) -> bool:
        """Stop a load in progress and retire every model: queued requests are served until ``timeout``
        seconds from now, then answered ``shutting_down``; batches in flight finish. Waits up to
        ``grace`` more seconds for them; True if every model thread ended."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            workers = [w for w in (self.active, self.previous, self.loading) if w is not None]
        for w in workers:
            w.drain_deadline = deadline
            w.abort_load()
            w.retire()
        threads = {w.thread for w in workers if w.thread is not None}
        for thread in threads:
            thread.join(max(0.0, deadline + grace - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)
