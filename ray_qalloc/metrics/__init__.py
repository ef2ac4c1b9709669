"""ray-qalloc's own metrics, exported through Ray's metrics agent to Prometheus.

    from ray_qalloc.metrics import metrics
    metrics.decision("placed")
    metrics.waited("high", "cpu-1a2b3c4d", 0.42)

* ``table.py`` — the one table of definitions (names, kinds, units, tags, buckets);
* ``tags.py`` — the bounded tag domains that fold stray values to ``"other"``;
* ``facade.py`` — :class:`Metrics`, the cheap typed calls, buffered and flushed to Ray;
* ``grafana.py`` — the dashboard, generated from the table
  (``python -m ray_qalloc.metrics.grafana --out ops/grafana/qalloc.json``).

Importing this package does not import Ray; recording is a no-op until Ray is initialised.
"""

from __future__ import annotations

from ray_qalloc.metrics.facade import ENABLED_ENV, Metrics, Sample
from ray_qalloc.metrics.table import BY_NAME, METRICS, RAY_PREFIX, MetricDef
from ray_qalloc.metrics.tags import NONE, OTHER

metrics: Metrics = Metrics()
"""This process's recorder (its flushing thread starts with the first recording)."""

__all__ = ["metrics", "Metrics", "Sample", "MetricDef", "METRICS", "BY_NAME", "RAY_PREFIX", "ENABLED_ENV",
           "NONE", "OTHER"]
