"""msgpack + numpy codec: openpi's wire encoding of arrays, hardened against hostile input.

An ndarray travels as a plain msgpack map ``{"__ndarray__": True, "data": <bin>, "dtype": "<f4",
"shape": [...]}`` (the keys as msgpack bin, exactly as openpi's clients write them; str keys are accepted
too). Arrays are decoded as read-only views of msgpack's bin payload, without a further copy. Only
boolean, integer and float dtypes are accepted; nothing is ever unpickled. Pure Python: msgpack and numpy.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack
import numpy as np

ARRAY_TAG = "__ndarray__"
MAX_NDIM = 8
# Byte order, kind (bool, signed, unsigned, float) and item size: no objects, voids, strings or complex.
_DTYPE_RE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248])$")


class DecodeError(ValueError):
    """The bytes are not a valid message; the message says why."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        return {
            b"__ndarray__": True,
            b"data": arr.tobytes(),
            b"dtype": arr.dtype.str,
            b"shape": list(arr.shape),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """Encode a message (dicts, lists, scalars, str, bytes, numpy arrays)."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def _field(obj: dict, name: str) -> Any:
    if name in obj:
        return obj[name]
    return obj.get(name.encode())


def _decode_array(obj: dict) -> np.ndarray:
    data, dtype, shape = _field(obj, "data"), _field(obj, "dtype"), _field(obj, "shape")
    if isinstance(dtype, bytes):
        dtype = dtype.decode("ascii", "replace")
    if not isinstance(dtype, str) or not _DTYPE_RE.match(dtype):
        raise DecodeError(f"array dtype {dtype!r} is not allowed (bool, int and float only)")
    if not isinstance(data, bytes):
        raise DecodeError("array data must be msgpack bin")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise DecodeError(f"array shape {shape!r} is invalid")
    np_dtype = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if expected != len(data):
        raise DecodeError(
            f"array data has {len(data)} bytes, shape {list(shape)} of {dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def _object_hook(obj: dict) -> Any:
    if _field(obj, ARRAY_TAG) is True:
        return _decode_array(obj)
    return obj


def unpack(data: bytes, max_bytes: int | None = None) -> Any:
    """Decode one message; raises ``DecodeError`` for anything malformed."""
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        # strict_map_key=False: array maps from openpi clients use bin keys.
        return msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise DecodeError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
