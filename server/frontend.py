"""ZeroMQ front end: one I/O thread owns the ROUTER socket.

It decodes and validates every message and answers ping / hello / reset and every error itself, so a
slow inference never delays them. Valid infer requests go to the active model's worker queue; workers
send their encoded replies back through an inproc PUSH/PULL pair that this thread forwards to ROUTER.
REQ clients (an empty delimiter frame) and DEALER clients (with or without one) are both served: the
reply reuses the request's envelope.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import zmq

from proto.codec import DecodeError, pack, unpack
from proto.messages import (
    PROTOCOL_VERSION,
    RTC_DEFAULTS,
    RTC_METHODS,
    RTC_SCHEDULES,
    ErrorCode,
    ProtocolError,
    Request,
    error_reply,
    parse_request,
    validate_obs,
)
from server.metrics import Metrics
from server.models import ModelManager, ModelWorker, PendingInfer

log = logging.getLogger("dpmlx.server")


class ZmqFrontend(threading.Thread):
    def __init__(
        self,
        context: zmq.Context,
        address: str,
        manager: ModelManager,
        metrics: Metrics,
        max_message_bytes: int,
        max_normalized_obs: float = 100.0,
    ):
        super().__init__(name="zmq-frontend", daemon=True)
        self.manager = manager
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_normalized_obs = max_normalized_obs  # 0: no range check
        self.context = context
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # Hard cap far above the reply-able limit: libzmq drops such peers before buffering the payload.
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * max_message_bytes + 65536)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped silently
        self.router.bind(address)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._replies_address = f"inproc://dpmlx-replies-{id(self)}"
        self.replies = context.socket(zmq.PULL)
        self.replies.bind(self._replies_address)
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []  # one per worker thread; closed when the front end stops
        self._push_lock = threading.Lock()
        self._accepting = True
        self._stop_event = threading.Event()

    # ---- worker side ----

    def _reply_from_worker(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        """Called on a worker thread: encode there, hand the frames to the I/O thread."""
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(self._replies_address)
            with self._push_lock:
                self._push_sockets.append(push)
        push.send_multipart([*envelope, pack(message)])

    # ---- control ----

    def stop_accepting(self) -> None:
        self._accepting = False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)

    # ---- I/O thread ----

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(50))
                if self.replies in events:
                    self._forward_replies()
                if self.router in events:
                    self._drain_requests()
                if self._stop_event.is_set():
                    self._forward_replies()
                    break
        finally:
            self.router.close(linger=500)
            self.replies.close(linger=0)
            with self._push_lock:  # their worker threads have finished (the server stops them first)
                for push in self._push_sockets:
                    push.close(linger=0)

    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self.replies.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.router.send_multipart(frames)

    def _drain_requests(self) -> None:
        for _ in range(256):  # bounded, so replies are forwarded between bursts
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(frames, time.perf_counter())

    def _send(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        self.router.send_multipart([*envelope, pack(message)])

    def _handle(self, frames: list[bytes], received: float) -> None:
        # [identity, payload] from DEALER, [identity, b"", payload] from REQ; anything else is noise.
        if len(frames) < 2 or len(frames) > 3 or (len(frames) == 3 and frames[1]):
            if len(frames) >= 2:
                self.metrics.error(ErrorCode.BAD_REQUEST)
                # Keep a REQ client's empty delimiter: a REQ socket drops a reply without one and then
                # waits forever.
                envelope = frames[:2] if len(frames) >= 3 and not frames[1] else frames[:1]
                self._send(
                    envelope, error_reply(None, None, ErrorCode.BAD_REQUEST, "expected one payload frame")
                )
            return
        envelope, payload = frames[:-1], frames[-1]
        rtype = rid = None
        try:
            if len(payload) > self.max_message_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"message of {len(payload)} bytes exceeds {self.max_message_bytes}"
                )
            try:
                msg = unpack(payload)
            except DecodeError as e:
                raise ProtocolError(ErrorCode.BAD_REQUEST, str(e)) from None
            if isinstance(msg, dict):
                rtype = msg.get("type") if isinstance(msg.get("type"), str) else None
                rid = msg.get("id") if isinstance(msg.get("id"), (int, str)) else None
            request = parse_request(msg)
            self.metrics.request(request.type)
            if request.type == "ping":
                self._send(envelope, {"type": "ping", "id": rid, "ok": True, "protocol": PROTOCOL_VERSION})
            elif request.type == "reset":
                # The server keeps no per-client state: real-time chunking's prefix comes with each request.
                self._send(envelope, {"type": "reset", "id": rid, "ok": True})
            elif request.type == "hello":
                self._send(envelope, self._hello(rid))
            else:
                self._submit(request, envelope, received)
        except ProtocolError as e:
            self.metrics.error(e.code)
            self._send(envelope, error_reply(rtype, rid, e.code, e.message))
        except Exception as e:  # the server never dies from a client's input
            log.exception("unexpected error handling a request")
            self.metrics.error(ErrorCode.INTERNAL)
            self._send(envelope, error_reply(rtype, rid, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def _active(self) -> ModelWorker:
        worker = self.manager.active
        if worker is None:
            raise ProtocolError(ErrorCode.NOT_READY, "no model loaded yet")
        return worker

    def _hello(self, rid: Any) -> dict[str, Any]:
        info = self._active().info
        meta = info.metadata
        return {
            "type": "hello",
            "id": rid,
            "ok": True,
            "protocol": PROTOCOL_VERSION,
            "model": info.wire(),
            "obs_schema": meta["obs_schema"],
            "action": meta["action"],
            "n_obs_steps": meta["n_obs_steps"],
            "control_hz": meta["control_hz"],
            "max_message_bytes": self.max_message_bytes,
            "max_batch": self._active().batching.max_batch,
            "samplers": {name: {"max_steps": steps} for name, steps in info.samplers.items()},
            "default": {"scheduler": info.default_sampler[0], "num_inference_steps": info.default_sampler[1]},
            "capabilities": {
                "rtc": {
                    "schedules": list(RTC_SCHEDULES),
                    "methods": list(RTC_METHODS),
                    "defaults": RTC_DEFAULTS,
                    "max_prefix": meta["action"]["horizon"] - meta["n_obs_steps"] + 1,
                }
            },
        }

    def _check_range(
        self, obs: dict[str, np.ndarray], affine: dict[str, tuple[np.ndarray, np.ndarray]], batched: bool
    ) -> None:
        """Refuse low-dimensional values whose normalized magnitude exceeds ``max_normalized_obs``: the
        fitted range maps to [-1, 1], so these are far outside anything the model was trained on (a
        keypoint of 1e30 made non-finite actions). Checked before queuing, so the request never joins a
        batch; ``ModelWorker._execute`` still judges every row's actions on their own."""
        limit = self.max_normalized_obs
        if not limit:
            return
        for key, (scale, offset) in affine.items():
            normalized = np.abs(obs[key] * scale + offset)  # float64: no overflow
            if (normalized > limit).any():
                worst = np.unravel_index(int(np.argmax(normalized)), normalized.shape)
                where = f"obs[{key!r}]" + (f" row {worst[0]}" if batched else "") + f" dimension {worst[-1]}"
                raise ProtocolError(
                    ErrorCode.INVALID_OBSERVATION,
                    f"{where} = {float(obs[key][worst]):.6g} is outside the range the model was trained on "
                    f"(normalized magnitude {normalized[worst]:.3g} > {limit:g})",
                )

    def _submit(self, request: Request, envelope: list[bytes], received: float) -> None:
        if not self._accepting:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        worker = self._active()
        obs, batched = validate_obs(request.obs, worker.info.obs_schema)
        self._check_range(obs, worker.info.obs_affine, batched)
        rows = next(iter(obs.values())).shape[0]
        if rows > worker.batching.max_batch:
            # Bounds memory and the set of compiled graphs a client can cause.
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{rows} rows exceed max_batch {worker.batching.max_batch}"
            )
        options = request.options
        info = worker.info
        if options.scheduler is not None and options.scheduler not in info.samplers:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_SAMPLER,
                f"the model samples with {sorted(info.samplers)} (hello), not {options.scheduler!r}",
            )
        # Spell out the model's defaults so equivalent requests share batches.
        default_kind, default_steps = info.default_sampler
        options.scheduler = options.scheduler or default_kind
        max_steps = info.samplers[options.scheduler]
        if options.num_inference_steps is not None and options.num_inference_steps > max_steps:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"num_inference_steps of {options.scheduler} must be <= {max_steps}"
            )
        options.num_inference_steps = options.num_inference_steps or min(default_steps, max_steps)
        meta = info.metadata
        max_actions = meta["action"]["horizon"] - meta["n_obs_steps"] + 1
        n_actions = request.options.n_action_steps
        if n_actions is not None and n_actions > max_actions:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"n_action_steps must be <= {max_actions} (horizon - n_obs_steps + 1)"
            )
        prefix = options.prefix
        if prefix is not None:
            # [k, dim] for one robot, [B, k, dim] for a batch; k at most the actions a chunk holds.
            expected = "[B, k, action_dim]" if batched else "[k, action_dim]"
            if prefix.ndim != (3 if batched else 2) or (batched and prefix.shape[0] != rows):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"options.prefix has shape {list(prefix.shape)}, expected {expected}",
                )
            k, dim = prefix.shape[-2:]
            if dim != meta["action"]["dim"] or k > max_actions:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"options.prefix has shape {list(prefix.shape)}: action_dim must be "
                    f"{meta['action']['dim']} and k <= {max_actions} (horizon - n_obs_steps + 1)",
                )
        worker.submit(
            PendingInfer(
                request,
                obs,
                batched,
                received,
                reply=lambda message: self._reply_from_worker(envelope, message),
            )
        )
