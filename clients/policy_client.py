"""Robot-side client of ``dpmlx serve``: numpy, pyzmq and msgpack only.

A DEALER socket with request ids, so a lost reply costs one timed-out call, never a wedged socket (the
failure mode of REQ). After a timeout the socket is rebuilt and the next call says ``hello`` again, so
a restarted server (perhaps with another model) is picked up without manual action.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from proto.codec import DecodeError, pack, unpack
from proto.messages import PROTOCOL_VERSION


class ClientError(Exception):
    """Base class of the client's errors."""


class RequestTimeout(ClientError):
    """No reply within the timeout; the socket has been reset and the next call works."""


class ProtocolMismatch(ClientError):
    """The server speaks another protocol version."""


class SchemaMismatch(ClientError):
    """The observation does not match the server model's schema (or the schema the caller expects)."""


class ServerError(ClientError):
    """The server answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class InferResult:
    actions: np.ndarray  # (n_action_steps, action_dim) float32
    model: dict[str, Any]  # {name, version, sha256} of the model that computed it
    server_timing: dict[str, float]  # {server_ms, queue_ms, infer_ms}
    round_trip_ms: float


class ObservationHistory:
    """The last n_obs_steps observations of an episode; at the start the first one is repeated."""

    def __init__(self, n_obs_steps: int):
        self.steps: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)

    def reset(self) -> None:
        self.steps.clear()

    def append(self, obs: dict[str, Any]) -> None:
        step = {k: np.array(v, copy=True) for k, v in obs.items()}  # environments may reuse their buffers
        if not self.steps:
            self.steps.extend([step] * self.steps.maxlen)  # pad as upstream: repeat the first observation
        else:
            self.steps.append(step)

    def stacked(self) -> dict[str, np.ndarray]:
        if not self.steps:
            raise ClientError("no observation yet: call observe() first")
        return {k: np.stack([s[k] for s in self.steps]) for k in self.steps[0]}


class PolicyClient:
    """Talk to one server. ``observe`` one observation per control step; ``infer`` sends the history.

    Not meant to be shared between threads beyond that split: ``observe`` may run on the control thread
    while ``infer`` runs on a background thread (``ActionChunkRunner`` does exactly that).
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        timeout_s: float = 5.0,
        expected_schema: dict[str, dict[str, Any]] | None = None,
        context: zmq.Context | None = None,
        connect_timeout_s: float | None = None,
    ):
        """``connect_timeout_s``: how long the first ``hello`` may take (default ``timeout_s``), so that
        a missing server is reported quickly while requests keep the longer timeout."""
        self.address = address
        self.timeout_s = timeout_s
        self.expected_schema = expected_schema
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._call_lock = threading.Lock()
        self._history_lock = threading.Lock()
        self.server_info: dict[str, Any] | None = None
        self.history: ObservationHistory | None = None
        self.hello(connect_timeout_s)

    # ---- transport ----

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 50)  # find a restarted server quickly
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: no stale sends
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def _reset_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self.server_info = None  # say hello again: the server may have changed

    def close(self) -> None:
        with self._call_lock:
            self._reset_socket()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, message: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and wait for the reply with the same id; stale replies are discarded."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        rid = next(self._ids)
        message = {**message, "id": rid, "protocol": PROTOCOL_VERSION}
        sock = self._connect()
        try:
            # With IMMEDIATE, sending waits for a connection: part of the same deadline.
            if not sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
                raise RequestTimeout(f"no connection to {self.address} within {timeout_s:.2f} s")
            sock.send(pack(message), zmq.NOBLOCK)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    raise RequestTimeout(f"no reply from {self.address} within {timeout_s:.2f} s")
                reply = unpack(sock.recv_multipart()[-1])
                if isinstance(reply, dict) and reply.get("id") == rid:
                    return reply
        except (RequestTimeout, DecodeError):
            self._reset_socket()  # a fresh socket and a fresh hello: nothing stale is read later
            raise

    @staticmethod
    def _check(reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code = error.get("code", "unknown")
            if code == "unsupported_protocol":
                raise ProtocolMismatch(error.get("message", ""))
            if code == "schema_mismatch":
                raise SchemaMismatch(error.get("message", ""))
            raise ServerError(code, error.get("message", ""))
        return reply

    # ---- protocol ----

    def hello(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Handshake: check protocol and schema; (re)size the observation history."""
        with self._call_lock:
            return self._hello(timeout_s)

    def _hello(self, timeout_s: float | None = None) -> dict[str, Any]:
        info = self._check(self._call({"type": "hello"}, timeout_s))
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"server speaks protocol {info.get('protocol')}, client {PROTOCOL_VERSION}"
            )
        if self.expected_schema is not None and info["obs_schema"] != self.expected_schema:
            raise SchemaMismatch(
                f"server expects {info['obs_schema']}, this client sends {self.expected_schema}"
            )
        with self._history_lock:
            if self.history is None or self.history.steps.maxlen != info["n_obs_steps"]:
                self.history = ObservationHistory(info["n_obs_steps"])
        self.server_info = info
        return info

    def ping(self, timeout_s: float | None = None) -> float:
        """Round trip in ms."""
        start = time.perf_counter()
        with self._call_lock:
            self._check(self._call({"type": "ping"}, timeout_s))
        return (time.perf_counter() - start) * 1e3

    def reset(self) -> None:
        """Start a new episode: forget the observation history."""
        with self._history_lock:
            if self.history is not None:
                self.history.reset()
        with self._call_lock:
            self._check(self._call({"type": "reset"}))

    def observe(self, obs: dict[str, Any]) -> None:
        """Add one control step's observation (no time axis); a mismatch is refused before it is kept."""
        info = self.server_info  # read once: a background call may reset it concurrently
        if info is not None:
            self._validate(info["obs_schema"], {k: np.asarray(v)[None] for k, v in obs.items()}, steps=1)
        with self._history_lock:
            self.history.append(obs)

    def stacked_history(self) -> dict[str, np.ndarray]:
        """The observation history as the server wants it: {key: (n_obs_steps, ...)}."""
        with self._history_lock:
            return self.history.stacked()

    def infer(self, obs: dict[str, Any] | None = None, **options: Any) -> InferResult:
        """Request an action chunk for the current history (after observing ``obs`` if given).

        ``options``: num_inference_steps, scheduler (one of hello's ``samplers``), seed.
        """
        if obs is not None:
            self.observe(obs)
        return self.infer_stacked(self.stacked_history(), **options)

    def infer_stacked(self, stacked: dict[str, np.ndarray], **options: Any) -> InferResult:
        """Request an action chunk for an explicit history {key: (n_obs_steps, ...)}."""
        with self._call_lock:
            if self.server_info is None:
                self._hello()
            self._validate(self.server_info["obs_schema"], stacked)
            start = time.perf_counter()
            message = {"type": "infer", "obs": stacked}
            if options:
                message["options"] = options
            reply = self._check(self._call(message))
            round_trip = (time.perf_counter() - start) * 1e3
        return InferResult(reply["action"], reply["model"], reply["timing"], round_trip)

    @staticmethod
    def _validate(schema: dict[str, Any], stacked: dict[str, np.ndarray], steps: int | None = None) -> None:
        """Check (steps, ...) arrays against the server's schema (steps: n_obs_steps by default)."""
        if set(stacked) != set(schema):
            raise SchemaMismatch(f"observation keys {sorted(stacked)} != server's {sorted(schema)}")
        for key, spec in schema.items():
            want = [steps or spec["shape"][0], *spec["shape"][1:]]
            if list(stacked[key].shape) != want:
                raise SchemaMismatch(
                    f"obs[{key!r}] has shape {list(stacked[key].shape)[1:]} per step, "
                    f"server wants {spec['shape'][1:]}"
                )
            if spec["dtype"] == "uint8" and stacked[key].dtype != np.uint8:
                raise SchemaMismatch(f"obs[{key!r}] must be uint8 images, got {stacked[key].dtype}")
