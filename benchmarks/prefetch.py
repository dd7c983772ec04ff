"""`python -m benchmarks.prefetch`: Fetch and build everything a sweep needs before its jobs
start (e.g. on a login node with."""
# Thin entry module (issue 23): the code lives in `benchmarks.exec.prefetch`.
import sys

from benchmarks.exec.prefetch import main

if __name__ == "__main__":
    sys.exit(main())
