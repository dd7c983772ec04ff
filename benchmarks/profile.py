"""`python -m benchmarks.profile`: Aten ops and host-sync-prone ops per steady-state training
step, per method."""
# Thin entry module (issue 23): the code lives in `benchmarks.perf.profile`.
import sys

from benchmarks.perf.profile import main

if __name__ == "__main__":
    sys.exit(main())
