"""Layer 5, engine: one run (harness, training loop, loss monitor, checkpoints)."""
