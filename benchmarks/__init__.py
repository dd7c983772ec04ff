"""The suite: data sets and task splits, architectures, protocols, the shared harness, the CLI.

Its packages are layers, and a module imports only its own layer and those below it
(`tests/test_layers.py` holds the rule, and that nothing in `nws/` imports the suite):
"""

# Low -> high. `benchmarks` itself: the thin entry modules (`python -m benchmarks.run`, ...).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("nws",),  # the NWS library: knows nothing of the suite
    ("benchmarks.core",),  # registries, protocols, stores, results, seeding, locks, devices
    ("benchmarks.data",),  # benchmarks and their task splits
    ("benchmarks.models",),  # architectures and pretrained weights
    ("benchmarks.methods", "baselines"),  # the method contract, the methods
    ("analysis",),  # tables and figures from stored runs
    ("benchmarks.engine",),  # one run: harness, training loop, checkpoints
    ("benchmarks.exec",),  # the run CLI, the sweep plan, launchers, status, prefetch
    ("benchmarks.perf",),  # measuring tools
    ("benchmarks",),  # entry modules
    # the sweep's one-page report shows its status (benchmarks.exec.status): above exec
    ("analysis.report",),
)
