"""A run's identity: what its folder's ``config.json`` must match to be resumed, and its run
id (the folder's name). docs/reproducibility.md ("Run identity") states the rules:

- **Input paths** (``--weights``/``--pretrained PATH``, a method option naming a file such as
  NWS's ``pools``) are resolved by :func:`resolve_input_path`, the one function every path
  (inline, sweep plan, local and SLURM jobs) uses, before anything is computed from them.
- **Input contents**: each input file's digest joins the identity (:func:`input_digests`,
  digested once per process and file version); a relaunch onto a replaced file is refused.
- **Defaults**: the run id hashes a method's options as the method's id base
  (:data:`ID_BASE`: its defaults when this rule began) updated by the options that differ
  from today's defaults, so an option added later with a default never changes a run id;
  an old ``config.json`` lacking an option, protocol field or identity key reads as its
  default (:func:`fill_defaults`).
- **Rule versions**: a method whose default *behaviour* changes bumps its
  ``Method.rule_version``; a run of another version is never resumed (the error names its
  folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from benchmarks.core.checks import InputFile
from benchmarks.core.protocols import Protocol
from benchmarks.core.store import checksum_file

log = logging.getLogger("benchmarks")
PRETRAINED_KEYWORDS = ("imagenet", "none")


class RunConflictError(RuntimeError):
    """The run folder holds a run with another configuration."""


# -- paths and digests -------------------------------------------------------------------
def resolve_input_path(value: str | None, keywords: tuple[str, ...] = PRETRAINED_KEYWORDS,
                       prefixes: tuple[str, ...] = ()) -> str | None:
    """``value`` with its path part made absolute (``~`` expanded, symlinks and ``..``
    resolved); keywords (and None) as they are. The one place an input path is made
    absolute: a relative path run inline and through a launcher is the same run."""
    if value is None or value in keywords:
        return value
    prefix = next((p for p in prefixes if value.startswith(p)), "")
    return prefix + str(Path(value.removeprefix(prefix)).expanduser().resolve())


def resolve_option_paths(settings: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every value of an option declared an :class:`InputFile` resolved."""
    out = dict(options)
    for key, value in options.items():
        rule = getattr(settings.get(key), "check", None)
        if isinstance(rule, InputFile) and isinstance(value, str):
            out[key] = resolve_input_path(value, rule.keywords, rule.prefixes)
    return out


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """The file's checksum (:func:`benchmarks.core.store.checksum_file`), computed once per
    process for each (path, size, modification time)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = checksum_file(path)
    return _DIGESTS[key]


def input_digests(pretrained: str, settings: dict[str, Any],
                  options: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each input file of the run, by the flag that named it: its path and digest."""
    files = {}
    if pretrained not in PRETRAINED_KEYWORDS:
        files["--weights"] = pretrained
    for key, value in options.items():
        rule = getattr(settings.get(key), "check", None)
        if isinstance(rule, InputFile) and (found := rule.path(value)) is not None:
            files[f"--opt {key}"] = str(found[1])
    return {flag: {"path": path, "blake2b": file_digest(path)} for flag, path in files.items()}


# -- run id ------------------------------------------------------------------------------
# Each method's options as they were when the run id began to leave defaults out (commit
# 04f6cf6; per benchmark where a default differed): its run ids hashed these values in full,
# so they stay the base of its ids. A method registered later has none ({}).
ID_BASE: dict[str, dict[str, dict[str, Any]]] = {
    "finetune": {"default": {}},
    "nws": {"default": {"beta": 0.5, "pool_size": 512, "group_size": 1, "pools": "auto",
                        "codec": "fixed", "keyframe_every": None, "kmeans_iters": 20,
                        "kmeans_points": 65536},
            "cub_to_sketches": {"beta": 0.1}},
    "ksm": {"default": {"mask_init": 0.01, "threshold": 0.005, "beta": 1200.0,
                        "temperature": 100.0, "soft_weight": 0.5, "quick_epochs": 8}},
    "packnet": {"default": {"prune": "equal-share", "retrain_epochs_fraction": 0.3,
                            "retrain_lr_factor": 0.1, "retrain_milestone_fraction": 25 / 30,
                            "quick_retrain": [1.0, 1.0]},
                "split_cifar100": {"prune": 0.6}},
    "aqd": {"default": {"weight_bits": 2, "act_bits": 2, "quick_epochs": 4}},
}


def id_options(method: str, benchmark: str, options: dict[str, Any],
               defaults: dict[str, Any]) -> dict[str, Any]:
    """The options a run id hashes: the method's :data:`ID_BASE` for ``benchmark``, updated
    by each option whose value differs from today's default. Equal to the resolved options
    for every option that existed at the base, so ids computed before stay; an option added
    since changes the id only when set to another value than its default."""
    base = ID_BASE.get(method, {})
    out = dict(base.get("default", {})) | dict(base.get(benchmark, {}))
    return out | {k: v for k, v in _plain(options).items() if v != _plain(defaults).get(k)}


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def folder_safe(text: str) -> str:
    """``text`` as a file or folder name: every character outside ``A-Z a-z 0-9 . _ + = -``
    becomes ``_`` (a spec's colon, ``timm:resnet10t`` or ``pkg.mod:NAME``: rsync and scp read
    ``a:b`` as a remote path, Windows forbids it). The registries' own names are unchanged;
    two names made equal by it are still two identities (a resume is refused)."""
    return _UNSAFE.sub("_", text)


def run_id(cfg: Any, identity: dict[str, Any], option_defaults: dict[str, Any]) -> str:
    """``<benchmark>-<method>-<arch>-<protocol>-s<seed>-<hash>``; the hash covers the
    options (:func:`id_options`), the pretrained source, the task count, the data options
    and the ``--set`` overrides. ``<method>`` is the method class's name (the identity's
    ``method``; a plugin's spec ``pkg.mod:Class`` never names a folder), every part made
    :func:`folder_safe`."""
    method = identity.get("method", cfg.method)
    base = folder_safe(f"{cfg.benchmark}-{method}-{cfg.arch}-{cfg.protocol}-s{cfg.seed}")
    variant = {k: identity[k] for k in ("pretrained", "num_tasks", "benchmark_options")}
    variant["options"] = id_options(method, cfg.benchmark, identity["options"],
                                    option_defaults)
    variant["protocol_overrides"] = cfg.protocol_overrides
    digest = hashlib.sha256(json.dumps(variant, sort_keys=True, default=str).encode()).hexdigest()
    return f"{base}-{digest[:8]}"


# -- resuming ----------------------------------------------------------------------------
# Identity keys added after runs were first written, and what an old config.json without
# one means: rule version 1 (the methods' rules then), no recorded inputs (not checked), and
# a built-in method (a plugin's identity has "plugin": class path, distribution, version).
ADDED_KEYS: dict[str, Any] = {"rule_version": 1, "inputs": None, "plugin": None}


def protocol_defaults() -> dict[str, Any]:
    """The declared default of each protocol field that has one (a field added later
    must have one)."""
    return {f.name: f.default for f in fields(Protocol) if f.default is not MISSING}


def fill_defaults(previous: dict[str, Any], option_defaults: dict[str, Any]
                  ) -> dict[str, Any]:
    """An old ``config.json`` identity read as today's code would have written it: a key it
    lacks is that key's default (an option's, a protocol field's, :data:`ADDED_KEYS`). Keys
    it has are never changed."""
    out = dict(previous)
    for key, default in ADDED_KEYS.items():
        out.setdefault(key, default)
    if isinstance(out.get("options"), dict):
        out["options"] = _plain(option_defaults) | out["options"]
    if isinstance(out.get("protocol"), dict):
        out["protocol"] = _plain(protocol_defaults()) | out["protocol"]
    return out


def check_resumable(folder: Path, previous: dict[str, Any], identity: dict[str, Any],
                    option_defaults: dict[str, Any] | None = None) -> None:
    """Raise :class:`RunConflictError` unless the run in ``folder`` (its ``previous``
    identity, old keys filled in by :func:`fill_defaults`) is the run ``identity``
    describes. Says what differs and what to do: another rule version, a changed input
    file, another device type or search path, another configuration."""
    identity = {"plugin": ADDED_KEYS["plugin"]} | _plain(identity)  # a built-in has none
    previous = fill_defaults(previous, option_defaults or {})
    for key in sorted(set(previous) | set(identity)):
        flag, was, now = _resume_flag(key), previous.get(key), identity.get(key)
        if flag is not None and was is not None and was != now:
            raise RunConflictError(
                f"{folder} was started on a {was} {flag} and this command runs on {now}: "
                f"resuming would mix two numerics in one result. Resume it with --{flag} "
                f"{was}, or start afresh on {now} with another --out (or delete that folder)")
    method = identity.get("method")
    if previous.get("rule_version") != identity.get("rule_version"):
        raise RunConflictError(
            f"{folder} was run under rule version {previous.get('rule_version')} of method "
            f"{method}, and this code's {method} is version {identity.get('rule_version')}: "
            f"its defaults behave differently now (docs/reproducibility.md, Run identity), so "
            f"that run cannot be continued. Move that folder out of --out (to keep it) or "
            f"delete it, then run again; or finish it with the commit in its env.json")
    _check_plugin(folder, method, previous.get("plugin"), identity.get("plugin"))
    _check_inputs(folder, previous.get("inputs"), identity.get("inputs"))
    if previous.get("inputs") is None:  # not recorded then: taken as they are now
        previous["inputs"] = identity.get("inputs")
    if previous != identity:
        differ = sorted(k for k in set(previous) | set(identity)
                        if previous.get(k) != identity.get(k))
        detail = "; ".join(_differences(previous, identity, differ))
        raise RunConflictError(
            f"{folder} holds a run with another configuration (differs in: {detail}); "
            f"choose another --out, or delete that folder to start over")


def _check_plugin(folder: Path, method: Any, was: dict[str, Any] | None,
                  now: dict[str, Any] | None) -> None:
    """Refuse a resume under another plugin class or version, saying what changed."""
    if was == now:
        return
    changed = ", ".join(f"its {k} {(was or {}).get(k)!r} -> {(now or {}).get(k)!r}"
                        for k in ("class", "distribution", "version")
                        if (was or {}).get(k) != (now or {}).get(k))
    raise RunConflictError(
        f"{folder} was run by another {method} than this command's ({changed or 'built-in'}): "
        f"another plugin class or version may compute something else, so that run cannot be "
        f"continued. Install the plugin it ran with to resume it (docs/architecture.md, "
        f"Plugins); or move that folder out of --out (to keep it) or delete it, then run again")


def _check_inputs(folder: Path, was: dict[str, Any] | None, now: dict[str, Any] | None
                  ) -> None:
    if was is None:  # written before inputs were recorded: nothing to compare
        if now:
            log.warning("%s predates input digests: its input files (%s) cannot be checked "
                        "against the ones it started with", folder, ", ".join(now))
        return
    for flag in sorted(set(was) | set(now or {})):
        before, after = was.get(flag), (now or {}).get(flag)
        if before and after and before["path"] == after["path"] and before != after:
            raise RunConflictError(
                f"{folder} was started with {flag} {after['path']}, and that file has "
                f"changed since (its digest was {before['blake2b']}, now "
                f"{after['blake2b']}): resuming would train its later tasks from other "
                f"inputs. Put the original file back to resume, or delete that folder (or "
                f"choose another --out) to start afresh from the new file")


def _differences(previous: dict[str, Any], identity: dict[str, Any],
                 keys: list[str]) -> list[str]:
    """``key`` per differing key; ``key.sub (was -> now)`` inside a dict."""
    out = []
    for key in keys:
        was, now = previous.get(key), identity.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            subs = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            out += [f"{key}.{k} ({was.get(k)!r} -> {now.get(k)!r})" for k in subs]
        else:
            out.append(key)
    return out


def _resume_flag(key: str) -> str | None:
    """The CLI flag that chose identity ``key`` where a resume under another choice is
    refused with how to go on: the device type (``--device``) and a method's
    ``policy_fields`` (``policy_search``: ``--search``); None for any other key."""
    if key == "device_type":
        return "device"
    return key.removeprefix("policy_") if key.startswith("policy_") else None


def _plain(obj: Any) -> Any:
    """``obj`` as config.json holds it (tuples as lists, other objects as text)."""
    return json.loads(json.dumps(obj, default=str))
