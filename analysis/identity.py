"""One label per experiment, and one run per (experiment, seed).

Runs are grouped by their identity but for the seed (:mod:`benchmarks.core.grouping`). Each group
is shown under a label: its method's name, then what differs from the method's defaults,
e.g. ``nws (beta=0.1)``, ``finetune (lr=0.5, epochs=2)``, ``finetune (pretrained=none)``.
What a difference is, per identity key:

- ``options.*``: the method's resolved default options for the benchmark
  (``resolve_options(benchmark, {})``). Options that make a run one of the suite's named
  extensions (:data:`VARIANTS`, e.g. ``codec=delta``) give the variant's name
  instead (``nws-delta``), the other differences follow it.
- ``protocol.*``: a field the run set with ``--set`` (its ``run_config.protocol_overrides``)
  whose resolved value differs from the named protocol's default for the benchmark (a
  method's own adjustment of the protocol, e.g. AQD's bf16, is part of its default).
- ``pretrained``: differs from the benchmark's default source (known from the runs that did
  not set ``--pretrained``), or set explicitly when no such run is loaded.
- ``num_tasks`` (shown as ``tasks``): set (such a run of the defaults is still set beside the
  paper's figures, marked partial: :data:`PAPER_COMPARABLE`); ``benchmark_options.*``:
  present (none by default).
- ``policy_search`` (shown as ``search``): differs from the search path the run's device
  type takes by default (:func:`nws.search.device_default_search`: certificates on CPU,
  full elsewhere), so a run whose path was chosen by ``--search`` or ``$NWS_SEARCH`` says so.
- any other key (keys a later version adds, options of a method whose class cannot be
  imported): shown where its value varies between the groups of the same (benchmark,
  method, arch, protocol).

A label is the group's: a key is shown when the rules above show it for any run of the
group (their settings are equal; what they declared on the command line may not be).

Two groups never share a label: where the rules above leave two alike (e.g. runs of two code
versions whose defaults differ), the keys that differ between them are added. A run without
``config.json`` has an empty identity: it is labelled by its method, or ``(no config.json)``
beside a run that has one.

Two runs of one group with one seed are duplicates: the most complete is kept (most tasks
learned, then most rows, then the first folder by path), the others are left out with a
warning and a note in the tables (:func:`dedupe`); they are never averaged.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.core.grouping import flatten, group_key, splitting_identity
from benchmarks.core.identity import fill_defaults
from benchmarks.methods.table import METHODS
from nws.search import device_default_search

log = logging.getLogger(__name__)

# identity keys the label never shows: they are the row's own columns (or the seed)
_OWN = ("method", "benchmark", "arch", "seed", "protocol.name")
# identity key -> its default for a device type (the harness's DevicePolicy fields)
POLICY_DEFAULTS: dict[str, Callable[[str], Any]] = {"policy_search": device_default_search}
# keys in which a run may differ from the defaults and still be set beside the paper's
# figures (a partial run: the tables say "1/20 partial" and that it is not comparable)
PAPER_COMPARABLE = frozenset({"num_tasks"})
_MAX_VALUE = 40  # longer values (file paths) are shown by their last part


@dataclass(frozen=True)
class Variant:
    method: str  # the registered method
    options: dict[str, Any]  # the run options that make a run this variant
    label: str  # its description in table notes
    short: str  # its name in table rows and figure legends


VARIANTS: dict[str, Variant] = {
    "nws-delta": Variant("nws", {"codec": "delta"},
                         "nws-delta (suite's extension: task indices as lossless deltas, "
                         "not the paper's method)", "nws-delta (suite's extension)"),
}


def method_class(method: str) -> tuple[type | None, str]:
    """(class, "") or (None, why it cannot be imported): a teammate's file may be missing.
    ``method``: a registry name or a plugin's spec (``pkg.mod:Class``, :attr:`Member.spec`)."""
    try:
        return METHODS.get(method), ""
    except Exception as err:  # a missing or broken module must not stop the analysis
        return None, f"{type(err).__name__}: {err}"


@dataclass
class Member:
    """What labelling needs of one run (analysis.runs.Run builds it)."""

    dir: Path
    method: str  # the registered method
    benchmark: str
    arch: str
    protocol: str
    seed: int
    identity: dict[str, Any]  # config.json's identity; {} without config.json
    run_config: dict[str, Any]  # config.json's run_config; {} without
    completeness: tuple[int, int] = (0, 0)  # (tasks learned, rows)
    label: str = ""
    group: str = ""
    comparable: bool = True  # differs from the defaults in the number of tasks at most
    duplicates: list[Path] = field(default_factory=list)  # folders left out for this one
    duplicate_note: str = ""
    spec: str = ""  # what finds its class (config.json's run_config.method); "": ``method``


@functools.cache
def _default_options(method: str, benchmark: str) -> dict[str, Any] | None:
    cls, _ = method_class(method)
    if cls is None:
        return None
    try:
        return json.loads(json.dumps(cls.resolve_options(benchmark, {}), default=str))
    except (KeyError, ValueError):
        return None


@functools.cache
def _default_protocol(name: str, benchmark: str) -> dict[str, Any] | None:
    from benchmarks.core.protocols import resolve_protocol

    try:
        proto = resolve_protocol(name, benchmark).as_dict()
    except (KeyError, ValueError):
        return None
    proto.pop("provenance", None)
    return json.loads(json.dumps(proto, default=str))


def _fmt(value: Any) -> str:
    text = "none" if value is None else json.dumps(value) if isinstance(value, list) else str(value)
    return text if len(text) <= _MAX_VALUE else "..." + text.replace("\\", "/").rsplit("/", 1)[-1]


def _declared(m: Member) -> dict[str, Any]:
    return m.run_config.get("protocol_overrides") or {}


def _differences(m: Member, flat: dict[str, Any], varying: set[str],
                 default_pretrained: dict[str, Any]) -> dict[str, Any]:
    """The flattened identity keys of ``m`` shown in its label, with their values."""
    options = _default_options(m.spec or m.method, m.benchmark)
    protocol = _default_protocol(m.protocol, m.benchmark)
    out = {}
    for key, value in flat.items():
        if key in _OWN:
            continue
        head, _, tail = key.partition(".")
        if head == "options" and options is not None:
            shown = options.get(tail, object()) != value
        elif head == "protocol":
            default = (protocol or {}).get(tail, object())
            shown = tail in _declared(m) and default != value
        elif key == "pretrained":
            default = default_pretrained.get(m.benchmark)
            shown = (default != value if default is not None
                     else m.run_config.get("pretrained") is not None)
        elif key == "num_tasks":
            shown = value is not None
        elif head == "benchmark_options":
            shown = True
        elif key in POLICY_DEFAULTS:
            shown = value != POLICY_DEFAULTS[key](str(m.identity.get("device_type", "")))
        elif key == "rule_version":  # a run of an earlier rule of its method (fill_defaults)
            cls, _ = method_class(m.spec or m.method)
            shown = cls is not None and value != cls.rule_version
        else:
            shown = key in varying
        if shown:
            out[key] = value
    return out


def _short(keys: Sequence[str]) -> dict[str, str]:
    """Display names: the last part of a dotted key, the whole key where two would clash."""
    def last(k: str) -> str:
        name = k.rsplit(".", 1)[-1]
        return {"num_tasks": "tasks", "policy_search": "search"}.get(name, name)
    lasts = [last(k) for k in keys]
    return {k: last(k) if lasts.count(last(k)) == 1 else k for k in keys}


def _compose(base: str, diffs: dict[str, Any]) -> str:
    if not diffs:
        return base
    names = _short(list(diffs))
    return f"{base} ({', '.join(f'{names[k]}={_fmt(v)}' for k, v in diffs.items())})"


def _variant(method: str, flat: dict[str, Any], diffs: dict[str, Any]) -> tuple[str, dict]:
    """The variant whose options the differences include, with those options taken out."""
    for name, v in VARIANTS.items():
        if v.method == method and all(flat.get(f"options.{k}") == x
                                      for k, x in v.options.items()):
            return name, {k: x for k, x in diffs.items()
                          if k.removeprefix("options.") not in v.options}
    return method, diffs


def current_identity(member: Member) -> dict[str, Any]:
    """``member.identity`` read as today's code writes it (:func:`benchmarks.core.identity.
    fill_defaults`): a run written before an option, protocol field or identity key existed
    has that key's default, so it groups with today's runs of the same settings."""
    if not member.identity:
        return member.identity
    defaults = _default_options(member.spec or member.method, member.benchmark) or {}
    return fill_defaults(member.identity, defaults)


def assign_labels(members: list[Member]) -> None:
    """Set each member's ``group`` and ``label`` (module doc)."""
    for m in members:
        m.identity = current_identity(m)
    flats = [flatten(splitting_identity(m.identity)) for m in members]
    for m in members:
        m.group = group_key(m.identity) if m.identity else "no-config"
    default_pretrained = {m.benchmark: m.identity.get("pretrained") for m in members
                          if m.identity and m.run_config and m.run_config.get("pretrained")
                          is None and "pretrained" in m.identity}
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(members):
        cells[(m.benchmark, m.method, m.arch, m.protocol)].append(i)
    for idx in cells.values():
        keys = {k for i in idx for k in flats[i]}
        varying = {k for k in keys
                   if len({json.dumps(flats[i].get(k), default=str) for i in idx}) > 1}
        shown: dict[str, dict[str, Any]] = defaultdict(dict)  # group -> keys shown
        for i in idx:
            shown[members[i].group] |= _differences(members[i], flats[i], varying,
                                                    default_pretrained)
        labels: dict[str, set[str]] = defaultdict(set)
        for i in idx:
            m = members[i]
            diffs = {k: flats[i][k] for k in flats[i] if k in shown[m.group]}
            base, diffs = _variant(m.method, flats[i], diffs)
            m.label = _compose(base, diffs)
            m.comparable = base == m.method and set(diffs) <= PAPER_COMPARABLE
            labels[m.label].add(m.group)
        for label, groups in labels.items():
            if len(groups) > 1:
                _separate([i for i in idx if members[i].label == label], members, flats)


def _separate(idx: list[int], members: list[Member], flats: list[dict[str, Any]]) -> None:
    """Give groups that came out with one label the keys that differ between them."""
    keys = sorted({k for i in idx for k in flats[i]} - set(_OWN))
    differ = [k for k in keys
              if len({json.dumps(flats[i].get(k), default=str) for i in idx}) > 1]
    for i in idx:
        m = members[i]
        m.comparable = False  # two experiments alike by the rules: neither is the paper's
        if not m.identity:
            m.label += " (no config.json)"
            continue
        extra = {k: flats[i].get(k) for k in differ}
        if not extra:
            continue
        inner = _compose("", extra)[2:-1]
        m.label = f"{m.label[:-1]}, {inner})" if m.label.endswith(")") else f"{m.label} ({inner})"


def dedupe(members: list[Member]) -> tuple[list[Member], list[str]]:
    """One member per (group, seed): the most complete; and a note per duplicate left out."""
    by_key: dict[tuple, list[Member]] = defaultdict(list)
    for m in members:
        by_key[(m.benchmark, m.arch, m.protocol, m.label, m.group, m.seed)].append(m)
    kept, notes = [], []
    for same in by_key.values():
        same.sort(key=lambda m: (-m.completeness[0], -m.completeness[1], str(m.dir)))
        best, rest = same[0], same[1:]
        kept.append(best)
        if rest:
            best.duplicates = [r.dir for r in rest]
            note = (f"{best.label}/{best.arch} seed {best.seed}: {len(same)} runs of the same "
                    f"settings and seed; kept {best.dir} ({best.completeness[0]} tasks "
                    f"learned), left out {', '.join(str(r.dir) for r in rest)} (duplicates "
                    f"are never averaged)")
            log.warning("%s", note)
            best.duplicate_note = note
            notes.append(note)
    order = {id(m): i for i, m in enumerate(members)}
    return sorted(kept, key=lambda m: order[id(m)]), notes
