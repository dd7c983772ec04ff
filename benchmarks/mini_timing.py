"""`python -m benchmarks.mini_timing`: How long the quick start's first command takes here, as a
figure (issue 17)."""
# Thin entry module (issue 23): the code lives in `benchmarks.perf.mini_timing`.
import sys

from benchmarks.perf.mini_timing import main

if __name__ == "__main__":
    sys.exit(main())
