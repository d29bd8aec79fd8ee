"""The ``dpmlx serve`` process: ZeroMQ front end, model workers, HTTP control plane, directory watch."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from policy_core.backends import cuda
from policy_core.checkpoint import remove_stale_temp_files
from server.frontend import ZmqFrontend
from server.http_api import create_app
from server.metrics import Metrics
from server.models import SHIPPED_CHECKPOINT, BatchingConfig, ModelManager, ModelWorker, load_error_message

log = logging.getLogger("dpmlx.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    checkpoint: Path | None = None
    zmq: str = "tcp://127.0.0.1:5555"
    http_host: str = "127.0.0.1"
    http_port: int = 8000  # 0: any free port
    watch: Path | None = None
    token: str | None = None
    model_root: Path = field(default_factory=Path.cwd)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_message_bytes: int = 16 * 2**20
    # Low-dimensional observations whose normalized magnitude exceeds this are `invalid_observation`
    # (the fitted range maps to [-1, 1]); 0 turns the check off.
    max_normalized_obs: float = 100.0
    # On SIGINT / SIGTERM: queued requests are served for this long, then answered `shutting_down`. As
    # long as the server used to wait for its workers: 30 DDPM-100 image requests queued on a loaded
    # 2-core box took over 5 s to serve, and a client that queued them expects their answers.
    shutdown_timeout_s: float = 30.0
    watch_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if not is_loopback(self.http_host) and not self.token:
            raise ValueError(
                f"refusing to expose the control plane on {self.http_host} without --token "
                "(mutating endpoints would be open to the network)"
            )


class DirectoryWatch(threading.Thread):
    """Loads each checkpoint that appears (by atomic rename) in a folder.

    Follows ``latest.safetensors`` when the folder has one (the trainer's contract; its top-k copies are
    not loaded again), else the newest ``*.safetensors``. A file is identified by (mtime, name, inode): a
    replacement by rename gives a new inode, so it is picked up; hidden temp files are ignored.
    """

    def __init__(self, folder: Path, manager: ModelManager, interval_s: float, skip_existing: bool):
        super().__init__(name="checkpoint-watch", daemon=True)
        self.folder, self.manager, self.interval_s = folder, manager, interval_s
        self._stop_event = threading.Event()
        # With an explicit --checkpoint, only files newer than what the folder holds now are loaded.
        found = self.newest() if skip_existing else None
        self._seen: tuple | None = found[0] if found else None

    def newest(self) -> tuple[tuple, Path] | None:
        latest = self.folder / "latest.safetensors"
        paths = [latest] if latest.exists() else self.folder.glob("*.safetensors")
        best = None
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (st.st_mtime_ns, path.name, st.st_ino)
            if best is None or key > best[0]:
                best = (key, path)
        return best

    def run(self) -> None:
        remove_stale_temp_files(self.folder)  # left by writers killed mid-save
        while True:
            found = self.newest()
            if found is not None and found[0] != self._seen and self.manager.loading is None:
                try:
                    self.manager.load(found[1])
                    self._seen = found[0]
                except RuntimeError:
                    pass  # a load is running; retry on the next tick
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()


class Server:
    def __init__(self, config: ServeConfig):
        import uvicorn

        self.config = config
        self.metrics = Metrics()
        self.manager = ModelManager(config.batching, self.metrics)
        self.context = zmq.Context()
        self.frontend = ZmqFrontend(
            self.context,
            config.zmq,
            self.manager,
            self.metrics,
            config.max_message_bytes,
            config.max_normalized_obs,
        )
        self._http_socket = socket.create_server(
            (config.http_host, config.http_port),
            family=socket.AF_INET6 if ":" in config.http_host else socket.AF_INET,
        )
        self.http_port = self._http_socket.getsockname()[1]
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                create_app(self.manager, self.metrics, config.token, config.model_root),
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self._http_thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._http_socket]}, name="http", daemon=True
        )
        self.watch = (
            DirectoryWatch(config.watch, self.manager, config.watch_interval_s, config.checkpoint is not None)
            if config.watch
            else None
        )
        self.initial_load: ModelWorker | None = None  # the load of config.checkpoint

    @property
    def zmq_endpoint(self) -> str:
        return self.frontend.endpoint

    @property
    def http_url(self) -> str:
        host = self.config.http_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    def start(self) -> None:
        """Start serving; the configured checkpoint loads in the background (``initial_load``), and a
        failure to load it is the caller's to report (``serve_main`` exits)."""
        self.frontend.start()
        self._http_thread.start()
        if self.config.checkpoint is not None:
            self.initial_load = self.manager.load(self.config.checkpoint, log_failure=False)
        if self.watch is not None:
            self.watch.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, serve what is queued for ``timeout`` seconds (default: the config's), answer the
        rest ``shutting_down``, let batches in flight finish, then close everything. True if every model
        thread ended (else one is stuck in a batch: the process must exit without waiting for it)."""
        self.frontend.stop_accepting()
        if self.watch is not None:
            self.watch.stop()
        workers_done = self.manager.shutdown(self.config.shutdown_timeout_s if timeout is None else timeout)
        self.frontend.stop()
        self._uvicorn.should_exit = True
        self._http_thread.join(timeout=5)
        if workers_done:  # else a worker still holds a socket: leave the context to process exit
            self.context.destroy(linger=0)
        return workers_done


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    host, _, port = args.http.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    # With neither a checkpoint nor a folder to watch, serve the shipped PushT policy.
    checkpoint = (
        args.checkpoint.resolve() if args.checkpoint else (None if args.watch else SHIPPED_CHECKPOINT)
    )
    # HTTP loads may name any checkpoint under the directory the server was started in (the user's runs
    # are there, not beside the shipped policy); --model-root narrows or moves that.
    root = args.model_root or Path.cwd()
    return ServeConfig(
        checkpoint=checkpoint,
        zmq=args.zmq,
        http_host=host,
        http_port=int(port),
        watch=args.watch,
        token=args.token or os.environ.get("DPMLX_TOKEN") or None,
        model_root=Path(root).resolve(),
        batching=BatchingConfig(args.max_batch, args.max_wait_ms, args.max_queue, args.dtype, args.warmup),
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_normalized_obs=args.max_normalized_obs,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose:
        log.setLevel(logging.DEBUG)
    cuda.use_direct_launches()
    server = Server(config_from_args(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("ZeroMQ on %s, control plane on %s", server.zmq_endpoint, server.http_url)
    if server.initial_load is not None:
        log.info("loading %s (--warmup %s)", server.config.checkpoint, server.config.batching.warmup)
    elif server.watch is not None and server.watch.newest() is None:
        log.info(
            "waiting for a checkpoint in %s%s: /readyz answers 503 until one is loaded",
            server.config.watch,
            "" if server.config.watch.is_dir() else " (no such folder yet)",
        )
    log.info("model root for HTTP loads: %s (--model-root)", server.config.model_root)
    if not is_loopback(server.config.http_host):
        log.warning("control plane exposed on %s (token required for mutations)", server.config.http_host)
    zmq_host = server.zmq_endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if server.zmq_endpoint.startswith("tcp://") and not is_loopback(zmq_host):
        log.warning("ZeroMQ bound to %s: any host that reaches it can request actions", server.zmq_endpoint)
    initial = server.initial_load
    while not stop.wait(0.2):
        if initial is not None and initial.loaded.is_set():
            if initial.error is not None:  # the named checkpoint: fail, don't serve nothing forever
                log.error("cannot serve: %s", load_error_message(initial.path, initial.error))
                server.shutdown()
                return 1
            initial = None
    log.info("shutting down: finishing in-flight requests")
    started = time.perf_counter()
    done = server.shutdown()
    log.info("stopped in %.2f s", time.perf_counter() - started)
    if not done:
        # A model thread is stuck in a batch: the interpreter's exit would wait for it, or abort when it
        # next takes the GIL. Everything was answered or refused; leave without it.
        log.warning("a model thread did not finish in time: exiting without it")
        logging.shutdown()
        os._exit(0)
    return 0
