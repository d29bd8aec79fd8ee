"""Self-describing policy checkpoints: one ``.safetensors`` file, written atomically, validated on load.

Tensors: ``model.<param>`` (weights), optional ``ema.<param>`` (EMA weights), ``normalizer.<key>.<stat>``,
and, from the trainer, optional ``train.<...>`` state (optimizer, RNG). The header's ``__metadata__``
holds ``format`` = ``dpmlx-policy``, ``dpmlx`` = a JSON document (format version, policy type and full
config, observation schema, action layout, control rate, training step, creation time, provenance, and
``content_sha256``, the SHA-256 of the tensor data: it identifies the weights, servers report it with
every action) and, from format version 2, ``header_sha256``: the SHA-256 of the whole header as written
with this value's 64 characters replaced by zeros. So every byte of the file is covered: the header
(metadata document, tensor names, dtypes, shapes, offsets) by ``header_sha256``, the data by
``content_sha256``, which the header holds. Version 1 files (no header hash) are still read, with a
warning. The metadata document is validated strictly on load: required keys and their types, a config
that round-trips, and an observation schema, action layout and control rate that agree with it.

The file is standard safetensors (readable by ``mx.load`` and the ``safetensors`` package), but we read
and write it ourselves so that integrity can be checked before any tensor is trusted: the header and the
declared sizes are checked against the file's size before any tensor data is read, the data is hashed in
fixed-size chunks, and tensors are only then read, one at a time. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import re
import stat
import struct
import time
import types
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from policy_core.config import ConfigError, ObsEncoderConfig, PolicyConfig
from policy_core.normalizer import LinearNormalizer
from policy_core.policy import MX_DTYPES, POLICY_CLASSES, DiffusionPolicy, build_policy
from policy_core.schedulers import SchedulerConfig

log = logging.getLogger("dpmlx.checkpoint")

FORMAT = "dpmlx-policy"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no header hash (read with a warning)
# Ours are 10-200 KB (config and tensor table); the bound caps what a hostile file costs to parse.
MAX_HEADER_BYTES = 16 * 1024 * 1024
HEADER_HASH = "header_sha256"
_HASH_PLACEHOLDER = "0" * 64
_READ_CHUNK = 1 << 20  # hashing reads the data section in chunks of this size

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


class CheckpointMetadataError(CheckpointMismatchError):
    """The metadata document lacks a key, has one of the wrong type, or disagrees with its config."""


class OldCheckpointWarning(UserWarning):
    """A checkpoint of an older format version: readable, but its metadata is not integrity-checked."""


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


def _header_bytes(table: dict[str, Any], doc: dict[str, Any]) -> bytes:
    """The safetensors header for a tensor table and metadata document, with its ``header_sha256``."""
    # Key order is meaningful (observation features are concatenated in shape_meta order): never sort.
    meta = {"format": FORMAT, "dpmlx": json.dumps(doc), HEADER_HASH: _HASH_PLACEHOLDER}
    header = json.dumps({**table, "__metadata__": meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data section to 8 bytes
    return header.replace(_hash_field(_HASH_PLACEHOLDER), _hash_field(hashlib.sha256(header).hexdigest()))


def _hash_field(value: str) -> bytes:
    return f'"{HEADER_HASH}":"{value}"'.encode()


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, mx.array], doc: dict[str, Any]
) -> str:
    """Write tensors + metadata atomically (temp file in the same folder, fsync, rename); return the hash.

    ``doc`` gets ``content_sha256`` (SHA-256 of the data section) added before it is written, and the
    header its ``header_sha256``.
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
    header_bytes = _header_bytes(header, doc)
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


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _read_header(f: BinaryIO, size: int, corrupt) -> tuple[bytes, dict[str, Any]]:
    """The raw header bytes and the parsed header; only the header is read."""
    if size < 8:
        raise corrupt(f"truncated ({size} bytes, not a safetensors file)")
    (header_len,) = struct.unpack("<Q", _read_exactly(f, 8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise corrupt("truncated or not a safetensors file (header length exceeds file size)")
    raw = _read_exactly(f, header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    return raw, header


def _check_header_hash(raw: bytes, meta: dict[str, Any], version: Any, path: Path, corrupt) -> None:
    expected = meta.get(HEADER_HASH)
    if expected is None and version == 1:
        warnings.warn(
            f"{path}: a format version 1 checkpoint, whose metadata is not covered by a hash: "
            "policy_core.checkpoint.upgrade_checkpoint(path) rewrites it in the current format",
            OldCheckpointWarning,
            stacklevel=3,
        )
        return
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise corrupt(f"no valid {HEADER_HASH} in the header")
    field = _hash_field(expected)
    if raw.count(field) != 1:
        raise corrupt(f"{HEADER_HASH} mismatch: the header is corrupt")
    if hashlib.sha256(raw.replace(field, _hash_field(_HASH_PLACEHOLDER))).hexdigest() != expected:
        raise corrupt(f"{HEADER_HASH} mismatch: the metadata or tensor table is corrupt")


def _tensor_spans(header: dict[str, Any], data_size: int, corrupt) -> list[tuple]:
    """(begin, end, name, shape, safetensors dtype, numpy dtype) in file order, checked to tile the data
    section exactly: declared sizes agree with the file before any data is read."""
    spans = []
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            np_dtype = _ST_TO_NP[info["dtype"]]
            if not all(type(x) is int and x >= 0 for x in (begin, end, *shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {name!r}") from None
        if not begin <= end <= data_size:
            raise corrupt(f"truncated: tensor {name!r} extends past the end of the file")
        if end - begin != math.prod(shape) * np.dtype(np_dtype).itemsize:
            raise corrupt(f"tensor {name!r}: byte size does not match shape {shape}")
        spans.append((begin, end, name, shape, info["dtype"], np_dtype))
    spans.sort()
    position = 0
    for begin, end, *_ in spans:
        if begin != position:
            raise corrupt("tensor data does not tile the data section (overlaps or gaps)")
        position = end
    if position != data_size:
        raise corrupt("tensor data does not tile the data section (truncated or trailing bytes)")
    return spans


def _data_sha256(f: BinaryIO, size: int) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(min(_READ_CHUNK, size))
    view = memoryview(buffer)
    while size:
        n = f.readinto(view[: min(len(buffer), size)])
        if not n:
            raise EOFError
        digest.update(view[:n])
        size -= n
    return digest.hexdigest()


def _read_tensors(f: BinaryIO, data_start: int, spans: list[tuple]) -> dict[str, mx.array]:
    """Each tensor copied into MLX from a read-only memory map of the file: no staging copy on the heap
    (whose freed pages the allocator kept, a checkpoint's size per model thread)."""
    tensors = {}
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for begin, end, name, shape, st_dtype, np_dtype in spans:
            view = np.frombuffer(mapped, np.uint8, end - begin, data_start + begin)
            arr = mx.array(view.view(np_dtype).reshape(shape))  # a copy
            del view  # no export of the map may outlive it
            tensors[name] = arr.view(mx.bfloat16) if st_dtype == "BF16" else arr
    mx.eval(list(tensors.values()))
    return tensors


def read_checkpoint(path: str | os.PathLike, timings: dict[str, float] | None = None) -> Checkpoint:
    """Read and verify a checkpoint file: structure, format version, header and content hashes, and the
    metadata document (``validate_metadata``). Memory: the tensors (the hash is computed in chunks before
    any is read). ``timings`` gets ``verify_s``, the seconds spent hashing (a server's start breakdown)."""
    path = Path(path)

    def corrupt(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{path}: {why}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the reader
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path}: cannot read: not a regular file")
            raw, header = _read_header(f, st.st_size, corrupt)
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or "dpmlx" not in meta:
                raise CheckpointVersionError(
                    f"{path}: not a dpmlx policy checkpoint (no '{FORMAT}' metadata)"
                )
            try:
                doc = json.loads(meta["dpmlx"])
            except (TypeError, json.JSONDecodeError, RecursionError):
                raise corrupt("metadata document is not valid JSON") from None
            if not isinstance(doc, dict):
                raise corrupt("metadata document is not a JSON object")
            version = doc.get("format_version")
            if version not in READABLE_VERSIONS or type(version) is not int:
                raise CheckpointVersionError(
                    f"{path}: checkpoint format version {version!r} is not supported "
                    f"(this build reads {', '.join(map(str, READABLE_VERSIONS))})"
                )
            _check_header_hash(raw, meta, version, path, corrupt)
            validate_metadata(doc, path)
            data_start = 8 + len(raw)
            spans = _tensor_spans(header, st.st_size - data_start, corrupt)
            # Hash first in fixed-size chunks: a file whose data is not what its header says costs no
            # memory, whatever its size.
            hashing = time.perf_counter()
            if _data_sha256(f, st.st_size - data_start) != doc["content_sha256"]:
                raise corrupt("content hash mismatch: tensor data is corrupt")
            if timings is not None:
                timings["verify_s"] = time.perf_counter() - hashing
            tensors = _read_tensors(f, data_start, spans) if spans else {}
        except EOFError:
            raise corrupt("truncated while reading (the file changed or is shorter than it says)") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return Checkpoint(path, doc, tensors)


def upgrade_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> str:
    """Rewrite a checkpoint of an older format version in the current one (in place without ``dst``):
    the same tensors bit for bit (so the same ``content_sha256``) and metadata. Returns the hash."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OldCheckpointWarning)
        ckpt = read_checkpoint(src)
    doc = {k: v for k, v in ckpt.metadata.items() if k != "content_sha256"}
    return write_safetensors_atomic(dst or src, ckpt.tensors, {**doc, "format_version": FORMAT_VERSION})


# ---- metadata -----------------------------------------------------------------------------------

_DOC_TYPES: dict[str, Any] = {
    "format_version": int, "policy_type": str, "config": dict, "obs_schema": dict, "action": dict,
    "n_obs_steps": int, "control_hz": float, "normalizer_keys": list[str], "training_step": int,
    "created_at": str, "provenance": dict, "has_ema": bool, "mlx_version": str, "content_sha256": str,
}  # fmt: skip


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` (decoded JSON) does not have type ``hint``, or None. bool is no int; an int is a
    float; a tuple is a JSON list; a dataclass is an object whose present fields have their types."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(value, a) for a in args]
        return None if None in errors else " or ".join(e for e in errors if e)
    if hint is type(None):
        return None if value is None else f"{value!r} is not null"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return f"{value!r} is not an object"
        hints = typing.get_type_hints(hint)
        for key, item in value.items():
            why = _type_error(item, hints[key]) if key in hints else None
            if why:
                return f"{key}: {why}"
        return None
    if origin in (tuple, list):
        if not isinstance(value, list):
            return f"{value!r} is not a list"
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return f"{value!r} does not have {len(args)} items"
        return next((e for e in (_type_error(v, args[0]) for v in value) if e), None)
    if origin is dict:
        return None if isinstance(value, dict) else f"{value!r} is not an object"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"{value!r} is not a finite number"
    if hint is int:
        return None if type(value) is int else f"{value!r} is not an integer"
    return None if type(value) is hint else f"{value!r} is not a {hint.__name__}"


def _config_types(config: dict[str, Any]) -> str | None:
    """Type errors of a stored policy config (``PolicyConfig.from_dict`` would convert some silently)."""
    hints = typing.get_type_hints(PolicyConfig)
    for key, value in config.items():
        hint = {"noise_scheduler": SchedulerConfig, "obs_encoder": ObsEncoderConfig}.get(key, hints.get(key))
        if key == "shape_meta":
            hint = dict[str, Any]
            why = (
                _type_error(value.get("action", {}).get("shape"), list[int])
                if isinstance(value, dict)
                else None
            )
            for feat in (value.get("obs") or {}).values() if isinstance(value, dict) else ():
                why = why or _type_error(feat, dict) or _type_error(feat.get("shape"), list[int])
                why = why or _type_error(feat.get("type", "low_dim"), str)
            if why:
                return f"shape_meta: {why}"
        why = _type_error(value, hint) if hint is not None else None
        if why:
            return f"{key}: {why}"
    return None


def _schema_of(cfg: PolicyConfig) -> dict[str, Any]:
    """What a checkpoint's metadata says about its inputs and outputs, derived from its config."""
    return {
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
    }


def validate_metadata(doc: dict[str, Any], path: str | os.PathLike) -> PolicyConfig:
    """Check a metadata document strictly; return its policy config. Raises CheckpointMetadataError
    naming the key (CheckpointVersionError for an unknown policy type): a server reads these values to
    answer robots, so none may be missing, of another type, or disagree with the config."""

    def invalid(why: str) -> CheckpointMetadataError:
        return CheckpointMetadataError(f"{path}: invalid metadata: {why}")

    missing = [k for k in _DOC_TYPES if k not in doc]
    unknown = [k for k in doc if k not in _DOC_TYPES]
    if missing or unknown:
        raise invalid(f"missing key(s) {missing}, unknown key(s) {unknown}")
    if doc["policy_type"] not in POLICY_CLASSES:
        raise CheckpointVersionError(f"{path}: unknown policy type {doc['policy_type']!r}")
    for key, hint in _DOC_TYPES.items():
        why = _type_error(doc[key], hint)
        if why:
            raise invalid(f"{key}: {why}")
    if not re.fullmatch(r"[0-9a-f]{64}", doc["content_sha256"]) or doc["training_step"] < 0:
        raise invalid("content_sha256 must be 64 hex digits and training_step >= 0")
    why = _config_types(doc["config"])
    if why:
        raise invalid(f"config.{why}")
    try:
        config = PolicyConfig.from_dict(doc["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise invalid(f"config: {e}") from None
    # A field missing from the stored config would silently take its default.
    stored, derived = doc["config"], config.to_dict()
    differ = sorted(k for k in stored.keys() | derived.keys() if stored.get(k, ...) != derived.get(k, ...))
    if differ:
        raise invalid(f"config field(s) {differ} are missing or not what the config means")
    if doc["policy_type"] != config.type:
        raise invalid(f"policy_type {doc['policy_type']!r} disagrees with the config's type {config.type!r}")
    for key, want in _schema_of(config).items():
        if doc[key] != want:
            raise invalid(f"{key} {doc[key]!r} disagrees with the config ({want!r})")
    absent = [k for k in [*config.obs, "action"] if k not in doc["normalizer_keys"]]
    if absent:
        raise invalid(f"normalizer_keys lacks {absent}")
    return config


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


def policy_metadata(policy: DiffusionPolicy) -> dict[str, Any]:
    """The schema part of the metadata document, derived from the policy config."""
    cfg = policy.config
    return {
        "format_version": FORMAT_VERSION,
        "policy_type": cfg.type,
        "config": cfg.to_dict(),
        **_schema_of(cfg),
        "normalizer_keys": policy.normalizer.keys(),
    }


def save_policy(
    policy: DiffusionPolicy,
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


def _config(ckpt: Checkpoint, dtype: str | None) -> PolicyConfig:
    try:
        return PolicyConfig.from_dict({**ckpt.metadata["config"], **({"dtype": dtype} if dtype else {})})
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointMismatchError(f"{ckpt.path}: invalid config in metadata: {e}") from None


def _normalizer(ckpt: Checkpoint, config: PolicyConfig) -> LinearNormalizer:
    try:
        normalizer = LinearNormalizer.from_tensors(ckpt.tensors, ckpt.metadata["normalizer_keys"])
    except KeyError as e:
        raise CheckpointMismatchError(f"{ckpt.path}: missing normalizer tensor {e.args[0]!r}") from None
    dims = {key: feat.shape[0] for key, feat in config.obs.items()} | {"action": config.action_dim}
    for key, dim in dims.items():
        for stat_name, value in normalizer[key].arrays().items():
            if value.shape != (dim,) or not np.isfinite(value).all():
                raise CheckpointMismatchError(
                    f"{ckpt.path}: normalizer.{key}.{stat_name} must be {dim} finite values, "
                    f"got shape {value.shape}"
                )
        if not normalizer[key].scale.all():
            raise CheckpointMismatchError(f"{ckpt.path}: normalizer.{key}.scale has zeros")
    return normalizer


def _load_weights(policy: DiffusionPolicy, ckpt: Checkpoint, use_ema: bool) -> None:
    """Check every tensor against the policy's parameters, then (only then) assign them."""
    stored_dtype = MX_DTYPES[ckpt.metadata["config"]["dtype"]]
    source = "ema" if use_ema and ckpt.metadata["has_ema"] else "model"
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
    target = MX_DTYPES[policy.config.dtype]
    policy.update(tree_unflatten([(k, v.astype(target)) for k, v in weights.items()]))
    mx.eval(policy.parameters())


def policy_from_checkpoint(
    ckpt: Checkpoint, *, use_ema: bool = True, dtype: str | None = None
) -> DiffusionPolicy:
    """Build the policy a verified checkpoint describes and load its weights, checking every tensor."""
    config = _config(ckpt, dtype)
    policy = build_policy(config, _normalizer(ckpt, config))
    # The random initial weights are replaced unevaluated; MLX's global key still holds the chain of
    # splits that drew them, growing by ~90 KB with every policy loaded until something evaluates it.
    mx.eval(mx.random.state)
    _load_weights(policy, ckpt, use_ema)
    return policy


def load_into(
    policy: DiffusionPolicy, ckpt: Checkpoint, *, use_ema: bool = True, dtype: str | None = None
) -> bool:
    """Give ``policy`` a verified checkpoint's weights and normalizer if the checkpoint's config (with the
    ``dtype`` override) equals the policy's; return whether it did. The policy's compiled functions take
    its weights and normalizer as inputs, so nothing is traced again (a server swapping checkpoints of
    one architecture compiles nothing). Nothing changes when a check fails."""
    config = _config(ckpt, dtype)
    if config != policy.config:
        return False
    normalizer = _normalizer(ckpt, config)
    _load_weights(policy, ckpt, use_ema)
    policy.normalizer = normalizer
    return True


def load_policy(
    path: str | os.PathLike, *, use_ema: bool = True, dtype: str | None = None
) -> DiffusionPolicy:
    """Load a policy checkpoint, EMA weights when present (unless ``use_ema=False``).

    ``dtype`` ("float32" | "bfloat16" | "float16") overrides the stored weight dtype. Raises a
    ``CheckpointError`` subclass naming the problem for anything wrong with the file.
    """
    return policy_from_checkpoint(read_checkpoint(path), use_ema=use_ema, dtype=dtype)


def export_policy(src: str | os.PathLike, dst: str | os.PathLike, name: str | None = None) -> str:
    """Write the weights ``src`` serves (its EMA weights when it has them) to ``dst`` without any trainer
    state: a checkpoint to ship. Provenance and training step are kept, with the source's content hash;
    returns the new file's."""
    ckpt = read_checkpoint(src)
    policy = policy_from_checkpoint(ckpt)
    provenance = {**ckpt.metadata["provenance"], "exported_from": ckpt.sha256}
    if name is not None:
        provenance["name"] = name
    return save_policy(policy, dst, training_step=ckpt.metadata["training_step"], provenance=provenance)
