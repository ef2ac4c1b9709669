"""The allocator's security side: threat actions (``threatdesk.py``), the rules that take them
on security events (``threatrules.py``), job templates, and predictive scaling
(``predictive.py``).

Why a mixin of its own: these are one concern — allocation steered by what the security team
sees and by forecast demand — reached through the same allocator actor (one Ray actor, one
event loop, one store thread), but apart from the job path that ``allocator.py`` holds. The
methods use the allocator's parts (``self.d``, ``self.threat``, ``self.store``, ``self.settings``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("ray_qalloc.allocator")


class ThreatOps:
    """Mixed into ``Allocator``."""

    d: Any
    threat: Any
    store: Any
    settings: Any
    fleet: Any
    scaling: Any
    rule_engine: Any
    _scaling_since: float

    _wait_ready: Any          # Allocator's: waits until the allocator serves
    # ==== threat-driven actions (threatdesk.py): rules and SOAR playbooks ======================
    async def threat_actions(self) -> dict[str, Any]:
        await self._wait_ready()
        return self.threat.view()

    async def threat_add(self, raw: dict[str, Any], actor: str = "admin") -> dict[str, Any]:
        """Take a timed action (boost, reserve, pause): validated, committed (audited), applied.
        Idempotent by its id."""
        from ray_qalloc.threatdesk import parse_action

        await self._wait_ready()
        now = time.time()
        act, created, new = self.threat.prepare_add(parse_action(raw), now)
        if new is not None:
            await self.d.db(self.threat.commit, new, actor, f"{act.kind} {act.id}", act.reason)
            self.threat.apply(time.time())
        return {"action": act.model_dump(), "created": created}

    async def threat_remove(self, action_id: str, actor: str = "admin") -> bool:
        """End an action now (resume a tenant, lift a boost or a reservation)."""
        await self._wait_ready()
        if action_id not in self.threat.actions:
            return False
        await self.d.db(self.threat.commit, self.threat.without([action_id]), actor, f"remove {action_id}", "removed")
        self.threat.apply(time.time())
        return True

    async def threat_submit_template(self, name: str, tenant: str, key: str) -> list[dict[str, Any]]:
        """Submit a registered job template (threat.templates) for ``tenant``; ``key`` makes it
        idempotent (job i gets the idempotency key ``<key>/<i>``): a retried playbook or a rule
        firing again on one event submits nothing twice."""
        from ray_qalloc.exceptions import InvalidRequest
        from ray_qalloc.jobs import make_spec, prepare_job

        await self._wait_ready()
        template = self.settings.threat.templates.get(name)
        if template is None:
            raise InvalidRequest(f"no job template named {name!r}.", field="name",
                                 fix=f"use one of {', '.join(sorted(self.settings.threat.templates)) or '(none defined)'}; "
                                     "templates live in threat.templates (qalloc config set).")
        out = []
        for i, j in enumerate(template.jobs):
            spec = make_spec(circuit=j.qasm, shots=j.shots, priority=j.priority, intent=j.intent, tenant=tenant,
                             idempotency_key=f"{key}/{i}"[:200], backends=tuple(j.backends) if j.backends else None)
            out.append(await self.d.submit(prepare_job(spec, self.settings.limits)))
        return out

    async def _threat_loop(self) -> None:
        """Judge new security events against the threat rules; act on what fires."""
        from ray_qalloc.threatrules import RuleEngine

        engine: RuleEngine | None = None
        while True:
            settings = self.settings.threat
            await asyncio.sleep(settings.poll_s)
            try:
                if not any(r.enabled for r in settings.rules):
                    continue
                if engine is None:
                    engine = await self.d.db(RuleEngine, self.store.engine)
                    self.rule_engine = engine
                for fire in await self.d.db(engine.read, settings):
                    await self._act_on(fire)
            except Exception:  # never let the loop die; the next poll reads again
                log.exception("threat rules pass failed")

    async def _act_on(self, fire: Any) -> None:
        actor = f"rule:{fire.rule.name}"
        try:
            raw = fire.action()
            if raw is None:
                await self.threat_submit_template(fire.rule.action.template, fire.subject,
                                                  f"rule:{fire.rule.name}:{fire.event_id}")
            elif raw["id"] not in self.threat.actions:      # in force already: nothing to do
                await self.threat_add(raw, actor=actor)
        except Exception as exc:  # a rule that cannot act (bad target, spent quota) must not stop the others
            log.warning("threat rule %s could not act on event %s: %s", fire.rule.name, fire.event_id, exc)

    # ==== predictive scaling (predictive.py) ====================================================
    async def _seed_scaling(self) -> None:
        """The forecasters learn from the stored history of jobs (per demand class) and security events."""
        from ray_qalloc.predictive_live import seed_by_class

        await seed_by_class(self, time.time())

    async def _scaling_tick(self, now: float) -> None:
        """One forecast and decision per demand class: nodes asked for ahead of predicted demand
        in each pool's shape, and timed reservations on a QPU class ahead of its surge."""
        from ray_qalloc.predictive_live import scaling_tick

        await scaling_tick(self, now)

    async def _expire_threat_actions(self, now: float) -> None:
        gone = self.threat.due(now)
        if gone:
            await self.d.db(self.threat.commit, self.threat.without(gone), "qalloc", "expire " + ", ".join(gone),
                            "time is up")
            self.threat.apply(now)
