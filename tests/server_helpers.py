"""Real servers on loopback and a bare test client (REQ or DEALER) for the server tests."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import zmq

from proto.codec import pack, unpack
from server.app import ServeConfig, Server
from server.models import BatchingConfig


@contextmanager
def running_server(model_root: Path, checkpoint: Path | None = None, **overrides):
    batching = overrides.pop("batching", BatchingConfig(max_batch=8, max_wait_ms=20.0, max_queue=64))
    config = ServeConfig(
        zmq="tcp://127.0.0.1:*", http_port=0, model_root=model_root, batching=batching, **overrides
    )
    server = Server(config)
    server.start()
    try:
        if checkpoint is not None:
            server.manager.load(checkpoint)
            assert server.manager.wait_for_load(120), "model did not load"
            assert server.manager.active is not None, server.manager.last_error
        yield server
    finally:
        server.shutdown()


class RawClient:
    """REQ or DEALER socket speaking msgpack; DEALER may add the empty delimiter frame like REQ."""

    def __init__(self, endpoint: str, kind: int = zmq.DEALER, delimiter: bool = False, timeout_s: float = 60):
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.socket.connect(endpoint)
        self.kind, self.delimiter = kind, delimiter

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def send(self, message: dict) -> None:
        payload = pack(message)
        if self.kind == zmq.DEALER and self.delimiter:
            self.send_raw(b"", payload)
        else:
            self.send_raw(payload)

    def recv(self) -> dict:
        frames = self.socket.recv_multipart()
        if self.kind == zmq.DEALER and self.delimiter:
            assert frames[0] == b""
        return unpack(frames[-1])

    def call(self, message: dict) -> dict:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        self.socket.close()


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
