"""Self-describing policy checkpoints: one ``.safetensors`` file, written atomically, validated on load.

Tensors: ``model.<param>`` (weights), optional ``ema.<param>`` (EMA weights), ``normalizer.<key>.<stat>``,
and, from the trainer, optional ``train.<...>`` state (optimizer, RNG). The header's ``__metadata__``
holds ``format`` = ``dpmlx-policy`` and ``dpmlx`` = a JSON document: format version, policy type and full
config, observation schema, action layout, control rate, training step, creation time, provenance, and
the SHA-256 of the tensor data (it identifies the weights; servers report it with every action).

The file is standard safetensors (readable by ``mx.load`` and the ``safetensors`` package), but we read
and write it ourselves so that integrity can be checked before any tensor is trusted. Nothing is pickled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from policy_core.config import ConfigError, PolicyConfig
from policy_core.policy import MX_DTYPES, DiffusionUnetPolicy

log = logging.getLogger("dpmlx.checkpoint")

FORMAT = "dpmlx-policy"
FORMAT_VERSION = 1
POLICY_TYPE = "diffusion_unet"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names <-> numpy storage dtype; bf16 is stored through a uint16 view.
_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_MX_TO_ST = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64", mx.int32: "I32",
    mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64", mx.uint32: "U32", mx.uint16: "U16",
    mx.uint8: "U8", mx.bool_: "BOOL",
}  # fmt: skip


class CheckpointError(Exception):
    """Base class: the checkpoint cannot be used. The message names the file and the problem."""


class CheckpointCorruptError(CheckpointError):
    """Not a readable safetensors file: truncated, bad header, or data not matching its hash."""


class CheckpointVersionError(CheckpointError):
    """Not a dpmlx policy checkpoint, or a format version this code does not know."""


class CheckpointMismatchError(CheckpointError):
    """Tensors missing, unexpected, or with the wrong shape or dtype for the checkpoint's config."""


@dataclass
class Checkpoint:
    """A checkpoint read into memory: the metadata document and every tensor as an MLX array."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, mx.array] = field(repr=False)

    @property
    def sha256(self) -> str:
        return self.metadata["content_sha256"]

    def group(self, prefix: str) -> dict[str, mx.array]:
        """Tensors under ``prefix.`` with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


# ---- raw safetensors I/O ------------------------------------------------------------------------

# A writer's temporary file: ``.NAME.PID.tmp`` next to the destination, locked (flock) while written.
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-save left in ``folder``; return their paths.

    A file is stale only if its writer's process is gone and nobody holds its lock: a writer in another
    PID namespace (a container sharing the folder) holds its lock, and a live writer's file is never
    touched, nor is one whose PID was reused (kept until that process is gone too).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or not readable: nothing to clean
        return removed
    for entry in entries:
        match = _TEMP_FILE.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_exists(pid):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # locked by a live writer, or removed meanwhile
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale temporary file(s) of killed writers in %s", len(removed), folder)
    return removed


def _to_bytes(a: mx.array) -> tuple[str, bytes]:
    if a.dtype not in _MX_TO_ST:
        raise TypeError(f"cannot store dtype {a.dtype}")
    st = _MX_TO_ST[a.dtype]
    host = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    return st, np.ascontiguousarray(host).tobytes()


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, mx.array], doc: dict[str, Any]
) -> str:
    """Write tensors + metadata atomically (temp file in the same folder, fsync, rename); return the hash.

    ``doc`` gets ``content_sha256`` (SHA-256 of the data section) added before it is written.
    """
    path = Path(path)
    mx.eval(list(tensors.values()))
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    digest = hashlib.sha256()
    for name in sorted(tensors):
        st, blob = _to_bytes(tensors[name])
        header[name] = {
            "dtype": st,
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        digest.update(blob)
        blobs.append(blob)
    doc = {**doc, "content_sha256": digest.hexdigest()}
    # Key order is meaningful (observation features are concatenated in shape_meta order): never sort.
    header["__metadata__"] = {"format": FORMAT, "dpmlx": json.dumps(doc)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data section to 8 bytes
    remove_stale_temp_files(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # marks the file as a live writer's
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return doc["content_sha256"]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint file: structure, format version, and content hash."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None

    def corrupt(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{path}: {why}")

    if len(raw) < 8:
        raise corrupt(f"truncated ({len(raw)} bytes, not a safetensors file)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(raw):
        raise corrupt("truncated or not a safetensors file (header length exceeds file size)")
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "dpmlx" not in meta:
        raise CheckpointVersionError(f"{path}: not a dpmlx policy checkpoint (no '{FORMAT}' metadata)")
    try:
        doc = json.loads(meta["dpmlx"])
    except (TypeError, json.JSONDecodeError):
        raise corrupt("metadata document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise corrupt("metadata document is not a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    data = memoryview(raw)[8 + header_len :]
    spans = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
            np_dtype = _ST_TO_NP[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= len(data):
            raise corrupt(f"truncated: tensor {name!r} extends past the end of the file")
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
            raise corrupt(f"tensor {name!r}: byte size does not match shape {shape}")
        spans.append((begin, end, name, shape, info["dtype"], np_dtype))
    spans.sort()
    if sum(e - b for b, e, *_ in spans) != len(data):
        raise corrupt("tensor data does not tile the data section (truncated or trailing bytes)")
    digest = hashlib.sha256()
    for begin, end, *_ in spans:
        digest.update(data[begin:end])
    if digest.hexdigest() != doc.get("content_sha256"):
        raise corrupt("content hash mismatch: tensor data is corrupt")
    tensors = {}
    for begin, end, name, shape, st, np_dtype in spans:
        arr = mx.array(np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape))
        tensors[name] = arr.view(mx.bfloat16) if st == "BF16" else arr
    return Checkpoint(path, doc, tensors)


# ---- policies -----------------------------------------------------------------------------------


def key_mismatch(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """``missing [...], unexpected [...]`` (the first five of each), or None when the key sets agree."""
    expected, got = set(expected), set(got)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if not missing and not unexpected:
        return None
    return (
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
    )


def policy_metadata(policy: DiffusionUnetPolicy) -> dict[str, Any]:
    """The schema part of the metadata document, derived from the policy config."""
    cfg = policy.config
    return {
        "format_version": FORMAT_VERSION,
        "policy_type": POLICY_TYPE,
        "config": cfg.to_dict(),
        "obs_schema": {
            key: {
                "shape": [cfg.n_obs_steps, *feat.hwc_shape],
                "dtype": "uint8" if feat.is_image else "float32",
            }
            for key, feat in cfg.obs.items()
        },
        "action": {"dim": cfg.action_dim, "horizon": cfg.horizon, "n_action_steps": cfg.n_action_steps},
        "n_obs_steps": cfg.n_obs_steps,
        "control_hz": cfg.control_hz,
        "normalizer_keys": policy.normalizer.keys(),
    }


def save_policy(
    policy: DiffusionUnetPolicy,
    path: str | os.PathLike,
    *,
    ema_params: dict[str, Any] | None = None,
    extra_tensors: dict[str, mx.array] | None = None,
    training_step: int = 0,
    provenance: dict[str, Any] | None = None,
) -> str:
    """Save a policy (and optional EMA weights / trainer state) atomically; return the content hash."""
    missing = [k for k in [*policy.config.obs, "action"] if k not in policy.normalizer]
    if missing:
        raise ValueError(f"normalizer has no statistics for {missing}: fit it before saving")
    tensors = {f"model.{k}": v for k, v in tree_flatten(policy.parameters())}
    if ema_params is not None:
        tensors.update({f"ema.{k}": v for k, v in tree_flatten(ema_params)})
    tensors.update({k: mx.array(v) for k, v in policy.normalizer.to_tensors().items()})
    for k, v in (extra_tensors or {}).items():
        if not k.startswith("train."):
            raise ValueError(f"extra tensor {k!r} must be under 'train.'")
        tensors[k] = v
    doc = {
        **policy_metadata(policy),
        "training_step": int(training_step),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance or {},
        "has_ema": ema_params is not None,
        "mlx_version": mx.__version__,
    }
    return write_safetensors_atomic(path, tensors, doc)


def policy_from_checkpoint(
    ckpt: Checkpoint, *, use_ema: bool = True, dtype: str | None = None
) -> DiffusionUnetPolicy:
    """Build the policy a verified checkpoint describes and load its weights, checking every tensor."""
    from policy_core.normalizer import LinearNormalizer

    doc = ckpt.metadata
    if doc.get("policy_type") != POLICY_TYPE:
        raise CheckpointVersionError(f"{ckpt.path}: unknown policy type {doc.get('policy_type')!r}")
    try:
        config_dict = dict(doc["config"])
        stored_dtype = MX_DTYPES[config_dict.get("dtype", "float32")]
        if dtype is not None:
            config_dict["dtype"] = dtype
        config = PolicyConfig.from_dict(config_dict)
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointMismatchError(f"{ckpt.path}: invalid config in metadata: {e}") from None
    keys = list(doc.get("normalizer_keys") or [])
    try:
        normalizer = LinearNormalizer.from_tensors(ckpt.tensors, keys)
    except KeyError as e:
        raise CheckpointMismatchError(f"{ckpt.path}: missing normalizer tensor {e.args[0]!r}") from None
    for key in [*config.obs, "action"]:
        if key not in normalizer:
            raise CheckpointMismatchError(f"{ckpt.path}: normalizer has no statistics for {key!r}")
    policy = DiffusionUnetPolicy(config, normalizer)
    source = "ema" if use_ema and doc.get("has_ema") else "model"
    weights = ckpt.group(source)
    expected = dict(tree_flatten(policy.parameters()))
    mismatch = key_mismatch(expected, weights)
    if mismatch:
        raise CheckpointMismatchError(f"{ckpt.path}: {source} weights do not match the config: {mismatch}")
    for name, ref in expected.items():
        got = weights[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointMismatchError(
                f"{ckpt.path}: tensor {source}.{name} has shape {tuple(got.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if got.dtype != stored_dtype:
            raise CheckpointMismatchError(
                f"{ckpt.path}: tensor {source}.{name} has dtype {got.dtype}, the config says {stored_dtype}"
            )
    target = MX_DTYPES[config.dtype]
    policy.update(tree_unflatten([(k, v.astype(target)) for k, v in weights.items()]))
    mx.eval(policy.parameters())
    return policy


def load_policy(
    path: str | os.PathLike, *, use_ema: bool = True, dtype: str | None = None
) -> DiffusionUnetPolicy:
    """Load a policy checkpoint, EMA weights when present (unless ``use_ema=False``).

    ``dtype`` ("float32" | "bfloat16" | "float16") overrides the stored weight dtype. Raises a
    ``CheckpointError`` subclass naming the problem for anything wrong with the file.
    """
    return policy_from_checkpoint(read_checkpoint(path), use_ema=use_ema, dtype=dtype)
