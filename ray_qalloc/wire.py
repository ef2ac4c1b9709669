"""Request field types that accept exactly what the OpenAPI document says they accept.

Why: FastAPI validates bodies with pydantic in *lax* mode, which coerces ``"5"``, ``true`` and
``5.0`` into an ``int`` and ``"0.5"`` into a ``float``, while the document says ``integer`` and
``number``. A fuzzer that sends a string where the document wants a number (schemathesis's
``negative_data_rejection``) then sees it accepted, and a client with that bug is never told.
Strict mode goes too far the other way for integers: JSON Schema counts ``5.0`` as an integer,
strict pydantic refuses it. These types sit in between, exactly on JSON Schema's line.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def _json_integer(value: Any) -> Any:
    """Refuse what JSON Schema does not call an integer before pydantic's lax rules coerce it."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError("must be a JSON integer (not a string or a boolean)")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be a whole number")
    return value


def json_integer_or_null(value: Any) -> Any:
    """``_json_integer``, letting ``null`` through (for an optional integer whose bounds the
    caller writes on the integer branch)."""
    return None if value is None else _json_integer(value)


JsonInt = Annotated[int, BeforeValidator(_json_integer)]
"""An ``integer`` as JSON Schema means it: ``5`` and ``5.0``; never ``"5"`` or ``true``."""

JsonFloat = Annotated[float, Field(strict=True)]
"""A ``number``: an integer or a float; never ``"0.5"`` or ``true`` (strict floats take ints)."""
