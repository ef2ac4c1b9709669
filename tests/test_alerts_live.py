"""Alerts from the allocator's own observations to a real webhook receiver: a backend that stops
answering fires once and resolves once, a missed deadline counts, and a restarted allocator
does not announce what it announced before (the outbox is in the job store's database)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray_qalloc.allocator import Allocator
from ray_qalloc.config import load_settings
from tests.helpers import prepared
from tests.test_alert_outbox import SECRET, Receiver, receiver  # noqa: F401 - the fixture
from tests.test_allocator_unit import FakeBackend, sim


def alert_settings(url: str) -> dict[str, Any]:
    return {"interval_s": 3600.0,   # the test drives rounds with ops_tick
            "rules": [{"name": "down", "kind": "backend_down", "severity": "error"},
                      {"name": "misses", "kind": "deadline_miss_rate",
                       "params": {"threshold": 0.5, "min_samples": 1, "window_s": 600}}],
            "sinks": {"hook": {"type": "webhook", "url": url, "secret": SECRET}},
            "retry": {"base_s": 0.05, "max_s": 0.2}}


def make(tmp_path, fakes: list[FakeBackend], url: str) -> Allocator:
    cfg = load_settings(data_dir=tmp_path, health_interval_s=0.05, history_flush_s=60.0, alerts=alert_settings(url))
    members = {f.name: (sim(f.name), f) for f in fakes}
    return Allocator(cfg, members=members, node_cpus={f"backend:{f.name}": 2.0 for f in fakes})


async def until(cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_a_backend_that_stops_answering_fires_and_resolves_once(tmp_path, receiver):
    receiver.up()
    flaky, steady = FakeBackend("flaky"), FakeBackend("steady")
    answering = flaky._ping

    async def refuse() -> dict[str, Any]:
        raise TimeoutError("no answer")

    async def main() -> tuple[Any, ...]:
        alloc = make(tmp_path, [flaky, steady], receiver.url)
        await alloc.ready()
        await alloc.ops_tick()
        assert receiver.requests == []                  # everything up: nothing to say
        flaky.ping.fn = refuse
        await until(lambda: not alloc.fleet.hosts["flaky"].healthy)
        await alloc.ops_tick()
        await alloc.ops_tick()                          # still down: not announced again
        await until(lambda: len(receiver.unique()) >= 1)
        flaky.ping.fn = answering
        await until(lambda: alloc.fleet.hosts["flaky"].healthy)
        await alloc.ops_tick()
        await until(lambda: len(receiver.unique()) >= 2)
        # the sender records a delivery once the receiver has answered: a moment after it got it
        for _ in range(100):
            view = await alloc.alerts_view()
            if view["sinks"]["hook"]["delivered"] >= 2:
                break
            await asyncio.sleep(0.05)
        alloc.alerts.close()
        return view

    view = asyncio.run(asyncio.wait_for(main(), 60))
    events = [(e["rule"], e["status"], e["labels"].get("backend")) for e in receiver.unique()]
    assert events == [("down", "firing", "flaky"), ("down", "resolved", "flaky")], events
    assert receiver.bad_signatures == 0
    assert view["firing"] == [] and view["sinks"]["hook"]["delivered"] == 2


def test_a_missed_deadline_alerts_and_a_restart_does_not_repeat_it(tmp_path, receiver):
    receiver.up()
    slow = FakeBackend("slow", delay=0.3)

    async def first() -> None:
        alloc = make(tmp_path, [slow], receiver.url)
        await alloc.ready()
        rec = await alloc.submit(prepared(deadline_s=0.05))
        done = await alloc.wait(rec["id"], timeout=30)
        assert done["state"] == "completed"
        await alloc.ops_tick()
        await until(lambda: len(receiver.unique()) >= 1)
        alloc.alerts.close()

    async def restarted() -> dict[str, Any]:
        alloc = make(tmp_path, [slow], receiver.url)   # same database: the outbox remembers
        await alloc.ready()
        view = await alloc.alerts_view()
        await alloc.ops_tick()                         # no outcomes in its memory: unknown, not clear
        await asyncio.sleep(0.5)
        alloc.alerts.close()
        return view

    asyncio.run(asyncio.wait_for(first(), 60))
    view = asyncio.run(asyncio.wait_for(restarted(), 60))
    events = [(e["rule"], e["status"]) for e in receiver.unique()]
    assert events == [("misses", "firing")], events
    assert [a["rule"] for a in view["firing"]] == ["misses"]
