"""Security events in: CEF, LEEF, syslog, OCSF and STIX 2.1 → one OCSF-aligned ``SecurityEvent``.

``parse_records(payload, content_type)`` (``detect``) is the entry point for a batch; each
format also has its own pure parser (``parse_cef``, ``parse_leef``, ``parse_syslog``,
``parse_ocsf``, ``parse_stix``). Every malformed record gives ``InvalidEvent`` naming the field.
STIX needs the optional ``siem`` extra (``pip install 'ray-qalloc[siem]'``), imported only
when a STIX record is parsed.
"""

from __future__ import annotations

from ray_qalloc.integration.cef import parse_cef
from ray_qalloc.integration.detect import (CONTENT_TYPES, IntakeLimits, RecordError,
                                           parse_records)
from ray_qalloc.integration.events import (Observable, ObservableType, Product, SecurityEvent,
                                           SeverityId, SyslogInfo)
from ray_qalloc.integration.leef import parse_leef
from ray_qalloc.integration.ocsf import parse_ocsf
from ray_qalloc.integration.stix import parse_stix
from ray_qalloc.integration.syslog import parse_syslog

__all__ = ["CONTENT_TYPES", "IntakeLimits", "Observable", "ObservableType", "Product",
           "RecordError", "SecurityEvent", "SeverityId", "SyslogInfo", "parse_cef", "parse_leef",
           "parse_ocsf", "parse_records", "parse_stix", "parse_syslog"]
