"""`python -m benchmarks.check_method SPEC [--quick]`: does a method keep the suite's contract
(state only through the store, memory formula, exact resume, sync-free step, settings)?"""
# Thin entry module (issue 23): the code lives in `benchmarks.perf.conformance`.
import sys

from benchmarks.perf.conformance import main

if __name__ == "__main__":
    sys.exit(main())
