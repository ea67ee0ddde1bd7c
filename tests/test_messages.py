"""Unit tests of the messages beyond observations and evolution commands (no Redis): logits replies,
actions, RUN/STOP, status reports and the models' answers on ``<prefix>:weights``.

Each builder's message goes through both encodings and back through its parser; the hypothesis
tests check that no input makes a parser raise anything but :class:`ProtocolError`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.protocol import (
    Command,
    Encoding,
    ProtocolError,
    Run,
    RunReport,
    Spaces,
    Stop,
    action_message,
    decode_entry,
    encode_entry,
    episode_report,
    parse_action,
    parse_answer,
    parse_control,
    parse_logits_reply,
    parse_observation,
    parse_reply_weights,
    parse_run_report,
    run_command,
    run_failed,
    run_report,
    set_ack,
    weights_reply,
)
from worker.protocol import fields as check

LIMIT = 1 << 20
REPLY = {
    "LOGITS": [0.5, -1.0],
    "COMPONENT_ID": "m1",
    "ENV_ID": "cart-1",
    "OBS_ID": "7-0",
    "DETERMINISTIC": True,
}


def plain(message: dict) -> dict[bytes, bytes]:
    """Fields as a program sends them in the plain encoding: one JSON text per key."""
    return {k.encode(): json.dumps(v).encode() for k, v in message.items()}


def packed(message: dict) -> dict[bytes, bytes]:
    return {b"data": msgpack.packb(message, use_bin_type=True)}


def typed(text: str) -> dict[str, Any]:
    """A message as ``redis-cli XADD ... KEY value ...`` sends it: every value bare text."""
    words = text.split()
    return decode_entry(
        {k.encode(): v.encode() for k, v in zip(words[::2], words[1::2], strict=True)}, LIMIT
    )[0]


def round_trip(message: dict[str, Any], encoding: Encoding) -> dict[str, Any]:
    fields = {k.encode() if isinstance(k, str) else k: v for k, v in encode_entry(message, encoding).items()}
    return decode_entry(fields, LIMIT)[0]


def reason(parse: Callable[[], Any]) -> str:
    with pytest.raises(ProtocolError) as info:
        parse()
    return str(info.value)


# --------------------------------------------------------------------------- shared field checks


def test_name_takes_an_integer_as_its_decimal_text() -> None:
    """redis-cli's ``RUN_ID 7`` arrives as the JSON integer 7 and names the same run as ``"7"``."""
    assert check.name(typed("RUN_ID 7"), "RUN_ID") == "7"
    assert check.name({"RUN_ID": "7"}, "RUN_ID") == "7"
    assert type(check.name(typed("RUN_ID r-1"), "RUN_ID")) is str  # not the NotJson text of the field
    assert check.name({}, "ENV_ID", default="default") == "default"


@pytest.mark.parametrize(
    "message, says",
    [
        ({}, "RUN_ID must be a non-empty string (or an integer); it is missing"),
        ({"RUN_ID": ""}, "RUN_ID must be a non-empty string (or an integer); got ''"),
        ({"RUN_ID": True}, "RUN_ID must be a non-empty string (or an integer); got True"),
        ({"RUN_ID": None}, "RUN_ID must be a non-empty string (or an integer); got None"),
        ({"RUN_ID": 1.5}, "RUN_ID must be a non-empty string (or an integer); got 1.5"),
        ({"RUN_ID": ["r"]}, "RUN_ID must be a non-empty string (or an integer); got ['r']"),
    ],
)
def test_bad_name(message: dict, says: str) -> None:
    assert reason(lambda: check.name(message, "RUN_ID")) == says


def test_name_length() -> None:
    assert check.name({"ENV_ID": "é" * 4}, "ENV_ID", max_length=4) == "é" * 4
    says = reason(lambda: check.name({"ENV_ID": "e" * 5}, "ENV_ID", max_length=4))
    assert says.startswith("ENV_ID must be a string of 1 to 4 characters (or an integer); got")


def test_choice_integer_and_numbers() -> None:
    assert check.choice(typed("CMD STOP"), "CMD", ("RUN", "STOP")) == "STOP"
    assert reason(lambda: check.choice({"CMD": ["RUN"]}, "CMD", ("RUN", "STOP"))) == (
        "CMD must be one of RUN, STOP; got ['RUN']"
    )
    assert check.integer({}, "STEPS") is None and check.integer({"STEPS": None}, "STEPS") is None
    assert check.integer({"STEPS": 0}, "STEPS") == 0
    assert reason(lambda: check.integer({"STEPS": 0}, "STEPS", minimum=1)) == (
        "STEPS must be a positive integer, got 0"
    )
    assert "STEPS must be an integer of at least 0" in reason(lambda: check.integer({"STEPS": True}, "STEPS"))
    assert check.numbers({"R": [1, 2.5]}, "R") == [1.0, 2.5]
    assert "R must be a list of numbers" in reason(lambda: check.numbers({"R": 1.0}, "R"))
    assert "R must be finite" in reason(lambda: check.numbers({"R": [1.0, math.nan]}, "R"))


SPACES = Spaces.vector((1,), 2)


def _observation(message: dict) -> Any:
    return parse_observation(message, "1-0", Encoding.JSON, SPACES)


@pytest.mark.parametrize(
    "parse, message",
    [
        (lambda m: parse_logits_reply(m, Encoding.JSON), REPLY),
        (_observation, {"OBSERVATION": [0.0]}),
        (parse_control, {"CMD": "RUN", "RUN_ID": "r", "STEPS": 1}),
    ],
)
def test_deterministic_is_one_check_everywhere(parse: Callable[[dict], Any], message: dict) -> None:
    """DETERMINISTIC is read by one function: the same values pass, the same reason for the rest."""
    for value, expected in ((True, True), (1, True), (0, False)):
        assert parse({**message, "DETERMINISTIC": value}).deterministic is expected
    assert (
        reason(lambda: parse({**message, "DETERMINISTIC": 2})) == "DETERMINISTIC must be true or false, got 2"
    )
    assert "got 'yes'" in reason(lambda: parse({**message, **typed("DETERMINISTIC yes")}))


# --------------------------------------------------------------------------- logits replies and actions


@pytest.mark.parametrize("encoding", list(Encoding))
def test_logits_reply_and_its_action(encoding: Encoding) -> None:
    reply = parse_logits_reply(round_trip(REPLY, encoding), encoding)
    assert (reply.obs_id, reply.component_id, reply.env_id, reply.deterministic) == (
        "7-0",
        "m1",
        "cart-1",
        True,
    )
    assert reply.params.dtype == np.float64 and reply.params.tolist() == [0.5, -1.0]
    assert reply.encoding is encoding
    action = round_trip(action_message(reply, 1, 3), encoding)
    assert action == {"ACTION": 1, "ENV_ID": "cart-1", "OBS_ID": "7-0", "MODELS": 3, "DETERMINISTIC": True}
    assert parse_action(action, SPACES, {"7-0"}) == ("7-0", 1)


def test_logits_reply_defaults_and_integer_ids() -> None:
    reply = parse_logits_reply(typed("LOGITS [1,2] COMPONENT_ID 7 OBS_ID 12"), Encoding.JSON)
    assert (reply.component_id, reply.obs_id, reply.env_id, reply.deterministic) == (
        "7",
        "12",
        "default",
        False,
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"LOGITS": []}, ("LOGITS (a non-empty list of numbers, or one per dimension)",)),
        ({"LOGITS": [1, True]}, ("LOGITS must hold only numbers",)),
        ({"LOGITS": "[1, 2]"}, ("LOGITS (a non-empty list of numbers, or one per dimension)",)),
        ({"LOGITS": [[1, 2], []]}, ("LOGITS must hold only numbers",)),
        (
            {"MEAN": [0.0], "LOG_STD": [0.0, 1.0]},
            ("MEAN and LOG_STD must be lists of numbers of one length",),
        ),
        ({"MEAN": [0.0], "LOG_STD": [math.inf]}, ("LOG_STD must be finite",)),
        ({"LOGITS": [1.0, math.nan]}, ("LOGITS must be finite",)),
        ({"LOGITS": [1, 10**400]}, ("LOGITS must be finite",)),
        ({"OBS_ID": ""}, ("OBS_ID",)),
        ({"COMPONENT_ID": None}, ("COMPONENT_ID",)),
        ({"ENV_ID": "e" * 257}, ("ENV_ID", "1 to 256 characters")),
        ({"DETERMINISTIC": "true"}, ("DETERMINISTIC must be true or false",)),
    ],
)
def test_bad_logits_reply(change: dict, words: tuple[str, ...]) -> None:
    says = reason(lambda: parse_logits_reply({**REPLY, **change}, Encoding.MSGPACK))
    for word in words:
        assert word in says


def test_missing_ids_of_a_logits_reply() -> None:
    for key in ("OBS_ID", "COMPONENT_ID"):
        message = {k: v for k, v in REPLY.items() if k != key}
        assert reason(lambda m=message: parse_logits_reply(m, Encoding.JSON)).startswith(f"{key} must be")


def test_an_action_is_judged_only_by_the_runner_waiting_for_it() -> None:
    waiting = {"5-0", "5-1"}
    assert parse_action({"OBS_ID": "5-1", "ACTION": [1]}, SPACES, waiting) == ("5-1", 1)  # a vector env's
    for other in ({"OBS_ID": "9-9", "ACTION": 7}, {"ACTION": 0}, {"OBS_ID": ["5-0"], "ACTION": 0}):
        assert parse_action(other, SPACES, waiting) is None  # another runner's, or nobody's
    for bad in (7, -1, True, 1.0, None, [0, 1], "1"):
        says = reason(lambda b=bad: parse_action({"OBS_ID": "5-0", "ACTION": b}, SPACES, waiting))
        assert says.startswith("ACTION must be an integer in [0, 2), got")


# --------------------------------------------------------------------------- RUN / STOP


def test_run_as_typed_at_redis_cli() -> None:
    assert parse_control(typed("CMD RUN RUN_ID 7 STEPS 20")) == Run("7", None, 20, False)
    assert parse_control(typed("CMD RUN RUN_ID eval EPISODES 3 DETERMINISTIC true")) == Run(
        "eval", 3, None, True
    )
    assert parse_control(typed("CMD STOP")) == Stop()
    assert parse_control({"CMD": "STOP", "RUN_ID": ["ignored"]}) == Stop()


@pytest.mark.parametrize(
    "run", [Run("r1", episodes=2), Run("r2", steps=5, deterministic=True), Run("r3", 1, 9)]
)
@pytest.mark.parametrize("encoding", list(Encoding))
def test_run_command_round_trip(run: Run, encoding: Encoding) -> None:
    message = run_command(run)
    assert ("EPISODES" in message) == (run.episodes is not None) and ("STEPS" in message) == (
        run.steps is not None
    )
    assert parse_control(round_trip(message, encoding)) == run


@pytest.mark.parametrize(
    "message, says",
    [
        ({}, "CMD must be one of RUN, STOP; it is missing"),
        ({"CMD": "run"}, "CMD must be one of RUN, STOP; got 'run'"),
        ({"CMD": "RUN", "STEPS": 2}, "RUN_ID must be a non-empty string (or an integer); it is missing"),
        ({"CMD": "RUN", "RUN_ID": "x", "EPISODES": -1}, "EPISODES must be a positive integer, got -1"),
        ({"CMD": "RUN", "RUN_ID": "x", "STEPS": "2"}, "STEPS must be a positive integer, got '2'"),
        ({"CMD": "RUN", "RUN_ID": "x"}, "RUN needs EPISODES or STEPS (or both)"),
        ({"CMD": "RUN", "RUN_ID": "x", "STEPS": None}, "RUN needs EPISODES or STEPS (or both)"),
        (
            {"CMD": "RUN", "RUN_ID": "x", "STEPS": 1, "DETERMINISTIC": "no"},
            "DETERMINISTIC must be true or false",
        ),
    ],
)
def test_bad_control_command(message: dict, says: str) -> None:
    assert reason(lambda: parse_control(message)).startswith(says)


# --------------------------------------------------------------------------- status reports


@pytest.mark.parametrize("encoding", list(Encoding))
def test_status_reports_round_trip(encoding: Encoding) -> None:
    episode = episode_report("r1", "env", "env-0", ret=9.0, length=9)
    assert episode == {
        "EVENT": "episode",
        "RUN_ID": "r1",
        "RUNNER_ID": "env",
        "ENV_ID": "env-0",
        "RETURN": 9.0,
        "LENGTH": 9,
    }
    assert parse_run_report(round_trip(episode, encoding)) is None  # not a run's report

    done = run_report("r1", "env", episodes=3, steps=40, returns=[10.0, 20.0])
    assert done["MEAN_RETURN"] == 15.0 and done["RUNNER_ID"] == "env"
    assert parse_run_report(round_trip(done, encoding)) == RunReport("r1", "env", 3, 40, [10.0, 20.0])
    assert run_report("r2", "env", episodes=0, steps=4, returns=[])["MEAN_RETURN"] is None

    failed = run_failed("r3", "env", "no action for observation 1-0 of env-1 in 30.0s")
    assert failed == {"EVENT": "run", "RUN_ID": "r3", "RUNNER_ID": "env", "ERROR": failed["ERROR"]}
    assert parse_run_report(round_trip(failed, encoding)) == RunReport("r3", "env", error=failed["ERROR"])


def test_a_run_report_needs_only_its_run_id() -> None:
    """Counts and returns default to none, as a program standing in for a runner may send them."""
    assert parse_run_report(typed("EVENT run RUN_ID 12")) == RunReport("12")


@pytest.mark.parametrize(
    "change, word",
    [
        ({"RUN_ID": None}, "RUN_ID"),
        ({"EPISODES": "two"}, "EPISODES"),
        ({"STEPS": -1}, "STEPS"),
        ({"STEPS": 1.0}, "STEPS"),
        ({"RETURNS": 5.0}, "RETURNS"),
        ({"RETURNS": [1.0, "2"]}, "RETURNS"),
        ({"RETURNS": [1.0, math.inf]}, "RETURNS"),
    ],
)
def test_malformed_run_report(change: dict, word: str) -> None:
    message = {**run_report("r1", "env", episodes=1, steps=5, returns=[5.0]), **change}
    assert word in reason(lambda: parse_run_report(message))


# --------------------------------------------------------------------------- answers on <prefix>:weights


@pytest.mark.parametrize("encoding", list(Encoding))
def test_answers_round_trip(encoding: Encoding) -> None:
    get = Command(entry_id="5-0", cmd="GET", weights=None, encoding=encoding)
    answer = parse_answer(round_trip(weights_reply(get, [0.5, -1.0, 2.0], "m1"), encoding))
    assert (answer.component_id, answer.request_id, answer.acknowledged) == ("m1", "5-0", False)
    vector = parse_reply_weights(answer.weights)
    assert vector.dtype == np.float32 and vector.tolist() == [0.5, -1.0, 2.0]

    set_command = Command(entry_id="6-0", cmd="SET", weights={"m1": [0.0]}, encoding=encoding)
    ack = parse_answer(round_trip(set_ack(set_command, "m1"), encoding))
    assert (ack.component_id, ack.request_id, ack.acknowledged, ack.weights) == ("m1", "6-0", True, None)


@pytest.mark.parametrize(
    "message, key",
    [
        ({"REQUEST_ID": "1-0"}, "COMPONENT_ID"),
        ({"COMPONENT_ID": "", "REQUEST_ID": "1-0"}, "COMPONENT_ID"),
        ({"COMPONENT_ID": 1.0, "REQUEST_ID": "1-0"}, "COMPONENT_ID"),
        ({"COMPONENT_ID": "m1"}, "REQUEST_ID"),
        ({"COMPONENT_ID": "m1", "REQUEST_ID": None}, "REQUEST_ID"),
    ],
)
def test_an_answer_names_its_model_and_request(message: dict, key: str) -> None:
    assert reason(lambda: parse_answer({**message, "ACK": "SET"})).startswith(f"{key} must be")


def test_an_ack_is_exactly_ack_set() -> None:
    for ack in ("set", ["SET"], True, None):
        assert not parse_answer({"REQUEST_ID": "1-0", "COMPONENT_ID": "m1", "ACK": ack}).acknowledged


def test_reply_weights_need_not_be_finite() -> None:
    """Evolution leaves a model whose weights are not finite out of the generation itself, and says so."""
    vector = parse_reply_weights([1, math.nan, 1e39])
    assert vector[0] == 1.0 and math.isnan(vector[1]) and math.isinf(vector[2])


@pytest.mark.parametrize(
    "value", [[], [[0.1], [0.2, 0.3]], [[0.1, 0.2]], [0.1, True], [0.1, "2"], b"\x00" * 8, None, 1.0, "[1]"]
)
def test_bad_reply_weights(value: Any) -> None:
    assert reason(lambda: parse_reply_weights(value)).startswith(
        "WEIGHTS must be a flat, non-empty list of numbers"
    )


def test_reply_weights_with_an_integer_beyond_float() -> None:
    assert "beyond the float range" in reason(lambda: parse_reply_weights([1, 10**400]))


# --------------------------------------------------------------------------- properties

KEYS = ["LOGITS", "COMPONENT_ID", "ENV_ID", "OBS_ID", "DETERMINISTIC", "ACTION", "CMD", "RUN_ID", "EPISODES"]
KEYS += ["STEPS", "EVENT", "ERROR", "RETURNS", "REQUEST_ID", "WEIGHTS", "ACK"]
KEYS += ["OBSERVATION", "MEAN", "LOG_STD", "REWARD", "a", "b", "dtype", "shape", "data"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers() | st.integers(308, 500).map(lambda digits: 10**digits),
    st.floats(),
    st.binary(max_size=16),
    st.text(max_size=8),
    st.sampled_from(["RUN", "STOP", "run", "SET", "7-0"]),
)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=12)
messages = st.dictionaries(st.sampled_from(KEYS), anything, max_size=8)


EVERY_SPACE = [
    Spaces.from_json(json.dumps({"observation": observation, "action": action}))
    for observation, action in (
        (
            {"type": "Box", "shape": [2, 2], "dtype": "uint8"},
            {"type": "Box", "shape": [2], "low": -1, "high": 1},
        ),
        ({"type": "Discrete", "n": 3}, {"type": "MultiDiscrete", "nvec": [2, 3]}),
        (
            {
                "type": "Dict",
                "spaces": {"a": {"type": "MultiBinary", "n": 2}, "b": {"type": "Box", "shape": [1]}},
            },
            {"type": "MultiBinary", "n": 3},
        ),
    )
]


def every_parser(message: dict[str, Any]) -> None:
    """Each parser either returns or raises ProtocolError; nothing else may escape."""
    parsers: list[Callable[[], Any]] = [
        lambda: parse_logits_reply(message, Encoding.JSON),
        lambda: parse_action(message, Spaces.vector((1,), 3), {"7-0", "7"}),
        *(lambda s=s: parse_action(message, s, {"7-0", "7"}) for s in EVERY_SPACE),
        *(lambda s=s: parse_observation(message, "1-0", Encoding.MSGPACK, s) for s in EVERY_SPACE),
        lambda: parse_control(message),
        lambda: parse_run_report(message),
        lambda: parse_reply_weights(parse_answer(message).weights),
    ]
    for parse in parsers:
        with contextlib.suppress(ProtocolError):
            parse()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.sampled_from([{}, {"CMD": "RUN"}, {"EVENT": "run"}]))
def test_no_message_breaks_a_parser(message: dict[str, Any], base: dict[str, str]) -> None:
    """Any values under the keys the parsers read, on top of a RUN or a run report to get past CMD/EVENT."""
    message = {**base, **message}
    every_parser(message)
    for encode in (plain, packed):
        try:
            decoded = decode_entry(encode(message), LIMIT)[0]
        except (TypeError, OverflowError):  # bytes: JSON has none; huge integers: msgpack has none
            continue
        except ProtocolError:
            return
        every_parser(decoded)
