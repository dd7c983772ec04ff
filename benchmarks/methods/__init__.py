"""Layer 4, methods: the Method contract, the method table, the NWS adapter and the helpers
every method shares (the four baselines live in the top-level `baselines/`, same layer)."""
