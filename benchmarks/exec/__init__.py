"""Layer 6, exec: the run CLI, the sweep plan, launchers, status, prefetch."""
