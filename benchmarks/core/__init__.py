"""Layer 1, core: registries, protocols and their default seeds, the run store, results rows,
seeding, locks, device policy. Imports nothing of the suite above it."""
