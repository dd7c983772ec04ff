"""Name -> object registries, so the CLI, configs and docs list what exists.

Entries may be given lazily as ``"package.module:attribute"`` strings; they are imported
only when looked up, so importing a registry has no side effects and no heavy imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that no registry entry has; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any
    help: str


class Registry(Generic[T]):
    """An ordered mapping of names to objects (or lazy import paths) with help texts."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, tuple[Callable[[str], Any], str]] = {}

    def register(self, name: str, target: Any, help: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, target, help)

    def __call__(self, name: str, help: str = ""):
        """Decorator form: ``@REGISTRY("name", help="...")``."""

        def deco(obj: T) -> T:
            self.register(name, obj, help)
            return obj

        return deco

    def add_prefix(self, prefix: str, factory: Callable[[str], T], help: str) -> None:
        """Names ``prefix:rest`` are ``factory(rest)`` (``timm:resnet10t``: the factory gets
        ``resnet10t``), tried before the entries."""
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix {prefix!r} is declared twice")
        self._prefixes[prefix] = (factory, help)

    def get(self, name: str) -> T:
        prefix, colon, rest = name.partition(":")
        if colon and prefix in self._prefixes:
            return self._prefixes[prefix][0](rest)
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
                + "".join(f"; or {p}:NAME" for p in self._prefixes)
            )
        target = self._entries[name].target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def describe(self) -> str:
        rows = [(e.name, e.help) for e in self._entries.values()]
        rows += [(f"{p}:NAME", help) for p, (_, help) in self._prefixes.items()]
        width = max((len(n) for n, _ in rows), default=0)
        lines = [f"{self.kind}s:"] + [f"  {n:<{width}}  {h}" for n, h in rows]
        return "\n".join(lines)
