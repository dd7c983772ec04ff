"""Valid ranges of values, declared with the field, option or flag they check.

Every protocol field (:class:`benchmarks.core.protocols.Protocol`, field metadata), method option
(:class:`benchmarks.core.protocols.S` ``check=``), benchmark option (``Annotated`` parameter of a
benchmark's builder) and count flag of the command line (``type=``) carries one, with the
reason for its bounds. A value outside is refused before any work, naming the value and the
valid range (``ValueError``: exit 2 from the CLI; argparse's own exit 2 for flags).
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Check:
    """A rule for one value; :meth:`check` raises ``ValueError`` naming ``name``."""

    why: str

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None: valid)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, name: str, value: Any) -> Any:
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{name}={value!r}: {problem}; valid: {self.describe()} "
                             f"({self.why})")
        return value


@dataclass(frozen=True)
class Range(Check):
    """A number in [lo, hi] (``lo_open``, ``hi_open``: that bound excluded); ``integer``: an
    int; ``none``: None is valid too. NaN and infinities are never in a range."""

    lo: float | None
    hi: float | None
    why: str
    integer: bool = False
    lo_open: bool = False
    none: bool = False
    hi_open: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.none else "a value is needed"
        if self.integer and not _is_int(value):
            return "not an integer"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "not a number"
        if not math.isfinite(value):
            return "not a finite number"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low or high:
            return "out of range"
        return None

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind}{' ' + bounds if bounds else ''}{' or None' if self.none else ''}"


@dataclass(frozen=True)
class OneOf(Check):
    """One of ``values``."""

    values: tuple[Any, ...]
    why: str

    def problem(self, value: Any) -> str | None:
        ok = any(value == v and type(value) is type(v) for v in self.values)
        return None if ok else "not one of them"

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


@dataclass(frozen=True)
class Each(Check):
    """A list (or tuple) of values each passing ``item``, ``length`` of them if given,
    ``increasing`` if asked."""

    item: Check
    why: str
    length: int | None = None
    increasing: bool = False

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list | tuple):
            return "not a list"
        if self.length is not None and len(value) != self.length:
            return f"{len(value)} values"
        bad = next((v for v in value if self.item.problem(v) is not None), None)
        if bad is not None:
            return f"{bad!r}: {self.item.problem(bad)}"
        if self.increasing and any(a >= b for a, b in itertools.pairwise(value)):
            return "not increasing"
        return None

    def describe(self) -> str:
        n = f"{self.length} " if self.length is not None else ""
        order = " in increasing order" if self.increasing else ""
        return f"a list of {n}values{order}, each {self.item.describe()}"


@dataclass(frozen=True)
class Either(Check):
    """Valid when any of ``checks`` accepts the value."""

    checks: tuple[Check, ...]
    why: str

    def problem(self, value: Any) -> str | None:
        problems = [c.problem(value) for c in self.checks]
        return None if any(p is None for p in problems) else problems[-1]

    def describe(self) -> str:
        return ", or ".join(c.describe() for c in self.checks)


@dataclass(frozen=True)
class InputFile(Check):
    """A keyword (``keywords``) or the path of an existing file, optionally behind one of
    ``prefixes`` (``authors:PATH``). A path is an input of the run: its digest joins the run
    identity (:mod:`benchmarks.core.identity`)."""

    keywords: tuple[str, ...]
    why: str
    prefixes: tuple[str, ...] = ()

    def path(self, value: Any) -> tuple[str, Path] | None:
        """(prefix, path) of a file value; None for a keyword."""
        text = str(value)
        if text in self.keywords:
            return None
        prefix = next((p for p in self.prefixes if text.startswith(p)), "")
        return prefix, Path(text.removeprefix(prefix)).expanduser()

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "not a keyword or a file path"
        found = self.path(value)
        if found is None:
            return None
        _, path = found
        if not path.exists():
            return f"no file {path}"
        return None if path.is_file() else f"{path} is not a file"

    def describe(self) -> str:
        prefixed = "".join(f" or {p}PATH" for p in self.prefixes)
        return f"{', '.join(self.keywords)}, or the PATH of a file{prefixed}"


def flag_type(kind: type, rule: Check):
    """An argparse ``type=`` that parses with ``kind`` and checks ``rule``: a bad value is
    argparse's usage error (exit 2) naming the flag, the value and the valid range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        problem = rule.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {problem}; valid: {rule.describe()} ({rule.why})")
        return value

    parse.__name__ = kind.__name__
    return parse
