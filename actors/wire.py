"""Wire protocol of the data plane: the codec, kept apart from any socket.

A message is a list of frames::

    frame 0      msgpack map  {"v": PROTOCOL_VERSION, "t": <type>, "arrays": [[dtype, shape], ...],
                               <field>: <value>, ...}
    frame 1..n   the raw bytes of each array, C order, little endian, in header order

Arrays never go through msgpack (``bin`` is ~5x slower than a separate frame at 1 MiB, see
DESIGN.md section 5) and nothing is ever pickled. :func:`encode` returns ``memoryview`` frames
over the caller's arrays, so a transport that sends with ``copy=False`` sends them without a
copy: do not mutate an array between ``encode`` and the end of the send. :func:`decode` returns
``np.frombuffer`` views over the received frames (zero copy); they are read-only whenever the
frame buffer is (``bytes``), and live as long as the frame does.

Fields are plain msgpack values (None, bool, int, float, str, bytes, lists, str-keyed maps).
Times travel in header fields whose names end in ``_s``: the stamps of the emulation
(``at_s``: the wall time, in the run's reference timebase, at which a message takes effect at
its receiver; devices on other hosts correct their own clock by the offset the scheduler
measured at start-up) and durations. The codec checks that every such top-level field is a
finite number, so a NaN never reaches anyone's queueing arithmetic.

Every known message type names its required fields and their types in one small registry
(:data:`MESSAGE_TYPES`); :func:`register_message` adds a type and refuses a duplicate. Extra
fields are allowed. Anything that does not conform -- wrong version, unknown type, a missing or
ill-typed field, a frame count that disagrees with the header, a dtype outside
:data:`ALLOWED_DTYPES`, a shape that disagrees with the frame's bytes, a header over
:data:`MAX_HEADER_BYTES`, an array frame over ``max_array_bytes``, malformed msgpack -- raises
:class:`~cluster.core.errors.ProtocolError` and nothing else, so an actor can count and drop it.

This module runs a little over 450 lines and stays whole: encoding, decoding and the field
checks share the type registry and its caches (the per-message fast paths), and one wire
format's rules are easiest to audit in one place.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import msgpack
import numpy as np

from cluster.core.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_ARRAY_BYTES = 256 * 1024**2
MAX_ARRAYS = 256
MAX_NDIM = 16

# Canonical little-endian dtypes, keyed by the name that travels in the header.
ALLOWED_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        name: np.dtype(name).newbyteorder("<")
        for name in (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "bool",
        )
    }
)
_DTYPE_NAMES = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}  # dtype.name costs ~3 us

RESERVED_KEYS = frozenset({"v", "t", "arrays"})

FieldType = type | tuple[type, ...]

# message type -> {required field -> allowed Python type(s)}. ``float`` also accepts an int,
# ``int`` never accepts a bool. Keep it small: requirements every sender of the type meets.
_REGISTRY: dict[str, dict[str, FieldType]] = {}
MESSAGE_TYPES: Mapping[str, Mapping[str, FieldType]] = MappingProxyType(_REGISTRY)
"""Read-only view of the registry; extend it with :func:`register_message`."""

# the same, compiled for the hot path: type -> ((field, exact types, types for isinstance), ...)
_COMPILED: dict[str, tuple[tuple[str, frozenset[type], tuple[type, ...]], ...]] = {}


def register_message(msg_type: str, required_fields: Mapping[str, FieldType]) -> None:
    """Add a message type and the fields (name -> type or tuple of types) it must carry.

    Raises ``ValueError`` for a duplicate type, a reserved field name or a non-type.
    """
    if not isinstance(msg_type, str) or not msg_type:
        raise ValueError(f"message type must be a non-empty str, got {msg_type!r}")
    if msg_type in _REGISTRY:
        raise ValueError(f"message type {msg_type!r} is already registered")
    spec: dict[str, FieldType] = {}
    compiled = []
    for name, typ in required_fields.items():
        if not isinstance(name, str) or name in RESERVED_KEYS:
            raise ValueError(
                f"field {name!r} of {msg_type!r} is reserved by the header or not a str"
            )
        types = typ if isinstance(typ, tuple) else (typ,)
        if not types or not all(isinstance(t, type) for t in types):
            raise ValueError(f"field {name!r} of {msg_type!r}: {typ!r} is not a type")
        exact = set(types)
        if float in exact:
            exact.add(int)
        spec[name] = typ
        compiled.append((name, frozenset(exact), types))
    _REGISTRY[msg_type] = spec
    _COMPILED[msg_type] = tuple(compiled)


for _type, _fields in {
    "hello": {"peer": str},  # a peer announces itself after connecting
    "task": {"task_id": int, "kind": str},  # scheduler -> actor: run work
    "result": {"task_id": int},  # actor -> scheduler: work done (partials as arrays)
    "fetch": {"task_id": int, "layer": int, "expert": int},  # on-demand weight move NDP -> GPU
    "prefetch": {"task_id": int, "layer": int, "expert": int},  # background weight move
    "cmd": {"kind": str},  # scheduler -> device or link: one-way dispatch (stamped at_s)
    "data": {"kind": str, "at_s": float},  # device <-> link <-> device: a transfer
    "event": {"kind": str},  # device -> scheduler: what happened (routed, token, done)
    "ping": {"seq": int},
    "pong": {"seq": int},
    "shutdown": {},
    "error": {"message": str},
}.items():
    register_message(_type, _fields)
del _type, _fields


class Message(NamedTuple):
    """A decoded message. ``arrays`` are zero-copy views over the received frames;
    ``descs`` the header's array descriptors (what :func:`restamp` needs to re-pack it)."""

    type: str
    fields: dict[str, Any]
    arrays: list[np.ndarray]
    descs: list | None = None


# --- encode -----------------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    # numpy scalars turn up in fields all the time (an int64 expert id); send their Python value.
    if isinstance(obj, np.generic) and not isinstance(obj, np.void):
        return obj.item()
    raise TypeError(f"cannot put {type(obj).__name__} in a header")


_local = threading.local()


def _packer() -> msgpack.Packer:
    # building a Packer costs more than packing a header; one per thread, as it is not thread-safe
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, default=_pack_default)
    return packer


def encode(
    msg_type: str,
    fields: Mapping[str, Any] | None = None,
    arrays: Sequence[np.ndarray] = (),
    *,
    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
) -> list[bytes | memoryview]:
    """Frames of one message: a msgpack header, then one raw frame per array.

    Non-contiguous or big-endian arrays are copied into canonical form; all others are sent as
    ``memoryview`` s of the caller's memory. Raises :class:`ProtocolError` on anything
    :func:`decode` would reject.
    """
    descs: list[list[Any]] = []
    header: dict[Any, Any] = {"v": PROTOCOL_VERSION, "t": msg_type, "arrays": descs}
    if fields:
        if not isinstance(fields, Mapping):
            raise ProtocolError(
                f"fields of {msg_type!r} must be a mapping, not {type(fields).__name__}"
            )
        for key, value in fields.items():
            if key in RESERVED_KEYS:
                raise ProtocolError(f"field {key!r} is reserved by the header")
            header[key] = value.item() if isinstance(value, np.generic) else value
    _check_fields(msg_type, header)  # reserved keys are neither required nor end in _s
    if len(arrays) > MAX_ARRAYS:
        raise ProtocolError(f"{len(arrays)} arrays exceed the limit of {MAX_ARRAYS}")

    frames: list[bytes | memoryview] = []
    for i, arr in enumerate(arrays):
        if not isinstance(arr, np.ndarray):
            raise ProtocolError(f"array {i} is a {type(arr).__name__}, not a numpy array")
        name = _DTYPE_NAMES.get(arr.dtype)
        canonical = name is not None
        if not canonical:  # maybe big endian, maybe not allowed at all
            name = arr.dtype.name
            if name not in ALLOWED_DTYPES or arr.dtype.kind not in "fiub":
                raise ProtocolError(
                    f"array {i}: dtype {arr.dtype} is not one of {sorted(ALLOWED_DTYPES)}"
                )
        if arr.ndim > MAX_NDIM:
            raise ProtocolError(f"array {i}: {arr.ndim} dimensions exceed the limit of {MAX_NDIM}")
        if arr.nbytes > max_array_bytes:
            raise ProtocolError(
                f"array {i}: {arr.nbytes} bytes exceed the limit of {max_array_bytes}"
            )
        if not canonical or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=ALLOWED_DTYPES[name])
        descs.append([name, list(arr.shape)])
        # memoryview cannot cast a view with a zero in its shape
        frames.append(memoryview(arr).cast("B") if arr.size else b"")

    try:
        packed = _packer().pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        _local.packer = None  # a failed pack may leave the packer's buffer dirty
        raise ProtocolError(f"cannot encode {msg_type!r} header: {exc}") from exc
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"{msg_type!r} header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}"
        )
    return [packed, *frames]


def restamp(frames: Sequence[Any], changes: Mapping[str, Any],
            decoded: Message | None = None) -> list[Any]:
    """A message that :func:`decode` already accepted, with header fields replaced.

    Only the header frame is re-packed; the array frames go out as they came (the same
    ``zmq.Frame`` or buffer objects: no copy, and no second validation of what did not
    change). ``changes`` may not touch the reserved keys, and a time field must stay finite.
    ``decoded``: what :func:`decode` made of these frames (its fields unchanged since), so
    the header is rebuilt from it instead of being parsed a second time.
    """
    if decoded is not None and decoded.descs is not None:
        header = {"v": PROTOCOL_VERSION, "t": decoded.type, "arrays": decoded.descs,
                  **decoded.fields}
    else:
        header = msgpack.unpackb(frames[0], raw=False)
    for key, value in changes.items():
        if key in RESERVED_KEYS:
            raise ProtocolError(f"restamp may not change the reserved field {key!r}")
        if key.endswith("_s") and not _is_finite_number(value):
            raise ProtocolError(f"field {key!r} must be a finite number, got {_short(value)}")
        header[key] = value
    try:
        packed = _packer().pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        _local.packer = None
        raise ProtocolError(f"cannot re-encode a header: {exc}") from exc
    return [packed, *frames[1:]]


# --- decode -----------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed in a header")


def _as_bytes_view(frame: Any, what: str, index: int | None = None) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError as exc:
        where = what if index is None else f"{what} {index}"
        raise ProtocolError(f"{where} is a {type(frame).__name__}, not a buffer") from exc
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except (TypeError, ValueError) as exc:
            where = what if index is None else f"{what} {index}"
            raise ProtocolError(f"{where} is not a contiguous byte buffer") from exc
    return view


def decode(frames: Sequence[Any], *, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
           views: bool = True) -> Message:
    """Parse and validate one message; raises :class:`ProtocolError` and nothing else.

    ``views=False``: the array frames are checked as always (dtype, shape, byte count) but no
    array is made (``arrays`` is empty), for a forwarder that passes the frames on untouched.
    """
    try:
        return _decode(frames, max_array_bytes, views)
    except ProtocolError:
        raise
    except Exception as exc:  # a path the checks below missed must still not crash an actor
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode(frames: Sequence[Any], max_array_bytes: int, views: bool = True) -> Message:
    if type(frames) is not list and (
        not isinstance(frames, Sequence) or isinstance(frames, (bytes, bytearray, memoryview, str))
    ):
        raise ProtocolError(f"a message is a sequence of frames, got {type(frames).__name__}")
    if not frames:
        raise ProtocolError("empty message: no header frame")
    if len(frames) > MAX_ARRAYS + 1:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {MAX_ARRAYS + 1}")

    head = _as_bytes_view(frames[0], "header frame")
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    n = head.nbytes
    try:
        header = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError, StackError...
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")

    version = header.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_short(version)} is not {PROTOCOL_VERSION}")
    msg_type = header.pop("t", None)
    if not isinstance(msg_type, str):
        raise ProtocolError(f"message type must be a str, got {type(msg_type).__name__}")
    descs = header.pop("arrays", None)
    if not isinstance(descs, list):
        raise ProtocolError(f"{msg_type!r}: 'arrays' must be a list, got {type(descs).__name__}")
    fields = header  # what is left
    _check_fields(msg_type, fields)
    if len(descs) != len(frames) - 1:
        raise ProtocolError(
            f"{msg_type!r}: header describes {len(descs)} arrays but {len(frames) - 1} frames follow"
        )

    arrays = []
    for i, desc in enumerate(descs):
        dtype, shape, expected = _check_desc(i, desc, max_array_bytes)
        buf = _as_bytes_view(frames[i + 1], "array frame", i)
        if buf.nbytes != expected:
            if buf.nbytes > max_array_bytes:
                raise ProtocolError(f"array frame {i}: {buf.nbytes} bytes exceed {max_array_bytes}")
            raise ProtocolError(
                f"array {i}: {dtype.name}{tuple(shape)} needs {expected} bytes, frame has {buf.nbytes}"
            )
        if not views:
            continue
        arr = np.frombuffer(buf, dtype=dtype)
        arrays.append(arr if len(shape) == 1 else arr.reshape(shape))
    return Message(msg_type, fields, arrays, descs)


def _check_desc(i: int, desc: Any, max_array_bytes: int) -> tuple[np.dtype, list[int], int]:
    """The dtype, shape and byte size an array descriptor ``[dtype, shape]`` announces."""
    if not isinstance(desc, list) or len(desc) != 2:
        raise ProtocolError(f"array {i}: descriptor must be [dtype, shape], got {_short(desc)}")
    name, shape = desc
    dtype = ALLOWED_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(
            f"array {i}: dtype {_short(name)} is not one of {sorted(ALLOWED_DTYPES)}"
        )
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"array {i}: shape must be a list of at most {MAX_NDIM} ints")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"array {i}: shape {_short(shape)} must hold ints >= 0")
    # Python ints do not overflow, so a huge shape is caught here rather than in numpy
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_array_bytes:
        raise ProtocolError(f"array {i}: shape {_short(shape)} exceeds {max_array_bytes} bytes")
    return dtype, shape, nbytes


_MISSING = object()

# (type, field names in order) -> the time fields among them, for names already found to be
# str and to include every required field; bounded, as the names come from the peers
_FIELD_PLANS: dict[tuple, tuple[str, ...]] = {}
_MAX_FIELD_PLANS = 512


def _check_fields(msg_type: Any, fields: Mapping[Any, Any]) -> None:
    """Raises ProtocolError unless ``fields`` carry the required fields of ``msg_type`` with
    their types and every ``*_s`` field is a finite number. The names' checks are kept per
    (type, names): a peer sends the same few layouts over and over."""
    try:
        key = (msg_type, tuple(fields))
        times = _FIELD_PLANS.get(key)
    except TypeError:  # an unhashable type: the full check names the problem
        times = None
    if times is not None:
        for name, exact, types in _COMPILED[msg_type]:
            value = fields[name]
            if type(value) not in exact and not _is_instance(value, types):
                break
        else:
            for name in times:
                value = fields[name]
                if not ((type(value) is float and math.isfinite(value))
                        or _is_finite_number(value)):
                    break
            else:
                return
    _check_fields_in_full(msg_type, fields)
    if times is None and len(_FIELD_PLANS) < _MAX_FIELD_PLANS:
        _FIELD_PLANS[(msg_type, tuple(fields))] = tuple(n for n in fields if n.endswith("_s"))


def _check_fields_in_full(msg_type: Any, fields: Mapping[Any, Any]) -> None:
    spec = _COMPILED.get(msg_type) if isinstance(msg_type, str) else None
    if spec is None:
        raise ProtocolError(f"unknown message type {_short(msg_type)}; known: {sorted(_REGISTRY)}")
    for name, exact, types in spec:
        value = fields.get(name, _MISSING)
        if type(value) not in exact and not _is_instance(value, types):
            if value is _MISSING:
                raise ProtocolError(f"{msg_type!r} is missing required field {name!r}")
            raise ProtocolError(
                f"{msg_type!r} field {name!r} must be {_type_name(types)}, got {_short(value)}"
            )
    for name, value in fields.items():
        if not isinstance(name, str):
            raise ProtocolError(f"{msg_type!r} field name {_short(name)} is not a str")
        if name.endswith("_s") and not (
            (type(value) is float and math.isfinite(value)) or _is_finite_number(value)
        ):
            raise ProtocolError(
                f"{msg_type!r} field {name!r} is emulated seconds and must be a finite number, "
                f"got {_short(value)}"
            )


def _is_instance(value: Any, typ: FieldType) -> bool:
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _is_finite_number(value: Any) -> bool:
    if not _is_instance(value, float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _type_name(typ: FieldType) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join(t.__name__ for t in types)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_array(obj: Any) -> np.ndarray:
    """A JSON document as a uint8 array frame: bulky plain data (a run's report) travels as
    an array, never in the size-capped header, and never pickled."""
    import json

    return np.frombuffer(json.dumps(obj, allow_nan=False).encode(), dtype=np.uint8)


def from_json_array(a: np.ndarray) -> Any:
    import json

    try:
        return json.loads(np.asarray(a, dtype=np.uint8).tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a JSON frame that does not parse: {exc}") from exc

