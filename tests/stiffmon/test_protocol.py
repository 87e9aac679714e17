"""Tests for stiffmon.protocol: round trips, validation and fuzzing."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stiffmon import protocol as p
from tests.stiffmon.strategies import MESSAGES, any_message

COMMON = {"run": "run-1", "seq": 3, "step": 10, "t": 1.7e9}


def _frames(msg: p.Message) -> list[bytes]:
    return p.encode(msg)


def _header(frames: list[bytes]) -> dict[str, object]:
    return json.loads(frames[1])


def _with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    h = _header(frames)
    h.update(changes)
    return [frames[0], json.dumps(h).encode(), *frames[2:]]


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_kind(kind: str, data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[kind])
    frames = p.encode(msg)
    assert frames[0] == f"{msg.run}/{kind}".encode()
    out = p.decode(frames)
    assert type(out) is type(msg)
    assert out == msg
    # memoryview frames (zmq.Frame.buffer) decode the same way
    assert p.decode([memoryview(f) for f in frames]) == msg


def test_every_kind_has_a_strategy() -> None:
    assert set(MESSAGES) == set(p.MESSAGE_TYPES)


def test_large_array_round_trip() -> None:
    data = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    msg = p.Matrix(**COMMON, name="big", data=data)
    frames = p.encode(msg)
    assert len(frames[2]) == data.nbytes
    out = p.decode(frames)
    assert isinstance(out, p.Matrix)
    np.testing.assert_array_equal(out.data, data)
    assert out.data.flags.writeable and out.data.flags.c_contiguous


def test_empty_arrays_round_trip() -> None:
    for msg in (
        p.Matrix(**COMMON, name="e", data=np.zeros((0, 5), np.float32)),
        p.Curve(**COMMON, name="c", x=np.zeros(0), y=np.zeros(0)),
        p.Spectrum(**COMMON, name="s", values=np.zeros(0, np.float32)),
        p.Scalars(**COMMON),
    ):
        assert p.decode(p.encode(msg)) == msg


def test_zero_d_array_is_refused_where_a_vector_is_required() -> None:
    with pytest.raises(ValueError, match="1-D"):
        p.encode(p.Spectrum(**COMMON, name="s", values=np.array(3.0)))
    frames = p.encode(p.Spectrum(**COMMON, name="s", values=np.array([3.0])))
    bad = _with_header(frames, arrays=[{"dtype": "<f8", "shape": []}])
    with pytest.raises(p.ProtocolError, match="must be 1-D"):
        p.decode(bad)


def test_non_ascii_run_names_and_text() -> None:
    msg = p.Hello(
        run="Lauf-α·β 学習",
        seq=0,
        step=0,
        t=0.0,
        name="sgd η=0.1 ✓",
        class_names=("chat", "chien", "猫"),
        optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": False},
    )
    frames = p.encode(msg)
    assert frames[0] == "Lauf-α·β 学習/hello".encode()
    assert p.decode(frames) == msg


def test_scalars_keep_nan_and_inf() -> None:
    msg = p.Scalars.from_dict({"loss": float("nan"), "x": float("inf"), "y": -1.5}, **COMMON)
    out = p.decode(p.encode(msg))
    assert isinstance(out, p.Scalars)
    d = out.as_dict()
    assert np.isnan(d["loss"]) and d["x"] == float("inf") and d["y"] == -1.5


def test_big_endian_and_non_contiguous_arrays_are_normalised() -> None:
    data = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian, Fortran-ordered view
    out = p.decode(p.encode(p.Matrix(**COMMON, name="m", data=data)))
    assert isinstance(out, p.Matrix)
    assert out.data.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out.data, data)


@pytest.mark.parametrize("dtype", ["<c16", "O", "U3", "<M8[s]"])
def test_encode_refuses_dtypes_off_the_whitelist(dtype: str) -> None:
    data = np.zeros((2, 2), dtype=dtype)
    with pytest.raises(ValueError, match="cannot go on the wire"):
        p.encode(p.Matrix(**COMMON, name="m", data=data))


def test_encode_refuses_non_json_attrs_and_bad_run_ids() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        p.encode(p.Curve(**COMMON, name="c", attrs={"xi": float("nan")}))
    with pytest.raises(ValueError, match="JSON scalar"):
        p.encode(p.Curve(**COMMON, name="c", attrs={"xi": [1, 2]}))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="run id"):
        p.encode(p.Bye(run="a/b", seq=0, step=0, t=0.0))
    with pytest.raises(ValueError, match="run id"):
        p.encode(p.Bye(run="", seq=0, step=0, t=0.0))


# ------------------------------------------------------------------ validation on decode


def test_newer_protocol_version_names_both_versions() -> None:
    newer = p.PROTOCOL_VERSION + 1
    frames = _with_header(p.encode(p.Bye(**COMMON, reason="x")), v=newer)
    with pytest.raises(p.ProtocolVersionError) as info:
        p.decode(frames)
    assert f"version {newer}" in str(info.value)
    assert f"version {p.PROTOCOL_VERSION}" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"v": "1"}, "protocol version"),
        ({"v": 0}, "unknown protocol version"),
        ({"kind": "nope"}, "unknown message kind"),
        ({"seq": -1}, "non-negative"),
        ({"seq": 1.5}, "expected int"),
        ({"step": True}, "must not be a bool"),
        ({"t": "now"}, "'t'"),
        ({"reason": 5}, "'reason'"),
        ({"run": "other"}, "does not match"),
        ({"arrays": [{"dtype": "<f8", "shape": [1]}]}, "describes 1 arrays"),
    ],
)
def test_header_validation(changes: dict[str, object], match: str) -> None:
    frames = _with_header(p.encode(p.Bye(**COMMON, reason="x")), **changes)
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(frames)


def test_missing_required_field() -> None:
    frames = p.encode(p.Event(**COMMON, level="warning", code="nan-loss", message="NaN"))
    h = _header(frames)
    del h["code"]
    with pytest.raises(p.ProtocolError, match="required field 'code'"):
        p.decode([frames[0], json.dumps(h).encode()])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"dtype": "|O", "shape": [2]}, "whitelist"),
        ({"dtype": ">f8", "shape": [2]}, "whitelist"),
        ({"dtype": "<f8", "shape": [3]}, "needs 24 bytes"),
        ({"dtype": "<f8", "shape": [-2]}, "invalid shape"),
        ({"dtype": "<f8", "shape": [2.0]}, "invalid shape"),
        ({"dtype": "<f8"}, "dtype and shape"),
        ({"dtype": "<f8", "shape": [1] * 9}, "invalid shape"),
    ],
)
def test_array_spec_validation(spec: dict[str, object], match: str) -> None:
    frames = p.encode(p.Spectrum(**COMMON, name="s", values=np.array([1.0, 2.0])))
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(_with_header(frames, arrays=[spec]))


def test_buffer_count_and_size_limit() -> None:
    frames = p.encode(p.Spectrum(**COMMON, name="s", values=np.arange(100.0)))
    with pytest.raises(p.ProtocolError, match="2 buffers"):
        p.decode([*frames, b"x"])
    with pytest.raises(p.ProtocolError, match="limit 64"):
        p.decode(frames, max_buffer_bytes=64)


def test_consistency_checks() -> None:
    frames = p.encode(p.Scalars.from_dict({"a": 1.0, "b": 2.0}, **COMMON))
    with pytest.raises(p.ProtocolError, match="2 names but 1 values"):
        p.decode(
            _with_header([*frames[:2], frames[2][:8]], arrays=[{"dtype": "<f8", "shape": [1]}])
        )
    curve = p.encode(p.Curve(**COMMON, name="c", x=np.zeros(3), y=np.zeros(3)))
    with pytest.raises(p.ProtocolError, match="x has shape"):
        p.decode([curve[0], curve[1].replace(b"[3]", b"[2]", 1), curve[2][:16], curve[3]])
    ev = p.encode(p.Event(**COMMON, level="info", code="c", message="m"))
    with pytest.raises(p.ProtocolError, match="unknown level"):
        p.decode(_with_header(ev, level="panic"))
    mat = p.encode(p.Matrix(**COMMON, name="m", data=np.zeros((2, 2)), row_labels=("a", "b")))
    with pytest.raises(p.ProtocolError, match="row labels"):
        p.decode(_with_header(mat, row_labels=["a"]))


def test_bool_buffer_must_hold_zero_or_one() -> None:
    frames = p.encode(p.Spectrum(**COMMON, name="s", values=np.array([True, False])))
    with pytest.raises(p.ProtocolError, match="bool bytes"):
        p.decode([frames[0], frames[1], b"\x02\x00"])


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"topic"],
        [b"r/bye", b"\xff\xfe"],
        [b"r/bye", b"[1, 2]"],
        [b"r/bye", b"{"],
        [b"r/bye", b'{"v": NaN}'],
        [b"r/bye", b"[" * 100_000 + b"]" * 100_000],
        [b"r/bye", b" " * (p.MAX_HEADER_BYTES + 1)],
        [b"x" * (p.MAX_TOPIC_BYTES + 1), b"{}"],
        b"r/bye",
        ["r/bye", "{}"],
    ],
)
def test_garbage_raises_protocol_error(frames: object) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode(frames)  # type: ignore[arg-type]


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    with contextlib.suppress(p.ProtocolError):
        p.decode(frames)


_mutation = st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msg=any_message, mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_frames(msg: p.Message, mutations: list[tuple[int, int, int]]) -> None:
    frames = [bytearray(f) for f in p.encode(msg)]
    for op, where, value in mutations:
        i = where % len(frames)
        fr = frames[i]
        if op == 0 and fr:  # overwrite a byte
            fr[where % len(fr)] = value
        elif op == 1:  # truncate a frame
            del fr[(where % (len(fr) + 1)) :]
        elif op == 2:  # drop a frame
            frames.pop(i)
            if not frames:
                break
        else:  # insert a byte
            fr.insert(where % (len(fr) + 1), value)
    try:
        out = p.decode([bytes(f) for f in frames])
    except p.ProtocolError:
        return
    assert isinstance(out, p.Message)
    p.encode(out)  # whatever decodes is a well-formed message


# ------------------------------------------------------------------ integer ranges


_BIG = [2**63, 2**64 + 5, 10**30]


@pytest.mark.parametrize("value", _BIG)
@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (p.Bye(**COMMON, reason="x"), "seq"),
        (p.Bye(**COMMON, reason="x"), "step"),
        (p.Hello(**COMMON, name="h"), "pid"),
        (p.Hello(**COMMON, name="h"), "param_count"),
        (p.Hello(**COMMON, name="h"), "probe_train"),
        (p.Hello(**COMMON, name="h"), "probe_val"),
        (p.Hello(**COMMON, name="h", batch_size=8), "batch_size"),
        (p.Heartbeat(**COMMON, last_seq=1, dropped=0), "last_seq"),
        (p.Heartbeat(**COMMON, last_seq=1, dropped=0), "dropped"),
    ],
)
def test_integers_beyond_int64_are_malformed(msg: p.Message, field: str, value: int) -> None:
    frames = _with_header(p.encode(msg), **{field: value})
    with pytest.raises(p.ProtocolError, match=f"{field} = {value} is out of range"):
        p.decode(frames)


def test_largest_int64_values_are_accepted() -> None:
    frames = _with_header(p.encode(p.Bye(**COMMON, reason="x")), seq=p.MAX_INT, step=p.MAX_INT)
    msg = p.decode(frames)
    assert (msg.seq, msg.step) == (p.MAX_INT, p.MAX_INT)
    np.array([msg.step], dtype=np.int64)  # fits the store's arrays


def test_pid_beyond_u32_and_huge_attrs_are_malformed() -> None:
    hello = p.encode(p.Hello(**COMMON, name="h"))
    with pytest.raises(p.ProtocolError, match="pid"):
        p.decode(_with_header(hello, pid=2**32))
    with pytest.raises(p.ProtocolError, match="out of range"):
        p.decode(_with_header(hello, optimizer={"lr": 10**400}))
    h = _header(hello)
    text = json.dumps(h).replace('"meta": {}', '"meta": {"x": 1e400}')
    with pytest.raises(p.ProtocolError, match="finite"):
        p.decode([hello[0], text.encode()])
    spec = p.encode(p.Spectrum(**COMMON, name="s", values=np.zeros(0)))
    with pytest.raises(p.ProtocolError, match="invalid shape"):
        p.decode(_with_header(spec, arrays=[{"dtype": "<f8", "shape": [2**64]}]))


def test_encode_refuses_steps_beyond_int64() -> None:
    with pytest.raises(ValueError, match="2\\^63"):
        p.encode(p.Bye(run="r", seq=0, step=2**63, t=0.0, reason="x"))


_huge_ints = st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70))


@settings(max_examples=200)
@given(msg=any_message, value=_huge_ints, data=st.data())
def test_fuzz_no_accepted_message_holds_an_integer_beyond_int64(
    msg: p.Message, value: int, data: st.DataObject
) -> None:
    frames = p.encode(msg)
    h = _header(frames)
    int_keys = sorted(k for k, v in h.items() if isinstance(v, int) and not isinstance(v, bool))
    key = data.draw(st.sampled_from([k for k in int_keys if k != "v"]))
    with pytest.raises(p.ProtocolError):
        p.decode(_with_header(frames, **{key: value}))
