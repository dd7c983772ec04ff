"""`python -m benchmarks.run`: Command line: run methods on a benchmark, resumably, and
summarise."""
# Thin entry module (issue 23): the code lives in `benchmarks.exec.run`.
import sys

from benchmarks.exec.run import main

if __name__ == "__main__":
    sys.exit(main())
