"""Static files of the operators' dashboard (``/dashboard``); see ``ray_qalloc.dashboard``."""
