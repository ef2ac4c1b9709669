"""The change stream: ``GET /v1/stream`` (Server-Sent Events) and ``GET /v1/changes`` (the same
feed, paged, for tools that poll).

Why SSE: SIEM/SOAR tools and dashboards hold the same state as the allocator by following its
changes; SSE is plain HTTP (proxies, Serve and curl handle it), and its ``Last-Event-ID`` is
exactly the resume point ``changefeed.Cursor`` gives. Each event's ``id`` is the position after
it, so a reader that reconnects with the last id it saw continues with the next change: no gap,
no duplicate (``changefeed.py`` says why that holds).

The route reads the durable tables, never the allocator: a stream keeps going while the
allocator restarts, and any replica can serve any reader.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Header, Query
from fastapi.responses import StreamingResponse

from ray_qalloc.changefeed import ChangeFeed, Cursor

POLL_S = 0.25               # how often a stream looks for new changes
HEARTBEAT_S = 15.0          # a comment line this often keeps proxies from closing an idle stream
RETRY_MS = 2_000            # what the browser's EventSource waits before reconnecting
MAX_PER_READ = 500

# What the routes read, said in the document: `now`, `start`, or a position as the stream writes
# it (sources in the order j, b, a, c, each at most once). A schema-valid position is read; any
# other is refused before the route runs (a source named twice can be said no other way).
# Not on `Last-Event-ID`: a browser's EventSource sends it by itself, and Cursor.parse refuses a
# bad one naming the header and how to fix it (the stream is endless, so no fuzzer drives it).
_N = "[0-9]{1,18}"
POSITION_PATTERN = (f"^(now|start|j:{_N}(,b:{_N})?(,a:{_N})?(,c:{_N})?|b:{_N}(,a:{_N})?(,c:{_N})?"
                    f"|a:{_N}(,c:{_N})?|c:{_N})?$")
_POSITION = ("Where to start: the `id` of the last event received (resumes right after it), `now` (the "
             "default: only changes from now on) or `start` (everything still kept).")


def add_stream_routes(app: FastAPI, feed: Callable[[], ChangeFeed], caller: Callable[..., Any],
                      responses: dict[int | str, Any]) -> None:
    """``feed()`` gives the replica's ChangeFeed (opened lazily); ``caller`` is the auth
    dependency (a principal with ``tenant`` and ``admin``)."""

    def start(position: str | None) -> Cursor:
        if position is None or position.strip() in ("", "now"):
            return feed().head()
        if position.strip() == "start":
            return Cursor()
        return Cursor.parse(position)

    @app.get("/v1/changes", tags=["stream"], responses=responses)
    async def changes(after: str | None = Query(None, max_length=120, pattern=POSITION_PATTERN,
                                                description=_POSITION),
                      limit: int = Query(100, ge=1, le=MAX_PER_READ),
                      p: Any = Depends(caller)) -> dict[str, Any]:
        """Changes after a position, oldest first: jobs (this tenant's; every tenant's for an
        admin), backends, and for admins alerts and configuration changes. Pass `next` back as
        `after` to read on."""
        cursor = await asyncio.to_thread(start, after)
        out, nxt = await asyncio.to_thread(feed().read, cursor, tenant=p.tenant, admin=p.admin, limit=limit)
        return {"changes": [c.to_dict() for c in out], "next": str(nxt)}

    @app.get("/v1/stream", tags=["stream"], responses={**responses, 200: {
        "description": "`text/event-stream`: one event per change (`event:` job | backend | alert | config, "
                       "`id:` the position after it, `data:` JSON).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
        response_class=StreamingResponse)
    async def stream(last_event_id: str | None = Header(None, max_length=120, description=_POSITION),
                     start_at: str | None = Query(None, alias="from", max_length=120, pattern=POSITION_PATTERN,
                                                  description=_POSITION),
                     p: Any = Depends(caller)) -> StreamingResponse:
        """Follow every change as it is committed (Server-Sent Events). Reconnect with the
        `Last-Event-ID` header (browsers' EventSource does it by itself) to resume without a gap."""
        cursor = await asyncio.to_thread(start, last_event_id if last_event_id is not None else start_at)
        return StreamingResponse(_events(feed(), cursor, p.tenant, p.admin), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _events(feed: ChangeFeed, cursor: Cursor, tenant: str, admin: bool) -> AsyncIterator[bytes]:
    yield f"retry: {RETRY_MS}\n: position {cursor}\n\n".encode()
    quiet_since = time.monotonic()
    while True:
        out, cursor = await asyncio.to_thread(feed.read, cursor, tenant=tenant, admin=admin, limit=MAX_PER_READ)
        if out:
            yield "".join(f"id: {c.cursor}\nevent: {c.kind}\ndata: {json.dumps(c.to_dict(), separators=(',', ':'))}\n\n"
                          for c in out).encode()
            quiet_since = time.monotonic()
            if len(out) == MAX_PER_READ:
                continue              # more waiting: read on at once
        elif time.monotonic() - quiet_since >= HEARTBEAT_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL_S)
