"""Baselines on the suite's method contract (:mod:`benchmarks.methods.contract`), one module
each."""
