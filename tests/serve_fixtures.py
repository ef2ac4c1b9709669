"""A real Ray Serve running the API on the session's Ray (one per test session)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterator

import pytest

BELL = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
        "measure q -> c;\n")


@dataclass
class Server:
    url: str
    tenants: object   # ray_qalloc.tenants.TenantStore
    settings: object

    def token(self, tenant: str, admin: bool = False) -> str:
        return self.tenants.create_token(tenant, admin=admin)

    def headers(self, tenant: str, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(tenant, admin)}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(qa) -> Iterator[Server]:
    from ray_qalloc import serving
    from ray_qalloc.tenants import TenantStore

    url = serving.start(qa.settings, host="127.0.0.1", port=free_port())
    tenants = TenantStore(qa.settings.resolved_store_url)
    yield Server(url, tenants, qa.settings)
    serving.stop()
    tenants.close()
