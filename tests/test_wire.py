"""The wire codec: what goes in comes out, arrays are not copied, bad frames raise ProtocolError."""

from __future__ import annotations

import math
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import wire
from actors.wire import (
    ALLOWED_DTYPES,
    MAX_HEADER_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    decode,
    encode,
    register_message,
    restamp,
)
from cluster.core.errors import ProtocolError

REQUIRED = {
    "hello": {"peer": "ndp0"},
    "task": {"task_id": 7, "kind": "expert"},
    "result": {"task_id": 7},
    "fetch": {"task_id": 1, "layer": 3, "expert": 12},
    "prefetch": {"task_id": 2, "layer": 4, "expert": 5},
    "ping": {"seq": 1},
    "pong": {"seq": 1},
    "shutdown": {},
    "error": {"message": "boom"},
}


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((4, 8)).astype(np.float32),
        rng.standard_normal(5).astype(np.float16),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.arange(3, dtype=np.int32),
        np.arange(10, dtype=np.uint8),
        np.array([True, False]),
        np.zeros((0,), np.float32),  # empty
        np.zeros((3, 0, 2), np.float32),  # empty with a zero inside the shape
        np.array(2.5, np.float64),  # 0-d
    ]


def _header(frames: list) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def _frames(header: dict, *rest: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *rest]


def test_every_builtin_type_is_covered_here():
    assert set(REQUIRED) <= set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg_type", sorted(REQUIRED))
@pytest.mark.parametrize("with_arrays", [False, True])
def test_every_message_type_round_trips(msg_type, with_arrays):
    arrays = _arrays() if with_arrays else []
    fields = {**REQUIRED[msg_type], "ready_s": 1.25, "note": "x", "meta": {"a": [1, 2]}}
    frames = encode(msg_type, fields, arrays)
    assert len(frames) == 1 + len(arrays)

    msg = decode(frames)

    assert isinstance(msg, Message)
    assert msg.type == msg_type
    assert msg.fields == fields
    assert len(msg.arrays) == len(arrays)
    for got, want in zip(msg.arrays, arrays):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_header_carries_version_type_and_array_descriptors():
    frames = encode("task", REQUIRED["task"], [np.zeros((2, 3), np.float32)])
    header = _header(frames)
    assert header["v"] == PROTOCOL_VERSION
    assert header["t"] == "task"
    assert header["arrays"] == [["float32", [2, 3]]]


def test_encode_sends_the_callers_memory_and_decode_views_the_frame():
    arr = np.arange(1024, dtype=np.float32)
    frames = encode("result", {"task_id": 1}, [arr])
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), arr)

    received = [bytes(frames[0]), bytearray(frames[1])]  # as a socket would hand them over
    msg = decode(received)
    assert np.shares_memory(msg.arrays[0], np.frombuffer(received[1], np.uint8))
    received[1][0:4] = np.float32(42.0).tobytes()
    assert msg.arrays[0][0] == 42.0


def test_decoded_arrays_over_bytes_are_read_only():
    frames = [bytes(f) for f in encode("result", {"task_id": 1}, [np.ones(4, np.float32)])]
    arr = decode(frames).arrays[0]
    assert not arr.flags.writeable


def test_non_contiguous_and_big_endian_arrays_are_sent_canonically():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = np.arange(3, dtype=">i4")
    msg = decode(encode("result", {"task_id": 1}, [base.T, big]))
    np.testing.assert_array_equal(msg.arrays[0], base.T)
    np.testing.assert_array_equal(msg.arrays[1], big)
    assert msg.arrays[1].dtype == np.dtype("<i4")


def test_numpy_scalars_in_fields_are_sent_as_python_values():
    msg = decode(encode("fetch", {"task_id": np.int64(3), "layer": 1, "expert": np.int32(2)}))
    assert msg.fields == {"task_id": 3, "layer": 1, "expert": 2}
    assert type(msg.fields["task_id"]) is int


def test_timestamps_may_be_int_or_float_but_must_be_finite():
    assert decode(encode("ping", {"seq": 1, "sent_s": 3})).fields["sent_s"] == 3
    for bad in (math.nan, math.inf, "1.0", None, True):
        with pytest.raises(ProtocolError, match="sent_s"):
            encode("ping", {"seq": 1, "sent_s": bad})
        with pytest.raises(ProtocolError, match="sent_s"):
            decode(_frames({"v": 1, "t": "ping", "arrays": [], "seq": 1, "sent_s": bad}))


@pytest.fixture
def scratch_registry():
    """Lets a test register message types without leaking them into other tests."""
    saved = dict(wire._REGISTRY), dict(wire._COMPILED)
    yield
    for live, old in zip((wire._REGISTRY, wire._COMPILED), saved):
        live.clear()
        live.update(old)


def test_register_message_extends_the_table_and_refuses_duplicates(scratch_registry):
    register_message("test-step", {"step": int, "t_s": float, "who": (str, bytes)})
    msg = decode(encode("test-step", {"step": 2, "t_s": 0.5, "who": b"gpu"}))
    assert msg.fields["who"] == b"gpu"
    with pytest.raises(ProtocolError, match="who"):
        encode("test-step", {"step": 2, "t_s": 0.5, "who": 3})
    with pytest.raises(ValueError, match="already registered"):
        register_message("test-step", {})
    with pytest.raises(ValueError, match="reserved"):
        register_message("test-bad", {"arrays": list})
    with pytest.raises(ValueError, match="not a type"):
        register_message("test-bad", {"x": "int"})
    assert "test-bad" not in MESSAGE_TYPES
    with pytest.raises(TypeError):
        MESSAGE_TYPES["sneaky"] = {}  # type: ignore[index]


# --- every rejection path ---------------------------------------------------------------------

GOOD = {"v": 1, "t": "result", "arrays": [["float32", [2]]], "task_id": 1}
PAYLOAD = np.ones(2, np.float32).tobytes()

REJECTED = {
    "no frames": [],
    "not a list": b"\x80",
    "header not a buffer": [12345],
    "header is str": ["hello"],
    "malformed msgpack": [b"\xc1", PAYLOAD],
    "truncated msgpack": [msgpack.packb(GOOD)[:-3], PAYLOAD],
    "trailing bytes": [msgpack.packb(GOOD) + b"\x00", PAYLOAD],
    "header is a list": _frames([1, "result"]),  # type: ignore[arg-type]
    "header is an int": _frames(5),  # type: ignore[arg-type]
    "header over the limit": [b"\x00" * (MAX_HEADER_BYTES + 1)],
    "non-str map key": [msgpack.packb({1: 2, "v": 1}), PAYLOAD],
    "ext type": [msgpack.packb({**GOOD, "x": msgpack.ExtType(5, b"abc")}), PAYLOAD],
    "timestamp ext": [
        msgpack.packb({**GOOD, "x": msgpack.Timestamp(1, 0)}, datetime=False),
        PAYLOAD,
    ],
    "missing version": _frames({k: v for k, v in GOOD.items() if k != "v"}, PAYLOAD),
    "wrong version": _frames({**GOOD, "v": 2}, PAYLOAD),
    "version is bool": _frames({**GOOD, "v": True}, PAYLOAD),
    "version is str": _frames({**GOOD, "v": "1"}, PAYLOAD),
    "missing type": _frames({k: v for k, v in GOOD.items() if k != "t"}, PAYLOAD),
    "unknown type": _frames({**GOOD, "t": "teleport"}, PAYLOAD),
    "type is bytes": _frames({**GOOD, "t": b"result"}, PAYLOAD),
    "missing arrays": _frames({k: v for k, v in GOOD.items() if k != "arrays"}, PAYLOAD),
    "arrays not a list": _frames({**GOOD, "arrays": {"a": 1}}, PAYLOAD),
    "missing field": _frames({k: v for k, v in GOOD.items() if k != "task_id"}, PAYLOAD),
    "ill-typed field": _frames({**GOOD, "task_id": "1"}, PAYLOAD),
    "bool for int": _frames({**GOOD, "task_id": True}, PAYLOAD),
    "float for int": _frames({**GOOD, "task_id": 1.0}, PAYLOAD),
    "too few frames": _frames(GOOD),
    "too many frames": _frames(GOOD, PAYLOAD, PAYLOAD),
    "descriptor not a pair": _frames({**GOOD, "arrays": [["float32"]]}, PAYLOAD),
    "descriptor a str": _frames({**GOOD, "arrays": ["float32"]}, PAYLOAD),
    "dtype not allowed": _frames({**GOOD, "arrays": [["object", [2]]]}, PAYLOAD),
    "dtype complex": _frames({**GOOD, "arrays": [["complex64", [1]]]}, PAYLOAD),
    "dtype numpy spelling": _frames({**GOOD, "arrays": [["<f4", [2]]]}, PAYLOAD),
    "dtype not a str": _frames({**GOOD, "arrays": [[4, [2]]]}, PAYLOAD),
    "shape not a list": _frames({**GOOD, "arrays": [["float32", 2]]}, PAYLOAD),
    "negative dim": _frames({**GOOD, "arrays": [["float32", [-2]]]}, PAYLOAD),
    "float dim": _frames({**GOOD, "arrays": [["float32", [2.0]]]}, PAYLOAD),
    "bool dim": _frames({**GOOD, "arrays": [["float32", [True, 2]]]}, PAYLOAD),
    "too many dims": _frames({**GOOD, "arrays": [["float32", [1] * 40]]}, PAYLOAD),
    "huge shape": _frames({**GOOD, "arrays": [["float32", [2**62, 2**62]]]}, PAYLOAD),
    "bytes short of shape": _frames(GOOD, PAYLOAD[:-1]),
    "bytes beyond shape": _frames(GOOD, PAYLOAD + b"\x00"),
    "frame not a buffer": _frames(GOOD, 3.5),  # type: ignore[arg-type]
    "array frame is str": _frames(GOOD, "abcdefgh"),  # type: ignore[arg-type]
    "field name not str": [msgpack.packb({**GOOD, b"x": 1}), PAYLOAD],
}


@pytest.mark.parametrize("frames", REJECTED.values(), ids=list(REJECTED))
def test_malformed_message_raises_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


def test_array_frame_over_the_limit_is_rejected_on_both_sides():
    arr = np.zeros(1025, np.uint8)
    with pytest.raises(ProtocolError, match="exceed"):
        encode("result", {"task_id": 1}, [arr], max_array_bytes=1024)
    frames = encode("result", {"task_id": 1}, [arr])
    with pytest.raises(ProtocolError, match="exceed"):
        decode(frames, max_array_bytes=1024)
    assert decode(frames, max_array_bytes=1025).arrays[0].nbytes == 1025


def test_oversized_frame_is_rejected_before_it_is_compared_with_its_shape():
    frames = _frames({**GOOD, "arrays": [["uint8", [10]]]}, b"\x00" * 4096)
    with pytest.raises(ProtocolError, match="exceed"):
        decode(frames, max_array_bytes=100)


@pytest.mark.parametrize(
    "msg_type, fields, arrays, match",
    [
        ("teleport", {}, [], "unknown message type"),
        ("task", {"task_id": 1}, [], "missing required field 'kind'"),
        ("task", {"task_id": "1", "kind": "x"}, [], "must be int"),
        ("result", {"task_id": 1, "v": 2}, [], "reserved"),
        ("result", {"task_id": 1, "x": object()}, [], "cannot encode"),
        ("result", {"task_id": 1, "x": 2**70}, [], "cannot encode"),
        ("result", {"task_id": 1, "big": "x" * MAX_HEADER_BYTES}, [], "exceeds"),
        ("result", {"task_id": 1}, [np.zeros(2, np.complex64)], "dtype"),
        ("result", {"task_id": 1}, [np.array(["a"])], "dtype"),
        ("result", {"task_id": 1}, [np.zeros(2, dtype=object)], "dtype"),
        ("result", {"task_id": 1}, [[1.0, 2.0]], "not a numpy array"),
        ("result", {"task_id": 1}, [np.zeros(1, np.uint8)] * 300, "limit"),
    ],
)
def test_encode_refuses_what_decode_would_reject(msg_type, fields, arrays, match):
    with pytest.raises(ProtocolError, match=match):
        encode(msg_type, fields, arrays)


def test_decode_accepts_zmq_frames_and_memoryviews():
    zmq = pytest.importorskip("zmq")
    arr = np.arange(20000, dtype=np.float32)  # above zmq.COPY_THRESHOLD: a real zero-copy frame
    frames = [zmq.Frame(f) for f in encode("result", {"task_id": 9}, [arr])]
    msg = decode(frames)
    np.testing.assert_array_equal(msg.arrays[0], arr)
    assert np.shares_memory(msg.arrays[0], np.frombuffer(frames[1].buffer, np.uint8))


# --- fuzz: only ProtocolError escapes ---------------------------------------------------------

_VALID = [
    encode(t, {**f, "start_s": 0.5}, arrs)
    for t, f in REQUIRED.items()
    for arrs in ([], [np.arange(6, dtype=np.float32).reshape(2, 3)], _arrays()[:3])
]
_VALID_BYTES = [[bytes(x) for x in frames] for frames in _VALID]

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_values = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(["v", "t", "arrays", "task_id", "kind", "seq", "peer", "x_s", "message"])


@st.composite
def _mutated(draw) -> list:
    frames = list(draw(st.sampled_from(_VALID_BYTES)))
    op = draw(st.integers(0, 5))
    if op == 0:  # flip bytes of one frame
        i = draw(st.integers(0, len(frames) - 1))
        buf = bytearray(frames[i])
        for _ in range(draw(st.integers(1, 4))):
            if buf:
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        frames[i] = bytes(buf)
    elif op == 1:  # truncate or extend one frame
        i = draw(st.integers(0, len(frames) - 1))
        cut = draw(st.integers(0, len(frames[i]) + 8))
        frames[i] = (frames[i] + draw(st.binary(min_size=8, max_size=8)))[:cut]
    elif op == 2:  # drop or duplicate frames
        if draw(st.booleans()) and len(frames) > 1:
            del frames[draw(st.integers(0, len(frames) - 1))]
        else:
            frames.append(frames[draw(st.integers(0, len(frames) - 1))])
    else:  # rewrite header entries with arbitrary values
        header = msgpack.unpackb(frames[0], raw=False)
        for _ in range(draw(st.integers(1, 3))):
            key = draw(_keys)
            if draw(st.integers(0, 4)) == 0:
                header.pop(key, None)
            elif key == "arrays" and draw(st.booleans()):
                header[key] = draw(
                    st.lists(
                        st.tuples(
                            st.sampled_from(["float32", "int64", "uint8", "float16", "x", "<f4"]),
                            st.lists(st.integers(-2, 2**40), max_size=4),
                        ).map(list),
                        max_size=3,
                    )
                )
            else:
                header[key] = draw(_values)
        frames[0] = msgpack.packb(header, use_bin_type=draw(st.booleans()))
    return frames


_random_frames = st.lists(st.binary(max_size=64), min_size=0, max_size=4)


@settings(
    max_examples=6000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.one_of(_mutated(), _random_frames))
def test_fuzzed_frames_raise_only_protocol_error(frames):
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    # whatever got through is a well-formed message
    assert msg.type in MESSAGE_TYPES
    for arr in msg.arrays:
        assert arr.dtype.name in ALLOWED_DTYPES


def test_data_plane_pulls_in_no_ray_and_the_codec_no_zmq():
    code = (
        "import sys, actors.wire, actors.clock; assert 'zmq' not in sys.modules; "
        "import actors.transport; assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_forwarder_checks_the_arrays_without_viewing_them_and_restamps_the_header_only():
    zmq = pytest.importorskip("zmq")
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = [zmq.Frame(f) for f in encode("data", {"kind": "partial", "at_s": 1.0}, [arr])]
    msg = decode(frames, views=False)
    assert (msg.type, msg.arrays) == ("data", [])
    with pytest.raises(ProtocolError, match="needs 48 bytes"):
        decode([frames[0], b"\0" * 8], views=False)  # still checked
    out = restamp(frames, {"at_s": 2.5})
    assert out[1] is frames[1]  # the payload frame goes out as it came in
    again = decode(out)
    assert again.fields == {"kind": "partial", "at_s": 2.5}
    np.testing.assert_array_equal(again.arrays[0], arr)
    for bad in ({"at_s": float("nan")}, {"t": "error"}):
        with pytest.raises(ProtocolError):
            restamp(frames, bad)
    # from the header the forwarder already decoded: the same bytes, no second parse
    assert bytes(restamp(frames, {"at_s": 2.5}, msg)[0]) == bytes(out[0])
    for bad in ({"at_s": float("nan")}, {"arrays": []}):
        with pytest.raises(ProtocolError):
            restamp(frames, bad, msg)


@pytest.mark.parametrize("bad, match", [
    ({"kind": "partial", "at_s": float("nan")}, "finite"),
    ({"kind": "partial", "at_s": "soon"}, "must be float"),
    ({"kind": 7, "at_s": 1.0}, "must be str"),
    ({"kind": "partial", "at_s": True}, "must be float"),
    ({"kind": "partial", "at_s": 1.0, "late_s": math.inf}, "finite"),
])
def test_a_layout_seen_before_is_still_checked_value_by_value(bad, match):
    """The field checks are kept per (type, field names): a message with the names of one that
    passed, but a bad value, is refused exactly as the first of its kind would be."""
    good = {"kind": "partial", "at_s": 1.0}
    for _ in range(3):  # the layouts are known from here on
        assert decode(encode("data", {**good, "late_s": 2})).fields == {**good, "late_s": 2}
        assert decode(encode("data", good)).fields == good
    frames = [msgpack.packb({"v": 1, "t": "data", "arrays": [], **bad})]
    with pytest.raises(ProtocolError, match=match):
        decode(frames)
    with pytest.raises(ProtocolError, match=match):
        encode("data", bad)
