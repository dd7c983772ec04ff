"""`python -m benchmarks.status`: Where a sweep stands, from its run folders alone."""
# Thin entry module (issue 23): the code lives in `benchmarks.exec.status`.
import sys

from benchmarks.exec.status import main

if __name__ == "__main__":
    sys.exit(main())
