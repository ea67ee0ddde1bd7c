"""Unit tests of the wire protocol (no Redis): encodings, validation of every key, dead letters.

Fast, pure-Python; the hypothesis tests check that no input whatsoever makes decoding or
validation raise anything but :class:`ProtocolError` (which the worker turns into a dead letter).
"""

from __future__ import annotations

import json
import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.protocol import (
    Encoding,
    NotJson,
    Observation,
    ProtocolError,
    Spaces,
    Streams,
    dead_letter,
    decode_entry,
    encode_entry,
    logits_reply,
    parse_command,
    parse_observation,
    parse_weight_vector,
)

SHAPE, N_ACTIONS = (4,), 2
OBS = [0.1, -0.2, 0.3, 0.4]
LIMIT = 1 << 20


def plain(message: dict) -> dict[bytes, bytes]:
    """Fields as an environment sends them in the plain encoding: one JSON text per key."""
    return {k.encode(): (v if isinstance(v, bytes) else json.dumps(v).encode()) for k, v in message.items()}


def packed(message) -> dict[bytes, bytes]:
    return {b"data": msgpack.packb(message, use_bin_type=True)}


def observe(fields: dict[bytes, bytes], shape=SHAPE, n_actions=N_ACTIONS) -> Observation:
    message, encoding = decode_entry(fields, LIMIT)
    return parse_observation(message, "1-1", encoding, Spaces.vector(shape, n_actions))


def rejected(fields: dict[bytes, bytes], *words: str) -> str:
    """The ProtocolError message for an observation entry; it must mention every word."""
    with pytest.raises(ProtocolError) as info:
        observe(fields)
    reason = str(info.value)
    for word in words:
        assert word in reason, reason
    return reason


BOTH = pytest.mark.parametrize("encode", [plain, packed], ids=["json", "msgpack"])


# --------------------------------------------------------------------------- stream names


def test_stream_and_key_names() -> None:
    s = Streams()
    assert (s.observation, s.evolution, s.logits, s.weights, s.dead) == (
        "rl:observation",
        "rl:evolution",
        "rl:logits",
        "rl:weights",
        "rl:dead",
    )
    assert s.registry == "rl:models"
    assert s.model_key("m1", "checkpoint") == "rl:model:m1:checkpoint"
    assert Streams.group("m1") == "model:m1"
    assert Streams("{rl}").observation == "{rl}:observation"  # one Redis Cluster hash slot


# --------------------------------------------------------------------------- encodings


def test_decode_msgpack_data_field() -> None:
    message, encoding = decode_entry(packed({"OBSERVATION": OBS, "ENV_ID": "e"}), LIMIT)
    assert encoding is Encoding.MSGPACK
    assert message == {"OBSERVATION": OBS, "ENV_ID": "e"}


def test_decode_plain_json_fields() -> None:
    fields = {b"OBSERVATION": b"[1, 2.5, -3, 4e-3]", b"DONE": b"true", b"ENV_ID": b'"quoted"', b"X": b"null"}
    message, encoding = decode_entry(fields, LIMIT)
    assert encoding is Encoding.JSON
    assert message == {"OBSERVATION": [1, 2.5, -3, 0.004], "DONE": True, "ENV_ID": "quoted", "X": None}


def test_plain_field_that_is_not_json_is_kept_as_text() -> None:
    message, _ = decode_entry({b"ENV_ID": b"env-1", b"CMD": b"GET", b"EMPTY": b""}, LIMIT)
    assert message == {"ENV_ID": "env-1", "CMD": "GET", "EMPTY": ""}
    assert isinstance(message["ENV_ID"], NotJson) and message["ENV_ID"].error


def test_data_field_wins_over_other_fields() -> None:
    fields = {**packed({"OBSERVATION": OBS}), b"OBSERVATION": b"[9]"}
    message, encoding = decode_entry(fields, LIMIT)
    assert encoding is Encoding.MSGPACK and message == {"OBSERVATION": OBS}


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"OBSERVATION": OBS})[:-3],  # truncated
        msgpack.packb({"OBSERVATION": OBS}) + b"\x01",  # trailing bytes
        b"\xc1",  # a reserved (never used) type byte
        b"",
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"\x91" * 5000 + b"\x01",  # nested deeper than the unpacker allows
    ],
    ids=["truncated", "trailing", "reserved", "empty", "bad-utf8", "deep"],
)
def test_bad_msgpack(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="'data' is not valid msgpack"):
        decode_entry({b"data": data}, LIMIT)


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None, {1: "a"}, {"OBSERVATION": OBS, 2: 3}, {b"K": 1}])
def test_msgpack_must_be_a_map_with_string_keys(value) -> None:
    with pytest.raises(ProtocolError, match="msgpack map with string keys"):
        decode_entry(packed(value), LIMIT)


@pytest.mark.parametrize("fields", [{b"OBS\xff": b"1"}, {b"OBSERVATION": b"[1, 2]\xff"}])
def test_plain_fields_must_be_utf8(fields) -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_entry(fields, LIMIT)


def test_size_limit_counts_fields_and_values() -> None:
    fields = {b"OBSERVATION": b"[1,2,3,4]", b"PAD": b"x" * 88}  # 11 + 9 + 3 + 88 = 111 bytes
    assert decode_entry(fields, 111)[0]["PAD"] == "x" * 88
    with pytest.raises(ProtocolError, match="111 bytes exceeds the limit of 110 bytes"):
        decode_entry(fields, 110)
    with pytest.raises(ProtocolError, match="exceeds"):  # checked before the msgpack is read
        decode_entry({b"data": b"\xc1" * 200}, 100)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_encode_decode_round_trip(encoding: Encoding) -> None:
    message = {
        "LOGITS": [0.25, -1.5],
        "COMPONENT_ID": "m1",
        "DETERMINISTIC": False,
        "ENV_ID": "env-1",
        "OBS_ID": "1700000000000-3",
        "NESTED": {"a": [1, 2, {"b": None}]},
        "UNICODE": "π ✓",
    }
    fields = encode_entry(message, encoding)
    assert (set(fields) == {"data"}) == (encoding is Encoding.MSGPACK)
    raw = {k.encode(): v for k, v in fields.items()}  # as Redis hands them back
    assert decode_entry(raw, LIMIT) == (message, encoding)


def test_plain_reply_fields_are_json_text() -> None:
    fields = encode_entry(
        {"ENV_ID": "e", "OBS_ID": "1-0", "LOGITS": [1.0, 2.0], "DETERMINISTIC": True}, Encoding.JSON
    )
    assert fields == {"ENV_ID": b'"e"', "OBS_ID": b'"1-0"', "LOGITS": b"[1.0,2.0]", "DETERMINISTIC": b"true"}


@BOTH
def test_reply_uses_the_encoding_of_the_entry(encode) -> None:
    obs = observe(encode({"OBSERVATION": OBS, "ENV_ID": "e1", "DETERMINISTIC": True}))
    reply = logits_reply(obs, {"LOGITS": [0.5, -0.5]}, "m1")
    assert reply == {
        "LOGITS": [0.5, -0.5],
        "COMPONENT_ID": "m1",
        "DETERMINISTIC": True,
        "ENV_ID": "e1",
        "OBS_ID": "1-1",
    }
    fields = encode_entry(reply, obs.encoding)
    assert ("data" in fields) == (encode is packed)
    assert decode_entry({k.encode(): v for k, v in fields.items()}, LIMIT) == (reply, obs.encoding)


def test_plain_env_id_reply_is_a_plain_string() -> None:
    """ENV_ID sent unquoted (``ENV_ID env-1``) comes back as the JSON string ``"env-1"``."""
    obs = observe({b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b"env-1"})
    assert type(obs.env_id) is str and obs.env_id == "env-1"
    assert encode_entry(logits_reply(obs, {"LOGITS": [0.0, 0.0]}, "m1"), obs.encoding)["ENV_ID"] == b'"env-1"'
    assert msgpack.unpackb(encode_entry({"ENV_ID": obs.env_id}, Encoding.MSGPACK)["data"]) == {
        "ENV_ID": "env-1"
    }


# --------------------------------------------------------------------------- observations


@BOTH
def test_observation_defaults(encode) -> None:
    obs = observe(encode({"OBSERVATION": OBS}))
    assert obs.entry_id == "1-1" and obs.env_id == "default"
    assert obs.reward is None and obs.action is None and obs.terminal_observation is None
    assert (obs.done, obs.truncated, obs.deterministic) == (False, False, False)
    assert obs.observation.dtype == np.float32 and obs.observation.shape == SHAPE
    np.testing.assert_array_equal(obs.observation, np.array(OBS, dtype=np.float32))


@BOTH
def test_observation_every_key(encode) -> None:
    obs = observe(
        encode(
            {
                "OBSERVATION": [1, 2, 3, 4],
                "ENV_ID": "cart-7",
                "REWARD": 1,
                "ACTION": 1,
                "DONE": False,
                "TRUNCATED": True,
                "TERMINAL_OBSERVATION": [0.5, 0.5, 0.5, 0.5],
                "DETERMINISTIC": True,
                "SOMETHING_ELSE": {"ignored": True},
            }
        )
    )
    assert obs.env_id == "cart-7" and obs.reward == 1.0 and isinstance(obs.reward, float) and obs.action == 1
    assert obs.done and obs.truncated and obs.deterministic
    assert obs.terminal_observation is not None and obs.terminal_observation.dtype == np.float32
    np.testing.assert_array_equal(obs.terminal_observation, [0.5] * 4)


@BOTH
def test_truncated_implies_done(encode) -> None:
    message = {"OBSERVATION": OBS, "REWARD": 0.0, "ACTION": 0, "TRUNCATED": True, "TERMINAL_OBSERVATION": OBS}
    assert observe(encode(message)).done
    assert observe(encode({**message, "DONE": True})).done


@BOTH
def test_done_without_truncated(encode) -> None:
    obs = observe(encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": 0, "DONE": True}))
    assert obs.done and not obs.truncated and obs.terminal_observation is None
    # DONE alone (an environment reset without a last reward) is accepted too
    assert observe(encode({"OBSERVATION": OBS, "DONE": True})).done


@BOTH
def test_terminal_observation_is_ignored_without_truncated(encode) -> None:
    obs = observe(encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": 0, "TERMINAL_OBSERVATION": "junk"}))
    assert obs.terminal_observation is None


@BOTH
def test_truncated_needs_terminal_observation(encode) -> None:
    rejected(
        encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": 0, "TRUNCATED": True}), "TERMINAL_OBSERVATION"
    )
    bad_terminal = {"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": 0, "TRUNCATED": True}
    rejected(encode({**bad_terminal, "TERMINAL_OBSERVATION": [1, 2]}), "TERMINAL_OBSERVATION", "shape")
    rejected(
        encode({**bad_terminal, "TERMINAL_OBSERVATION": [math.nan] * 4}), "TERMINAL_OBSERVATION", "finite"
    )


@BOTH
def test_truncated_needs_reward_and_action(encode) -> None:
    rejected(
        encode({"OBSERVATION": OBS, "TRUNCATED": True, "TERMINAL_OBSERVATION": OBS}), "TRUNCATED", "REWARD"
    )


@BOTH
@pytest.mark.parametrize("present", ["REWARD", "ACTION"])
def test_reward_and_action_come_together(encode, present: str) -> None:
    rejected(encode({"OBSERVATION": OBS, present: 1}), "REWARD", "ACTION")


@BOTH
@pytest.mark.parametrize("key", ["DONE", "TRUNCATED", "DETERMINISTIC"])
def test_flags(encode, key: str) -> None:
    extra = {"REWARD": 0.0, "ACTION": 0, "TERMINAL_OBSERVATION": OBS}
    for value, expected in [(True, True), (False, False), (1, True), (0, False)]:
        assert getattr(observe(encode({"OBSERVATION": OBS, key: value, **extra})), key.lower()) is expected
    for value in ["true", "1", 2, -1, 1.0, None, [True]]:
        rejected(encode({"OBSERVATION": OBS, key: value, **extra}), key, "true or false")


def test_flag_as_unquoted_text_is_rejected() -> None:
    rejected({b"OBSERVATION": b"[1,2,3,4]", b"DONE": b"yes"}, "DONE", "got 'yes'")  # a bare word
    rejected({b"OBSERVATION": b"[1,2,3,4]", b"DONE": b"True"}, "DONE")  # JSON is lower-case


@BOTH
def test_env_id_number_becomes_text(encode) -> None:
    assert observe(encode({"OBSERVATION": OBS, "ENV_ID": 7})).env_id == "7"
    assert observe(encode({"OBSERVATION": OBS, "ENV_ID": "7"})).env_id == "7"  # the same environment


def test_env_id_forms_in_plain_fields() -> None:
    assert observe({b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b"42"}).env_id == "42"
    assert observe({b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b"007"}).env_id == "007"  # not JSON: text
    assert observe({b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b'"1e3"'}).env_id == "1e3"
    rejected({b"OBSERVATION": b"[1,2,3,4]", b"ENV_ID": b"1e3"}, "ENV_ID")  # JSON 1000.0, not an integer


@BOTH
@pytest.mark.parametrize("env_id", ["", "x" * 257, True, 1.5, None, [1], {"a": 1}])
def test_bad_env_id(encode, env_id) -> None:
    rejected(encode({"OBSERVATION": OBS, "ENV_ID": env_id}), "ENV_ID")


def test_env_id_length_limit() -> None:
    assert observe(packed({"OBSERVATION": OBS, "ENV_ID": "é" * 256})).env_id == "é" * 256


@BOTH
def test_action_forms(encode) -> None:
    assert observe(encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": 1})).action == 1
    assert observe(encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": [0]})).action == 0  # vector env


@BOTH
@pytest.mark.parametrize("action", [2, -1, 1.0, 0.5, True, False, "0", [0, 1], [[0]], [True], None, 2**63])
def test_bad_action(encode, action) -> None:
    rejected(encode({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": action}), "ACTION")


@BOTH
@pytest.mark.parametrize("reward", ["1", True, None, [1.0], math.nan, math.inf, -math.inf])
def test_bad_reward(encode, reward) -> None:
    rejected(encode({"OBSERVATION": OBS, "REWARD": reward, "ACTION": 0}), "REWARD")


def test_reward_forms_in_plain_fields() -> None:
    assert observe({b"OBSERVATION": b"[1,2,3,4]", b"REWARD": b"-2", b"ACTION": b"0"}).reward == -2.0
    assert observe({b"OBSERVATION": b"[1,2,3,4]", b"REWARD": b"1e-3", b"ACTION": b"0"}).reward == 0.001
    for text in [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" + b"0" * 400, b"one", b'"1"']:
        rejected({b"OBSERVATION": b"[1,2,3,4]", b"REWARD": text, b"ACTION": b"0"}, "REWARD")


@BOTH
@pytest.mark.parametrize(
    "value, words",
    [
        ([1, 2, 3], ("shape [4]", "[3]")),
        ([[1, 2, 3, 4]], ("shape [4]", "[1, 4]")),
        ([], ("shape",)),
        (1.0, ("shape",)),
        ([[1, 2], [3]], ("rectangular",)),
        ([1, [2], 3, 4], ("rectangular",)),
        (["a", 1, 2, 3], ("only numbers",)),
        ([1, None, 3, 4], ("only numbers",)),
        ([1, True, 3, 4], ("only numbers",)),
        ([True, False, True, False], ("only numbers",)),
        ([{}, 1, 2, 3], ()),
        ([math.nan, 0, 0, 0], ("finite",)),
        ([0, math.inf, 0, 0], ("finite",)),
        ([0, 0, 0, 1e39], ("finite",)),  # beyond float32
        ("[1, 2, 3, 4]", ("array",)),  # a JSON string holding an array is still a string
        ({"a": 1}, ("array",)),
        (None, ("array",)),
    ],
)
def test_bad_observation(encode, value, words) -> None:
    rejected(encode({"OBSERVATION": value}), "OBSERVATION", *words)


def test_bad_observation_json_text() -> None:
    rejected({b"OBSERVATION": b"[1, 2, 3,"}, "OBSERVATION", "not JSON")  # meant as JSON: where it breaks
    rejected({b"OBSERVATION": b"[1, 2, 3, 4]", b"REWARD": b"1", b"ACTION": b"[[1]]"}, "ACTION", "got [[1]]")
    rejected({b"OBSERVATION": b"[1e39, 0, 0, 0]"}, "OBSERVATION", "float32's range")
    rejected({b"OBSERVATION": b"[NaN, 0, 0, 0]"}, "OBSERVATION", "finite")
    rejected({b"OBSERVATION": b"[Infinity, 0, 0, 0]"}, "OBSERVATION", "finite")
    rejected({b"OBSERVATION": b"[" * 100_000 + b"]" * 100_000}, "OBSERVATION")  # JSON recursion limit
    rejected({b"OBSERVATION": b"[1, 2, 3, " + b"9" * 400 + b"]"}, "OBSERVATION")  # int beyond int64/float32
    deep = b"[" * 70 + b"1" + b"]" * 70  # deeper than numpy's 64 dimensions
    rejected({b"OBSERVATION": deep}, "OBSERVATION")
    rejected(packed({"OBSERVATION": json.loads(deep)}), "OBSERVATION")


@BOTH
def test_missing_observation(encode) -> None:
    rejected(encode({"ENV_ID": "e", "observation": OBS}), "missing OBSERVATION")


def test_observation_of_other_shapes() -> None:
    image = np.arange(12, dtype=float).reshape(2, 3, 2).tolist()
    obs = observe(plain({"OBSERVATION": image}), shape=(2, 3, 2))
    assert obs.observation.shape == (2, 3, 2)
    assert observe(plain({"OBSERVATION": 3}), shape=()).observation.shape == ()
    with pytest.raises(ProtocolError, match=r"ACTION must be an integer in \[0, 5\)"):
        observe(plain({"OBSERVATION": OBS, "REWARD": 1, "ACTION": 5}), n_actions=5)


def test_describe_is_bounded() -> None:
    with pytest.raises(ProtocolError) as info:
        observe(packed({"OBSERVATION": OBS, "REWARD": 1.0, "ACTION": list(range(100_000))}))
    assert len(str(info.value)) < 200


# --------------------------------------------------------------------------- commands


@BOTH
def test_parse_get(encode) -> None:
    message, encoding = decode_entry(encode({"CMD": "GET", "EXTRA": 1}), LIMIT)
    command = parse_command(message, "5-0", encoding)
    assert (command.cmd, command.weights, command.entry_id, command.encoding) == (
        "GET",
        None,
        "5-0",
        encoding,
    )


def test_parse_get_unquoted() -> None:
    message, encoding = decode_entry({b"CMD": b"GET"}, LIMIT)
    command = parse_command(message, "5-0", encoding)
    assert command.cmd == "GET" and type(command.cmd) is str


@BOTH
def test_parse_set(encode) -> None:
    weights = {"m1": [1.0, 2.0], "m2": [3.0]}
    message, encoding = decode_entry(encode({"CMD": "SET", "WEIGHTS": weights}), LIMIT)
    command = parse_command(message, "6-0", encoding)
    assert command.cmd == "SET" and command.weights == weights


@BOTH
@pytest.mark.parametrize(
    "message, key",
    [
        ({}, "CMD"),
        ({"CMD": "get"}, "CMD"),
        ({"CMD": "DEL"}, "CMD"),
        ({"CMD": ["GET"]}, "CMD"),
        ({"CMD": None}, "CMD"),
        ({"CMD": "SET"}, "WEIGHTS"),
        ({"CMD": "SET", "WEIGHTS": [1.0, 2.0]}, "WEIGHTS"),
        ({"CMD": "SET", "WEIGHTS": "m1"}, "WEIGHTS"),
        ({"CMD": "SET", "WEIGHTS": None}, "WEIGHTS"),
    ],
)
def test_bad_command(encode, message: dict, key: str) -> None:
    fields = encode(message) if message else {b"OTHER": b"1"}
    decoded, encoding = decode_entry(fields, LIMIT)
    with pytest.raises(ProtocolError, match=key):
        parse_command(decoded, "1-0", encoding)


def test_a_bad_command_says_what_it_got() -> None:
    for fields, says in [
        ({b"OTHER": b"1"}, "CMD must be one of GET, SET; it is missing"),
        ({b"CMD": b"get"}, "CMD must be one of GET, SET; got 'get'"),  # a bare word, as redis-cli sends it
    ]:
        with pytest.raises(ProtocolError) as rejected:
            parse_command(*decode_entry(fields, LIMIT)[:1], "1-0", Encoding.JSON)
        assert str(rejected.value) == says


def test_set_weights_map_needs_string_keys() -> None:
    message, encoding = decode_entry(packed({"CMD": "SET", "WEIGHTS": {1: [1.0]}}), LIMIT)
    with pytest.raises(ProtocolError, match="WEIGHTS"):
        parse_command(message, "1-0", encoding)


# --------------------------------------------------------------------------- weight vectors


def test_weight_vector_list_and_bytes() -> None:
    values = [0.5, -1, 2.25, 3]
    vector = parse_weight_vector(values, 4)
    assert vector.dtype == np.float32 and vector.flags.writeable
    np.testing.assert_array_equal(vector, np.array(values, dtype=np.float32))
    from_bytes = parse_weight_vector(struct.pack("<4f", *values), 4)
    assert from_bytes.dtype == np.float32 and from_bytes.flags.writeable
    np.testing.assert_array_equal(from_bytes, vector)
    via_msgpack = msgpack.unpackb(msgpack.packb(np.array(values, "<f4").tobytes(), use_bin_type=True))
    np.testing.assert_array_equal(parse_weight_vector(via_msgpack, 4), vector)


@pytest.mark.parametrize(
    "value, words",
    [
        ([1.0, 2.0, 3.0], ("shape [4]",)),
        ([1.0] * 5, ("shape [4]",)),
        ([[1.0, 2.0], [3.0, 4.0]], ("shape [4]",)),
        ([1.0, math.nan, 0.0, 0.0], ("finite",)),
        ([1.0, math.inf, 0.0, 0.0], ("finite",)),
        ([1.0, 1e39, 0.0, 0.0], ("finite",)),
        ([1.0, "2", 0.0, 0.0], ("numbers",)),
        ([1.0, True, 0.0, 0.0], ("numbers",)),
        (struct.pack("<3f", 1, 2, 3), ("4 float32", "12 bytes")),
        (struct.pack("<4f", 1, math.nan, 3, 4), ("finite",)),
        (struct.pack("<4f", 1, 2, -math.inf, 4), ("finite",)),
        ("[1, 2, 3, 4]", ("list",)),
        ({"a": 1}, ("list",)),
        (None, ("list",)),
        (1.0, ("list",)),
    ],
)
def test_bad_weight_vector(value, words) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_weight_vector(value, 4)
    assert "WEIGHTS" in str(info.value)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- dead letters


def test_dead_letter_fields() -> None:
    fields = {b"OBSERVATION": b"[1,2]", b"BIN": b"\x00\xff"}
    letter = dead_letter(fields, "rl:observation", "12-3", "OBSERVATION must have shape [4]", "m1", LIMIT)
    assert letter == {
        b"OBSERVATION": b"[1,2]",
        b"BIN": b"\x00\xff",  # copied verbatim, binary-safe
        b"dead:reason": b"OBSERVATION must have shape [4]",
        b"dead:stream": b"rl:observation",
        b"dead:id": b"12-3",
        b"dead:component_id": b"m1",
    }


def test_dead_letter_of_oversized_entry_keeps_only_its_size() -> None:
    fields = {b"OBSERVATION": b"x" * 100}
    letter = dead_letter(fields, "rl:observation", "1-0", "too big", "m1", 50)
    assert letter == {
        b"dead:size": b"111",
        b"dead:fields": b"1",
        b"dead:reason": b"too big",
        b"dead:stream": b"rl:observation",
        b"dead:id": b"1-0",
        b"dead:component_id": b"m1",
    }


def test_dead_letter_of_a_dead_letter_replaces_the_old_reason() -> None:
    first = dead_letter({b"CMD": b"X"}, "rl:evolution", "1-0", "old", "m1", LIMIT)
    second = dead_letter(first, "rl:evolution", "2-0", "new", "m2", LIMIT)
    assert second[b"dead:reason"] == b"new" and second[b"dead:id"] == b"2-0" and second[b"CMD"] == b"X"
    assert len(second) == len(first)  # no duplicate (str and bytes) field names


# --------------------------------------------------------------------------- properties

KEYS = [
    "OBSERVATION",
    "ENV_ID",
    "REWARD",
    "ACTION",
    "DONE",
    "TRUNCATED",
    "TERMINAL_OBSERVATION",
    "DETERMINISTIC",
    "CMD",
    "WEIGHTS",
]


def values(integers: st.SearchStrategy, *extra: st.SearchStrategy) -> st.SearchStrategy:
    """JSON-ish values (msgpack adds bytes and bounded integers), nested a few levels."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        integers,
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
        *extra,
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    )


# Values shaped like the real thing, so validation gets past its first checks.
near_misses = st.one_of(
    st.lists(st.floats() | st.integers(-3, 3), min_size=3, max_size=5),
    st.lists(st.lists(st.floats(), min_size=1, max_size=3), min_size=1, max_size=4),
    st.integers(-2, 3),
    st.lists(st.integers(-1, 2), max_size=2),
    st.sampled_from(["GET", "SET", "e1", ""]),
    st.dictionaries(st.sampled_from(["m1", "m2"]), st.lists(st.floats(), min_size=2, max_size=4)),
)
huge_integers = st.integers(308, 2000).map(lambda digits: 10**digits) | st.integers(max_value=-(10**308))
json_messages = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8),
    values(st.integers() | huge_integers) | near_misses,
    max_size=9,
)
msgpack_values = values(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=20))
msgpack_messages = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8),
    msgpack_values | near_misses | st.dictionaries(st.sampled_from(["m1", "m2"]), st.binary(max_size=16)),
    max_size=9,
)


def _everything(fields: dict[bytes, bytes]) -> None:
    """Decode and validate as the worker would; only ProtocolError may escape."""
    try:
        message, encoding = decode_entry(fields, LIMIT)
    except ProtocolError:
        return
    try:
        obs = parse_observation(message, "1-0", encoding, Spaces.vector(SHAPE, N_ACTIONS))
    except ProtocolError:
        pass
    else:
        assert type(obs.env_id) is str and 0 < len(obs.env_id) <= 256
        assert obs.observation.shape == SHAPE and obs.observation.dtype == np.float32
        assert np.isfinite(obs.observation).all()
        assert (obs.reward is None) == (obs.action is None)
        assert obs.reward is None or math.isfinite(obs.reward)
        assert obs.action is None or (type(obs.action) is int and 0 <= obs.action < N_ACTIONS)
        assert not obs.truncated or (obs.done and obs.terminal_observation is not None)
        if obs.terminal_observation is not None:
            assert np.isfinite(obs.terminal_observation).all()
    try:
        command = parse_command(message, "1-0", encoding)
    except ProtocolError:
        return
    for value in (command.weights or {}).values():
        try:
            vector = parse_weight_vector(value, 3)
        except ProtocolError:
            continue
        assert vector.shape == (3,) and vector.dtype == np.float32 and np.isfinite(vector).all()


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Mostly valid observations with any key replaced by anything: exercises the checks after the first.
anything = values(st.integers() | huge_integers) | near_misses
almost_valid = st.fixed_dictionaries(
    {
        "OBSERVATION": st.just(OBS) | anything,
        "REWARD": st.just(1.0) | anything,
        "ACTION": st.just(0) | anything,
    },
    optional={key: anything for key in KEYS if key not in ("OBSERVATION", "REWARD", "ACTION")},
)


@FAST
@given(almost_valid)
def test_almost_valid_observations(message: dict) -> None:
    _everything({k.encode(): json.dumps(v).encode() for k, v in message.items()})


@FAST
@given(st.dictionaries(st.binary(max_size=12), st.binary(max_size=40), max_size=6))
def test_arbitrary_bytes_fields(fields: dict[bytes, bytes]) -> None:
    _everything(fields)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_in_data_field(data: bytes) -> None:
    _everything({b"data": data})


@FAST
@given(json_messages)
def test_arbitrary_json_fields(message: dict) -> None:
    _everything({k.encode(): json.dumps(v).encode() for k, v in message.items()})


nested_text = st.integers(0, 5000).map(lambda n: "[" * n + "1" + "]" * n)


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=30) | nested_text, max_size=6))
def test_arbitrary_text_fields(message: dict) -> None:
    """Unquoted text, as typed at ``redis-cli``: JSON or not, anything goes."""
    _everything({k.encode(): v.encode() for k, v in message.items()})


@FAST
@given(msgpack_messages)
def test_arbitrary_msgpack_maps(message: dict) -> None:
    _everything(packed(message))


@FAST
@given(msgpack_values)
def test_arbitrary_msgpack_values(value) -> None:
    _everything(packed(value))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=4, max_size=4),
    st.text(min_size=1, max_size=20),
    st.integers(0, N_ACTIONS - 1),
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # a REWARD must fit float32
    st.sampled_from(list(Encoding)),
)
def test_valid_observations_round_trip(values, env_id, action, reward, encoding) -> None:
    message = {"OBSERVATION": values, "ENV_ID": env_id, "ACTION": action, "REWARD": reward}
    fields = {k.encode(): v for k, v in encode_entry(message, encoding).items()}
    obs = observe(fields)
    assert obs.env_id == env_id and obs.action == action and obs.reward == reward
    np.testing.assert_array_equal(obs.observation, np.array(values, dtype=np.float32))
