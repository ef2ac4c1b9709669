"""Pool membership changed on the running allocator: joiners serve at once, leavers retire
(no new runs; a run going on there finishes), nothing accepted is lost, a bad pool is refused
whole, and the change survives a restart. Injected executors (tests/test_allocator_unit.py's
fakes) on the real allocator; the same on real Ray and Serve is in test_liveconfig's live test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_qalloc.exceptions import ConfigError, InvalidJobSpec
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make


def test_a_backend_leaving_the_pool_finishes_its_run_then_is_forgotten(tmp_path):
    a, b = FakeBackend("a", delay=1.0), FakeBackend("b")

    async def main() -> dict[str, Any]:
        alloc = make(tmp_path, [a, b], pool=["a", "b"], hedge={"enabled": False})
        await alloc.ready()
        on_a = await alloc.submit(prepared(backends=("a",)))
        for _ in range(200):
            if (await alloc.status(on_a["id"]))["state"] == "running":
                break
            await asyncio.sleep(0.01)
        out = await alloc.set_config({"pool": ["b"]}, actor="ops")
        retiring_now = set(alloc.d.retiring)
        still_member = "a" in alloc.fleet.members
        later = [await alloc.submit(prepared()) for _ in range(3)]
        done_a = await alloc.wait(on_a["id"], timeout=10)
        done_later = [await alloc.wait(j["id"], timeout=10) for j in later]
        for _ in range(100):          # the health loop forgets it once its run has ended
            if "a" not in alloc.fleet.members:
                break
            await asyncio.sleep(0.02)
        gone = "a" not in alloc.fleet.members and "a" not in alloc.sched.backends
        with pytest.raises(InvalidJobSpec, match="unknown backend"):   # as for any name it never had
            await alloc.submit(prepared(backends=("a",)))
        with pytest.raises(ConfigError) as bad:
            await alloc.set_config({"pool": ["b", "qpu_nonexistent_device"]}, actor="ops")
        return {"out": out, "retiring_now": retiring_now, "still_member": still_member, "done_a": done_a,
                "done_later": done_later, "gone": gone, "bad": bad.value, "settings": alloc.settings,
                "audit": await alloc.audit("config")}

    r = asyncio.run(asyncio.wait_for(main(), 60))
    assert r["out"]["changed"]["pool"] == {"old": ["a", "b"], "new": ["b"]}
    assert r["retiring_now"] == {"a"} and r["still_member"]          # retiring, not dropped under its run
    assert r["done_a"]["state"] == "completed" and r["done_a"]["result"]["backend"] == "a"
    assert [d["result"]["backend"] for d in r["done_later"]] == ["b", "b", "b"]   # no new run on a
    assert r["gone"]
    assert r["bad"].field == "pool" and "qpu_nonexistent_device" in str(r["bad"])
    assert r["settings"].pool == ["b"]                                # the refused change applied nothing
    assert [row["action"] for row in r["audit"]] == ["config.set"]

    async def again() -> tuple[Any, ...]:
        alloc = make(tmp_path, [FakeBackend("a"), FakeBackend("b")], pool=["a", "b"])
        await alloc.ready()
        await asyncio.sleep(0.2)
        return set(alloc.fleet.members), set(alloc.sched.backends), (await alloc.config())["overrides"]

    members, scheduled, overrides = asyncio.run(asyncio.wait_for(again(), 30))
    assert members == scheduled == {"b"}          # the stored membership, not the start-up one
    assert overrides == {"pool": ["b"]}
