"""Ray Serve wiring of the API: the deployment, the builder ``serve run`` calls, and the
local server behind ``qalloc serve``.

Why replicas ask for no CPU: the simulators own the cores (their runs hold Ray CPU
resources); an ingress replica mostly waits on the allocator and the store, and must not
take a core a simulator run is waiting for.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from ray_qalloc.config import Settings, load_settings

log = logging.getLogger("ray_qalloc.serving")

APP_NAME = "qalloc"


def deployment_for(settings: Settings, *, user_config: dict[str, Any] | None = None) -> Application:
    """The ingress deployment over the allocator of ``settings``, bound and ready to run
    (``user_config``: the API's live limits, by default those of ``settings.api``)."""
    from ray_qalloc.api import create_app

    api = create_app(settings)

    @serve.deployment(name="QAllocIngress", num_replicas=settings.api.replicas,
                      max_ongoing_requests=settings.api.max_ongoing_requests,
                      ray_actor_options={"num_cpus": 0, "resources": dict(settings.api.replica_resources)},
                      health_check_period_s=5, health_check_timeout_s=10,
                      user_config=user_config if user_config is not None else api_user_config(settings))
    @serve.ingress(api)
    class QAllocIngress:
        """Each replica serves the FastAPI app; its state is opened lazily in the replica."""

        def reconfigure(self, config: dict[str, Any]) -> None:
            """Serve calls this with the deployment's ``user_config`` at start and on every change:
            ``serve deploy`` of the same config with a new ``user_config`` reconfigures the running
            replicas in place; an invalid one fails the deploy and the replicas keep their limits."""
            self.app.state.limits.reconfigure(config)

    return QAllocIngress.bind()


def api_user_config(settings: Settings) -> dict[str, Any]:
    """The API's live limits as Serve's ``user_config`` (``serve/config.yaml`` may override them)."""
    from ray_qalloc.api import API_LIVE_FIELDS

    return {"api": {k: getattr(settings.api, k) for k in API_LIVE_FIELDS}}


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of ``serve run`` / ``serve deploy`` (``import_path: ray_qalloc.serving:app_builder``).

    ``args`` are Settings overrides (e.g. ``data_dir``, ``store_url``, ``pool``). The allocator
    and the backends are started here when the cluster has none yet, so one config file
    brings up the whole service."""
    from ray_qalloc.session import connect

    settings = load_settings(**(args or {}))
    connect(settings=settings)
    return deployment_for(settings)


def start(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, detached: bool = False) -> str:
    """Start Serve on this Ray (allocator and backends first) and deploy the API. Returns its URL;
    the caller decides how long to serve (``qalloc serve`` waits for Ctrl-C, then ``stop()``)."""
    from ray_qalloc.session import connect

    connect(settings=settings)
    serve.start(http_options={"host": host, "port": port}, detached=detached)
    serve.run(deployment_for(settings), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def start_listener(settings: Settings) -> Any:
    """The syslog listener of ``settings.events.syslog`` on a thread of this process, when a TCP
    or UDP port is configured (``QALLOC_EVENTS__SYSLOG__TCP_PORT`` ...); None when neither is.
    ``qalloc serve`` runs it beside the API and stops it (``.stop()``: flushes) before Serve."""
    from ray_qalloc.integration.listener import start_in_thread

    return start_in_thread(settings)


def stop() -> None:
    """Stop the API (accepted jobs stay in the store and the allocator keeps running them)."""
    try:
        serve.delete(APP_NAME)
    except Exception:  # already gone
        pass
    serve.shutdown()
