"""Reading untrusted JSON text for the OCSF and STIX parsers.

Why not a bare ``json.loads``: it raises ``RecursionError`` on deep nesting, ``ValueError``
on huge integers (Python's int-digit limit) and accepts ``NaN``/``Infinity``, which are not
JSON. Here all of that becomes one ``InvalidEvent`` naming the field ``json``.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from ray_qalloc.integration.errors import invalid


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def load_json(text: str, fmt: str) -> Any:
    """Parse JSON text; ``InvalidEvent`` (field ``json``) for anything that is not JSON."""
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise invalid(fmt, "json", f"the text is not JSON ({str(exc)[:120]})",
                      "send one UTF-8 JSON document (RFC 8259).") from None


def canonical(obj: Any, fmt: str) -> str:
    """Stable JSON text of an object (sorted keys, no spaces): the ``raw`` of a list element."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        raise invalid(fmt, "json", "the object is nested too deeply",
                      "send objects nested less than a few hundred levels deep.") from None
