"""Placement: pure Python over value objects (no Ray, no Qiskit)."""

from ray_qalloc.placement.filters import DEFAULT_FILTERS
from ray_qalloc.placement.model import BackendView, Estimate, JobView, LiveState, Plan, Status
from ray_qalloc.placement.pipeline import Choice, explain, plan, select

__all__ = ["BackendView", "Choice", "DEFAULT_FILTERS", "Estimate", "JobView", "LiveState", "Plan", "Status",
           "explain", "plan", "select"]
