"""What every benchmark's command line shares: a console and the JSON it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console


def make_console() -> Console:
    """Tables are not squeezed to 80 columns when the output is a pipe or a file."""
    return Console(width=None if sys.stdout.isatty() else 200)


def write_json(path: Path | None, result: Any, console: Console) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {path}")
