"""The syslog sink with ``format: cef`` / ``ocsf`` against a real rsyslogd (tests/rsyslog.py).

What is asserted is what rsyslog wrote, parsed back: the RFC 5424 line keeps its structured
data as with the default format, and its MSG is a CEF line (read by the CEF reader of
``test_siem_out``) or an OCSF Detection Finding that parses as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ray_qalloc.alerts import SyslogConfig, SyslogSink

pytest.register_assert_rewrite("tests.rsyslog")   # imported here before pytest loads it as a plugin
from tests.rsyslog import Rsyslog  # noqa: E402
from tests.test_siem_out import event, read_cef  # noqa: E402

pytest_plugins = ["tests.rsyslog"]


def sink(server: Rsyslog, transport: str, **cfg: Any) -> SyslogSink:
    port = server.tcp_port if transport == "tcp" else server.udp_port
    return SyslogSink("syslog", SyslogConfig(host="127.0.0.1", port=port, transport=transport,
                                             hostname="qalloc-head", **cfg))


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rsyslog_receives_a_parseable_cef_message(rsyslog: Rsyslog, transport: str) -> None:
    s = sink(rsyslog, transport, format="cef", facility="local4")
    labels = {"backend": "ibm_fez", "tenant": "acme", "team": 'q"uo]te=x|y'}
    summary = f"backend ibm_fez down for 30 s | a=b \\ über {transport}"
    try:
        s.send(event(key=f"cef-{transport}", labels=labels, summary=summary, severity="critical"))
    finally:
        s.close()
    [m] = rsyslog.wait_for(lambda m: m.sd.get("alert@32473", {}).get("key") == f"cef-{transport}")
    assert (m.facility, m.severity, m.msgid) == (20, 2, "alert-firing")
    assert m.sd["labels@32473"] == labels                             # structured data as before
    header, ext = read_cef(m.msg)
    assert header[:4] == ["ray-qalloc", "ray-qalloc", "0.1.0", "mem"] and header[5] == "10"
    assert (ext["msg"], ext["externalId"], ext["cs3"], ext["dvchost"]) == (
        summary, f"cef-{transport}", "ibm_fez", "qalloc-head")
    assert json.loads(ext["cs6"]) == labels


def test_rsyslog_receives_an_ocsf_finding_over_tcp(rsyslog: Rsyslog) -> None:
    s = sink(rsyslog, "tcp", format="ocsf")
    try:
        s.send(event(key="ocsf-tcp", status="resolved", labels={"node": "n1"}))
    finally:
        s.close()
    [m] = rsyslog.wait_for(lambda m: m.sd.get("alert@32473", {}).get("key") == "ocsf-tcp")
    rec = json.loads(m.msg)
    assert (rec["class_uid"], rec["activity_id"], rec["type_uid"]) == (2004, 3, 200403)
    assert rec["metadata"]["uid"] == "ocsf-tcp" and rec["finding_info"]["title"] == "mem on node n1"
