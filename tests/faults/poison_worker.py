"""``python -m tests.faults.poison_worker model ...``: a model worker that dies by SIGKILL whenever it
handles an observation carrying the key ``POISON``.

It stands in for an entry that crashes the process itself (a native library's segfault, the OOM
killer on a huge batch): nothing the worker's own error handling can catch, so only the delivery
count can stop the entry from killing every worker that reads it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from worker.cli import main
from worker.model import loop as model

_parse = model.parse_observation


def _parse_or_die(message: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    if "POISON" in message:
        os.kill(os.getpid(), signal.SIGKILL)
    return _parse(message, *args, **kwargs)


model.parse_observation = _parse_or_die

if __name__ == "__main__":
    sys.exit(main())
