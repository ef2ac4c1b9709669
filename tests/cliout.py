"""What a CLI command printed, as a user's terminal or script would see it.

Why: the CLI runs inside the test process (typer's runner), whose Ray — started by the test
session with ``log_to_driver`` on — may print a raylet or worker line into the captured stream
at any moment (a run stopped on purpose is reported as a worker death). A real ``qalloc`` process
connects with ``log_to_driver=False``; these lines are the harness's, not the command's."""

from __future__ import annotations

import re
from typing import Any

_RAY_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|pid=|[A-Za-z_][\w.:-]* pid=)")


def command_output(text: str) -> str:
    """``text`` without the lines the test process's Ray printed into it."""
    return "".join(line for line in text.splitlines(keepends=True) if not _RAY_LINE.match(line))


def output_of(result: Any) -> str:
    return command_output(result.output)
