"""One run's configuration: every run option with its command-line flag, its valid range and
where its default comes from, in one place.

Everything else derives from the fields of :class:`RunConfig`:

- the run flags of ``python -m benchmarks.run`` (:func:`add_run_arguments`), also parsed by
  ``benchmarks.status`` and ``benchmarks.prefetch``;
- the values a command line gives each field (:func:`cli_values`), from which the sweep plan
  (:func:`benchmarks.exec.runs.run_configs`) makes one configuration per (method, seed);
- a job of a sweep, which carries its configuration as data (:meth:`RunConfig.to_dict` /
  :meth:`RunConfig.from_dict`, JSON), never as a rebuilt command line;
- the one-run command line a job stands for (:meth:`RunConfig.to_argv`), shown by
  ``--dry-run``, logs and job records.

Adding a run option is adding one field here (and using it where it acts); a test
(``tests/engine/test_run_config.py``) holds every field to a flag, a source and a round trip.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from benchmarks.core.checks import Range, flag_type
from benchmarks.core.device_policy import SEARCH_PATHS
from benchmarks.engine.checkpoints import DEFAULT_CHECKPOINT_EVERY

RUN_FLAGS = "run"  # title of the parser group whose flags each job of a sweep gets

# Valid ranges of the count flags (benchmarks.core.checks).
SEED = Range(0, 2**63 - 1, "a seed names its run (s<seed>) and derives 63-bit stream seeds",
             integer=True)
TASKS = Range(1, None, "a run learns at least one task", integer=True)
WORKERS = Range(0, 256, "data-loader processes: 0 loads in this process; each one more is "
                "a process with its own copy of the data set", integer=True)
THREADS = Range(1, 1024, "torch/OpenMP threads: at least one; torch takes any count and a "
                "huge one fails later, in its thread pool: 1024 is past any one machine's "
                "cores", integer=True)

# How a field is written on the command line.
VALUE, SWITCH, NEGATED, PAIRS, REPEATED, COMMA_LIST, SPACE_LIST = (
    "value", "switch", "negated", "pairs", "repeated", "comma-list", "space-list")


@dataclass(frozen=True)
class Flag:
    """A run option's command-line form and the source of its default.

    ``form``: VALUE (``--x V``), SWITCH (``--x`` sets True), NEGATED (``--no-x`` sets False),
    PAIRS (``--x K=V`` repeated, a dict), REPEATED (``--x V`` repeated, a list),
    COMMA_LIST / SPACE_LIST (the plan's axes: ``--method a,b``, ``--seeds 1 2``; one run per
    item, the field holds one item)."""

    name: str
    help: str
    source: str
    form: str = VALUE
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    dest: str | None = None  # the parsed value's name, where it is not the field's
    # Settings of the process that runs the run (threads, kernel folder), not of the run:
    # applied by benchmarks.exec.runs.apply_process_settings.
    process: bool = False


def option(default: Any, flag: Flag) -> Any:
    """A :class:`RunConfig` field: its default (``MISSING``: required) and its
    :class:`Flag`."""
    if default is MISSING:
        return field(metadata={"flag": flag})
    if isinstance(default, (dict, list)):
        return field(default_factory=type(default), metadata={"flag": flag})
    return field(default=default, metadata={"flag": flag})


@dataclass
class RunConfig:
    """One (method, seed) run: what the harness (:func:`benchmarks.engine.harness.run`)
    needs, every field a command-line flag (:class:`Flag`). Which fields make the run's
    identity is the harness's rule (docs/reproducibility.md, Run identity)."""

    method: str = option(MISSING, Flag(
        "--method", "comma-separated method names or specs (pkg.module:Class), or 'all' "
        "(the paper's five)", "required: one run per method", COMMA_LIST))
    benchmark: str = option("split_digits", Flag(
        "--benchmark", "task sequence (see --list)",
        "suite default: the offline mini benchmark"))
    arch: str = option("resnet18", Flag(
        "--arch", "architecture (see --list)", "paper: ResNet-18 (docs/reference.md §2)"))
    protocol: str = option("quick", Flag(
        "--protocol", "training protocol (see --list)",
        "suite default: the short offline schedule"))
    seed: int = option(1993, Flag(
        "--seeds", "default: 1993 1994 1995 for paper protocols, else 1993",
        "benchmarks.core.protocols.default_seeds", SPACE_LIST, flag_type(int, SEED),
        dest="seeds"))
    num_tasks: int | None = option(None, Flag(
        "--tasks", "learn only the first N tasks", "default: every task of the benchmark",
        type=flag_type(int, TASKS)))
    data_root: str | None = option(None, Flag(
        "--data-root", "data folder (default $NWS_DATA_ROOT or ~/.cache/nws_bench/data)",
        "benchmarks.data.default_data_root"))
    out: str = option("results/runs", Flag(
        "--out", "folder of run folders", "suite default"))
    pretrained: str | None = option(None, Flag(
        "--pretrained", "imagenet | none | PATH (default: the benchmark's; imagenet for "
        "paper benchmarks, none for split_digits and synthetic); --weights PATH is the same",
        "the benchmark's default_pretrained"))
    device: str = option("auto", Flag(
        "--device", "auto | cpu | cuda | cuda:N", "benchmarks.core.device_policy"))
    deterministic: bool = option(False, Flag(
        "--deterministic", "deterministic kernels: bit-exact reruns and resumes on CPU",
        "suite default: off (faster)", SWITCH))
    num_workers: int = option(0, Flag(
        "--workers", "data-loader worker processes", "suite default: load in the run's process",
        type=flag_type(int, WORKERS)))
    method_options: dict[str, Any] = option({}, Flag(
        "--opt", "method option, e.g. --opt beta=0.3 (see --list); a key goes to the planned "
        "methods that take it", "each method's SETTINGS (their sources: --list)", PAIRS,
        metavar="KEY=VALUE"))
    protocol_overrides: dict[str, Any] = option({}, Flag(
        "--set", "protocol override, e.g. --set epochs=10 --set lr=0.05",
        "the protocol's fields (their sources: --list)", PAIRS, metavar="KEY=VALUE"))
    benchmark_options: dict[str, Any] = option({}, Flag(
        "--bench-opt", "benchmark option, e.g. --bench-opt download=false",
        "the benchmark builder's keyword defaults", PAIRS, metavar="KEY=VALUE"))
    progress: bool = option(True, Flag(
        "--no-progress", "no progress bars (also off when the output is not a terminal: one "
        "log line per epoch instead)", "on at a terminal; a job's output is a log: off",
        NEGATED))
    # torch.compile of the training step (DevicePolicy decides the mode); not part of the
    # run's identity: the same numerics up to floating-point reordering.
    compile: bool = option(False, Flag(
        "--compile", "torch.compile the training step (CUDA graphs on CUDA); off by default "
        "until measured on a GPU (docs/performance.md)", "suite default: off", SWITCH))
    # Part of the identity of methods listing it in ``policy_fields`` (NWS): the paths can
    # differ on float32 near ties, so a resume under the other path is refused.
    search: str | None = option(None, Flag(
        "--search", "NWS search path (default: certificates on CPU, full elsewhere; "
        "$NWS_SEARCH); they differ only on float32 near ties, and a run keeps the path it "
        "started with", "benchmarks.core.device_policy.DevicePolicy", choices=SEARCH_PATHS))
    # Not part of the run's identity: it never changes results.
    checkpoint_every: str = option(DEFAULT_CHECKPOINT_EVERY, Flag(
        "--checkpoint-every", "phase checkpoint every N epochs (e.g. 5) or minutes (e.g. 10m, "
        "also 90s, 2h); the last epoch of a phase always",
        "benchmarks.engine.checkpoints.DEFAULT_CHECKPOINT_EVERY", metavar="N|Nm"))
    checkpoint_dir: str | None = option(None, Flag(
        "--checkpoint-dir", "phase checkpoints under DIR/<run id>/ (e.g. node-local "
        "scratch)", "default: the run folder's checkpoints/", metavar="DIR"))
    # Not part of the run's identity: they only watch.
    loggers: list[str] = option([], Flag(
        "--logger", "experiment tracker, repeatable: csv (always on: epochs.csv, rows.csv), "
        "tensorboard, wandb (offline unless WANDB_API_KEY is set); the last two need pip "
        "install 'nws-bench[track]'. Not part of the run's identity",
        "suite default: csv only", REPEATED, metavar="NAME"))
    threads: int | None = option(None, Flag(
        "--threads", "torch and OpenMP threads of this run (default: torch's choice; the "
        "local launcher divides the cores among its jobs)", "torch's default",
        type=flag_type(int, THREADS), process=True))
    kernels_dir: str | None = option(None, Flag(
        "--kernels-dir", "build/cache folder of the NWS CPU kernels (default "
        "$NWS_KERNELS_DIR, else $TORCH_EXTENSIONS_DIR, else torch's cache)",
        "nws.cpu_kernels", process=True))

    # -- as data ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The configuration ``to_dict`` wrote; ``ValueError`` naming an unknown field (a
        job written by another version of the suite)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"run configuration has unknown field(s) {unknown}: it was "
                             f"written by another version of the suite; plan it again")
        return cls(**data)

    # -- as a command line --------------------------------------------------------------
    def to_argv(self) -> list[str]:
        """The ``benchmarks.run`` flags that make exactly this run (its method and seed as
        one-item plan axes; every other field only where it differs from its default)."""
        axes: list[str] = []
        out: list[str] = []
        for f in fields(self):
            flag, value = f.metadata["flag"], getattr(self, f.name)
            if flag.form in (COMMA_LIST, SPACE_LIST):
                axes += [flag.name, str(value)]
            elif value != _default(f):
                out += _argv_of(flag, value)
        return axes + out

    def sources(self) -> dict[str, str]:
        """Per field, where its value comes from, as far as the configuration itself can
        tell (recorded in ``config.json``): its default's source when it holds the default,
        else ``not the default`` (a flag, the launcher, e.g. ``threads`` and ``progress`` of
        a job, or no terminal for ``progress``; a flag given with the default's value reads
        as the default)."""
        return {f.name: f.metadata["flag"].source if getattr(self, f.name) == _default(f)
                else "not the default" for f in fields(self)}


def run_flags() -> list[tuple[str, Flag]]:
    """(field name, flag) of every run option, in declaration order."""
    return [(f.name, f.metadata["flag"]) for f in fields(RunConfig)]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the run flags to ``p`` as group :data:`RUN_FLAGS` (plus ``--weights``, the same
    as ``--pretrained PATH``)."""
    r = p.add_argument_group(RUN_FLAGS, "what to run (every job of a sweep gets these)")
    for name, flag in run_flags():
        default = _default(next(f for f in fields(RunConfig) if f.name == name))
        kwargs: dict[str, Any] = {"dest": flag.dest or name, "help": flag.help}
        if flag.form == SWITCH:
            kwargs |= {"action": "store_true"}
        elif flag.form == NEGATED:
            kwargs |= {"action": "store_false"}
        elif flag.form in (PAIRS, REPEATED):
            kwargs |= {"action": "append", "default": [], "metavar": flag.metavar}
        elif flag.form == SPACE_LIST:
            kwargs |= {"nargs": "+", "type": flag.type, "default": None}
        else:
            kwargs |= {"default": "all" if flag.form == COMMA_LIST else default,
                       "type": flag.type, "choices": flag.choices, "metavar": flag.metavar}
        r.add_argument(flag.name, **{k: v for k, v in kwargs.items() if v is not None
                                     or k == "default"})
    r.add_argument("--weights", default=None, help="state-dict file (same as --pretrained PATH)")


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """Each non-plan field's value as parsed from the command line: ``KEY=VALUE`` pairs as
    dicts (values read as Python literals, else text), ``--weights`` for ``pretrained``.
    ``ValueError`` for a pair without ``=``."""
    out: dict[str, Any] = {}
    for name, flag in run_flags():
        if flag.form in (COMMA_LIST, SPACE_LIST):
            continue
        value = getattr(args, flag.dest or name)
        out[name] = parse_pairs(value, flag.name) if flag.form == PAIRS else value
    out["pretrained"] = args.weights or args.pretrained
    return out


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value: a Python literal (``0.1``, ``[1, 2]``, ``None``), ``true`` or
    ``false`` in any case, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = parse_value(val)
    return out


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return None if f.default_factory is MISSING else f.default_factory()


def _text(value: Any) -> str:
    """``value`` as :func:`parse_value` reads it back."""
    if isinstance(value, str) and parse_value(value) == value:
        return value
    return repr(value)


def _argv_of(flag: Flag, value: Any) -> list[str]:
    if flag.form == SWITCH:
        return [flag.name] if value else []
    if flag.form == NEGATED:
        return [] if value else [flag.name]
    if flag.form == PAIRS:
        return [a for k, v in value.items() for a in (flag.name, f"{k}={_text(v)}")]
    if flag.form == REPEATED:
        return [a for v in value for a in (flag.name, str(v))]
    return [flag.name, str(value)]
