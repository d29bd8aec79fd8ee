"""Message types, error codes and request validation of the dpmlx protocol (see PROTOCOL.md).

Pure Python + numpy: shared by the server and the robot-side client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
REQUEST_TYPES = ("hello", "infer", "reset", "ping")
SCHEDULERS = ("ddim", "ddpm", "consistency")  # a model offers some of them (hello: samplers)
# Real-time chunking (options.prefix / delay / rtc): the choices and the defaults the server applies.
RTC_SCHEDULES = ("exp", "linear", "hard")
RTC_METHODS = ("guided", "replace")
RTC_DEFAULTS = {"schedule": "exp", "max_guidance": 40.0, "method": "guided"}


class ErrorCode:
    """Stable error codes carried in ``{"ok": false, "error": {"code", "message"}}``."""

    BAD_REQUEST = "bad_request"  # malformed message, unknown type, bad options, NaN/Inf
    SCHEMA_MISMATCH = "schema_mismatch"  # observation keys/shapes/dtypes differ from the model's schema
    # Finite but far outside the range the model was trained on, or the policy's actions for it are not
    # finite: this request fails, the others of its batch do not.
    INVALID_OBSERVATION = "invalid_observation"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNSUPPORTED_SAMPLER = "unsupported_sampler"  # a scheduler the model does not offer (hello: samplers)
    TOO_LARGE = "too_large"  # message over the server's size limit
    OVERLOADED = "overloaded"  # queue full: retry later
    NOT_READY = "not_ready"  # no model loaded yet
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InferOptions:
    num_inference_steps: int | None = None
    scheduler: str | None = None
    seed: int | None = None
    n_action_steps: int | None = None  # actions to return; more than the model's default reach further
    # Real-time chunking: the actions still to execute, (k, A) or (B, k, A) float32, the chunk's first
    # action first; how many of them pass before the chunk is used; {schedule, max_guidance, method}.
    prefix: np.ndarray | None = None
    delay: int = 0
    rtc: dict[str, Any] = field(default_factory=lambda: dict(RTC_DEFAULTS))

    def batch_key(self) -> tuple:
        """Requests with equal keys may share a batch (the seed, prefix and rtc options are per row)."""
        return (self.num_inference_steps, self.scheduler)


@dataclass
class Request:
    type: str
    id: Any
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    options: InferOptions = field(default_factory=InferOptions)


def error_reply(request_type: Any, request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": request_type, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _parse_options(raw: Any) -> InferOptions:
    if raw is None:
        return InferOptions()
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options must be a map")
    known = {"num_inference_steps", "scheduler", "seed", "n_action_steps", "prefix", "delay", "rtc"}
    unknown = set(raw) - known
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown option(s): {sorted(map(str, unknown))}")
    steps, scheduler, seed = raw.get("num_inference_steps"), raw.get("scheduler"), raw.get("seed")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.num_inference_steps must be a positive int")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULERS):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"options.scheduler must be one of {SCHEDULERS}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.seed must be an int in [0, 2**63)")
    n_actions = raw.get("n_action_steps")
    if n_actions is not None and (
        isinstance(n_actions, bool) or not isinstance(n_actions, int) or n_actions < 1
    ):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.n_action_steps must be a positive int")
    prefix, delay = _parse_prefix(raw.get("prefix"), raw.get("delay"))
    return InferOptions(steps, scheduler, seed, n_actions, prefix, delay, _parse_rtc(raw.get("rtc")))


def _parse_prefix(prefix: Any, delay: Any) -> tuple[np.ndarray | None, int]:
    """options.prefix and options.delay checked without the model: float32, finite, 0 <= delay <= k."""
    if delay is None:
        delay = 0
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.delay must be an int >= 0")
    if prefix is None:
        if delay:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"options.delay {delay} > k = 0: no options.prefix")
        return None, 0
    if not isinstance(prefix, np.ndarray) or prefix.ndim not in (2, 3):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "options.prefix must be a float32 array [k, action_dim] or [B, k, action_dim]",
        )
    if prefix.dtype != np.float32:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"options.prefix must be float32, got {prefix.dtype}")
    if not np.isfinite(prefix).all():
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.prefix contains NaN or Inf")
    k = prefix.shape[-2]
    if delay > k:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"options.delay {delay} > k = {k}, the prefix's length")
    return prefix, delay


def _parse_rtc(raw: Any) -> dict[str, Any]:
    """options.rtc with the defaults filled in."""
    if raw is None:
        return dict(RTC_DEFAULTS)
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.rtc must be a map")
    unknown = set(raw) - set(RTC_DEFAULTS)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown options.rtc key(s): {sorted(map(str, unknown))}")
    rtc = {**RTC_DEFAULTS, **raw}
    for key, choices in (("schedule", RTC_SCHEDULES), ("method", RTC_METHODS)):
        if not isinstance(rtc[key], str) or rtc[key] not in choices:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"options.rtc.{key} must be one of {choices}")
    beta = rtc["max_guidance"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "options.rtc.max_guidance must be a finite number > 0")
    rtc["max_guidance"] = float(beta)
    return rtc


def parse_request(msg: Any) -> Request:
    """Check the envelope of a decoded message (not the observation schema)."""
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a message must be a msgpack map")
    rtype, rid = msg.get("type"), msg.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be an int or a str")
    if not isinstance(rtype, str) or rtype not in REQUEST_TYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"type must be one of {REQUEST_TYPES}, got {rtype!r}")
    protocol = msg.get("protocol")
    if protocol is not None and (type(protocol) is not int or protocol != PROTOCOL_VERSION):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"client speaks protocol {protocol!r}, this server speaks {PROTOCOL_VERSION}",
        )
    request = Request(type=rtype, id=rid)
    if rtype == "infer":
        obs = msg.get("obs")
        if not isinstance(obs, dict) or not obs:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "infer needs obs: a non-empty map of arrays")
        request.obs = obs
        request.options = _parse_options(msg.get("options"))
    return request


def validate_obs(
    obs: dict[str, Any], schema: dict[str, dict[str, Any]]
) -> tuple[dict[str, np.ndarray], bool]:
    """Check observations against a model's schema ``{key: {"shape": [n_obs_steps, ...], "dtype"}}``.

    Accepts one robot (n_obs_steps, ...) or a batch (B, n_obs_steps, ...). Images must be uint8; low-dim
    values may be any real dtype and are cast to float32; NaN/Inf are refused. Returns arrays with a
    batch axis and whether the request was batched.
    """
    missing = [k for k in schema if k not in obs]
    unexpected = [str(k) for k in obs if k not in schema]
    if missing or unexpected:
        raise ProtocolError(
            ErrorCode.SCHEMA_MISMATCH, f"observation keys differ: missing {missing}, unexpected {unexpected}"
        )
    out: dict[str, np.ndarray] = {}
    batched = None
    batch = None
    for key, spec in schema.items():
        arr = obs[key]
        if not isinstance(arr, np.ndarray):
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"obs[{key!r}] must be an array")
        expected = tuple(spec["shape"])
        if arr.shape == expected:
            is_batched = False
        elif arr.ndim == len(expected) + 1 and arr.shape[1:] == expected and arr.shape[0] >= 1:
            is_batched = True
        else:
            raise ProtocolError(
                ErrorCode.SCHEMA_MISMATCH,
                f"obs[{key!r}] has shape {list(arr.shape)}, "
                f"expected {list(expected)} or [B, *{list(expected)}]",
            )
        if batched is None:
            batched = is_batched
        elif batched != is_batched:
            raise ProtocolError(
                ErrorCode.SCHEMA_MISMATCH, "either every observation has a batch axis or none"
            )
        if spec["dtype"] == "uint8":
            if arr.dtype != np.uint8:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"obs[{key!r}] must be uint8, got {arr.dtype}")
        else:
            if arr.dtype.kind not in "iuf":
                raise ProtocolError(
                    ErrorCode.SCHEMA_MISMATCH, f"obs[{key!r}] must be numeric, got {arr.dtype}"
                )
            with np.errstate(over="ignore"):  # out-of-range values become inf and are refused below
                arr = arr.astype(np.float32, copy=False)
            if not np.isfinite(arr).all():
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"obs[{key!r}] contains NaN or Inf")
        arr = arr if is_batched else arr[None]
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise ProtocolError(
                ErrorCode.SCHEMA_MISMATCH, f"obs[{key!r}] has batch size {arr.shape[0]}, not {batch}"
            )
        out[key] = arr
    return out, bool(batched)
