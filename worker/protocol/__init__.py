"""The wire protocol: stream names, the two entry encodings, and every message of every stream.

Everything another program (or ``redis-cli``) must know to talk to the components lives in this
package and in ``docs/protocol.md``; every component decodes, validates and encodes through it,
and nothing here touches Redis.

- :mod:`~worker.protocol.streams`: the names of the streams and keys under one prefix;
- :mod:`~worker.protocol.encoding`: msgpack or JSON entries, and dead letters;
- :mod:`~worker.protocol.fields`: the checks every message shares (flags, numbers, arrays, names);
- :mod:`~worker.protocol.observations`: observations, logits replies, actions;
- :mod:`~worker.protocol.spaces`: the observation and action spaces models publish for clients, and
  the form of the distribution each action space is answered with;
- :mod:`~worker.protocol.values`: observations and actions of every space, binary arrays;
- :mod:`~worker.protocol.commands`: evolution's GET/SET and their answers, RUN/STOP and status reports.
"""

from worker.protocol.commands import (
    Answer,
    Command,
    Run,
    RunReport,
    Stop,
    episode_report,
    get_command,
    parse_answer,
    parse_command,
    parse_control,
    parse_reply_weights,
    parse_run_report,
    parse_weight_vector,
    run_command,
    run_failed,
    run_report,
    set_ack,
    set_command,
    stop_command,
    weights_reply,
)
from worker.protocol.encoding import (
    DATA_FIELD,
    MAX_DEAD_FIELDS,
    Encoding,
    NotJson,
    ProtocolError,
    dead_letter,
    decode_entry,
    encode_entry,
)
from worker.protocol.observations import (
    MAX_ENV_ID_LENGTH,
    MAX_REPLY_TO_LENGTH,
    LogitsReply,
    Observation,
    action_message,
    logits_reply,
    parse_action,
    parse_logits_reply,
    parse_observation,
)
from worker.protocol.spaces import Family, Spaces, describe_space, space_from, unsupported
from worker.protocol.streams import Streams, before, split_id
from worker.protocol.values import binary, parse_action_value, parse_value, wire_value

__all__ = [
    "DATA_FIELD",
    "MAX_DEAD_FIELDS",
    "MAX_ENV_ID_LENGTH",
    "MAX_REPLY_TO_LENGTH",
    "Answer",
    "Command",
    "Encoding",
    "Family",
    "LogitsReply",
    "NotJson",
    "Observation",
    "ProtocolError",
    "Run",
    "RunReport",
    "Spaces",
    "Stop",
    "Streams",
    "action_message",
    "before",
    "binary",
    "dead_letter",
    "decode_entry",
    "describe_space",
    "encode_entry",
    "episode_report",
    "get_command",
    "logits_reply",
    "parse_action",
    "parse_action_value",
    "parse_answer",
    "parse_command",
    "parse_control",
    "parse_logits_reply",
    "parse_observation",
    "parse_reply_weights",
    "parse_run_report",
    "parse_value",
    "parse_weight_vector",
    "run_command",
    "run_failed",
    "run_report",
    "stop_command",
    "unsupported",
    "set_ack",
    "set_command",
    "space_from",
    "split_id",
    "weights_reply",
    "wire_value",
]
