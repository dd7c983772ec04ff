"""One job of a sweep, as every launcher runs it: the run of its configuration (the job's
JSON carries it), then a record of how it ended (``<out>/.sweep/jobs/<key>.json``, copied
into the run folder as ``job.json``) for :mod:`benchmarks.status`.

    python -m benchmarks.exec.launch.job --out OUT --job JOB_JSON [--log LOG] [--launcher JSON]

A job stopped by the run folder's lock (another process is running it) writes nothing: the
holder's record is the true one. A job killed outright writes nothing either; the local
launcher then records the signal, and status reads a run folder without a live lock as
partial.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.core.lock import RunLockedError
from benchmarks.exec.records import _record
from benchmarks.exec.sweep import Job


def run_job(job: Job, out: str | Path, log: str | None = None,
            launcher: dict[str, Any] | None = None) -> int:
    """Run ``job`` in this process and record how it ended; returns the exit code (0 done,
    2 bad input or a failed run). Any other error is recorded and raised again."""
    from benchmarks.exec import runs

    started = time.time()
    logging_setup()
    try:
        runs.execute_configs([job.run_config()])
    except RunLockedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except runs.CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        _record(out, job, "failed", error=f"{type(err).__name__}: {err}", log=log,
                     launcher=launcher, started=started)
        return 2
    except Exception as err:  # recorded, then the traceback goes to the log as usual
        # (not SystemExit/KeyboardInterrupt: submitit's requeue on timeout exits through
        # SystemExit, Ctrl-C is a stop; both leave the run partial, to be resumed)
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        _record(out, job, "failed", error=last or type(err).__name__, log=log,
                     launcher=launcher, started=started)
        raise
    _record(out, job, "done", log=log, launcher=launcher, started=started)
    return 0


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def job_command(job: Job, out: str | Path, log: str | None,
                launcher: dict[str, Any]) -> list[str]:
    """The command line that runs ``job`` through :func:`run_job` in a fresh process."""
    return [sys.executable, "-m", "benchmarks.exec.launch.job", "--out", str(out),
            "--job", job.to_json(),
            "--launcher", json.dumps(launcher), *(["--log", log] if log else [])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exec.launch.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the sweep's folder of run folders")
    p.add_argument("--job", required=True, help="the job (JSON, as job_command writes it)")
    p.add_argument("--log", default=None, help="where this job's output goes (recorded)")
    p.add_argument("--launcher", default="{}", help="the launcher's settings (JSON, recorded)")
    args = p.parse_args(argv)
    job = Job.from_json(args.job)
    return run_job(job, args.out, args.log, json.loads(args.launcher))


if __name__ == "__main__":
    sys.exit(main())
