"""Cost model: runtime and fidelity predictions per (job, backend)."""
