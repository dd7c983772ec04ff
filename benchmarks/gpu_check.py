"""`python -m benchmarks.gpu_check`: GPU acceptance check (issue 13): one command for anyone
with a CUDA GPU."""
# Thin entry module (issue 23): the code lives in `benchmarks.perf.gpu_check`.
import sys

from benchmarks.perf.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
