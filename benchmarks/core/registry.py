"""Name -> object registries, so the CLI, configs and docs list what exists; and *specs*, the
way a user names an object from outside them (a plugin) without forking the suite.

A spec is resolved by :meth:`Registry.get` in this order (docs/architecture.md, "Plugins:
specs, entry points, identity"):

1. a registered (built-in) name, e.g. ``nws``. Entries may be lazy
   ``"package.module:attribute"`` strings, imported only when looked up, so importing a
   registry has no side effects and no heavy imports;
2. a name added by an entry point of the registry's group (``nws_bench.methods``,
   ``nws_bench.benchmarks``, ``nws_bench.archs``; standard :mod:`importlib.metadata`). The
   group's entry points are imported once, on the first lookup or listing; one that fails
   (its module does not import, it is the wrong kind, its name is taken) is logged once as a
   warning naming it and its error and left out: the other names keep working;
3. ``prefix:rest`` for a prefix declared with :meth:`Registry.add_prefix` (``timm:resnet10t``
   is an architecture the factory makes from ``resnet10t``, never ``timm.resnet10t``);
4. a module path ``package.module:Attr`` (``Attr`` may be dotted: ``mod:Outer.Inner``).

Rules 2 and 4 hold for a registry given an entry-point ``group`` (methods, benchmarks,
architectures); the others (protocols, loggers, launchers) take their names and prefixes only.

What a plugin (2, 4) gives is checked by the registry's validator (methods: a
``benchmarks.methods.contract.Method`` subclass with a ``name``); the name it goes by must not
be a built-in's or another plugin's. Every failure is a :class:`PluginError` (a
``ValueError``: the CLI's exit 2) naming the spec and the cause.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("benchmarks")

# A plugin's check: the name the object goes by (rows, run folders; None: it has none, the
# spec or entry point names it), or TypeError saying why it is not of the registry's kind.
Validator = Callable[[Any], "str | None"]


class UnknownNameError(KeyError):
    """A name that no registry entry has; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(ValueError):
    """A spec that names no usable object: its module is missing or raises on import, the
    attribute is missing, the object is the wrong kind, or its name is taken."""


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any
    help: str


@dataclass(frozen=True)
class Plugin:
    """An object from outside the registry: where it comes from, for listings and identity."""

    name: str  # the name it is looked up by (entry point) or goes by (module path)
    target: Any
    path: str  # "package.module:Attr" of the object
    source: str  # the entry point ("name = module:attr") or the spec it was given as
    distribution: str | None = None
    version: str | None = None
    help: str = ""


def object_path(obj: Any) -> str:
    """``package.module:Qualname`` of a class or function (its module path spec)."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def distribution_of(module: str) -> tuple[str | None, str | None]:
    """(name, version) of the installed distribution that provides ``module``, else (None,
    None). Found by its top-level package (``packages_distributions``), else by an entry
    point of this suite's groups pointing into it (an editable install lists no package)."""
    top = module.partition(".")[0]
    names = metadata.packages_distributions().get(top, [])
    if names:
        return names[0], metadata.version(names[0])
    for dist in metadata.distributions():
        if any(ep.group.startswith("nws_bench.") and ep.module.partition(".")[0] == top
               for ep in dist.entry_points):
            return dist.name, dist.version
    return None, None


def _help_of(obj: Any) -> str:
    """The first line of the object's docstring, else of its module's."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    doc = (getattr(obj, "__doc__", None) or getattr(module, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    """An ordered mapping of names to objects (or lazy import paths) with help texts, that
    also resolves specs (module doc). ``group``: the entry-point group adding names;
    ``validate``: the check of a plugin's object (:data:`Validator`)."""

    def __init__(self, kind: str, group: str | None = None,
                 validate: Validator | None = None) -> None:
        self.kind = kind
        self.group = group
        self.validate = validate
        self._entries: dict[str, Entry] = {}
        self._prefixes: dict[str, tuple[Callable[[str], Any], str]] = {}
        self._plugins: dict[str, Plugin] | None = None  # entry points, once loaded
        self._broken: dict[str, str] = {}  # entry point name -> why it was left out
        self._claimed: dict[str, Plugin] = {}  # name -> module-path plugin that took it

    # -- built-ins -----------------------------------------------------------------------
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
        """Specs ``prefix:rest`` are ``factory(rest)``, tried before the module-path rule."""
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix {prefix!r} is declared twice")
        self._prefixes[prefix] = (factory, help)

    # -- lookups -------------------------------------------------------------------------
    def get(self, spec: str) -> T:
        """The object ``spec`` names (module doc). Raises :class:`UnknownNameError` for a
        name nothing has, :class:`PluginError` for a spec that names no usable object."""
        plugins = self._load_plugins()
        if spec in self._entries:
            return self._builtin(spec)
        if spec in plugins:
            return plugins[spec].target
        if spec in self._broken:
            raise PluginError(f"{self.kind} {spec!r}: {self._broken[spec]}")
        prefix, colon, rest = spec.partition(":")
        if colon and prefix in self._prefixes:
            return self._prefixed(spec, prefix, rest)
        if colon and self.group is not None:
            return self._module_path(spec)
        takes = self.group is not None
        hint = (" (a module path takes a colon: package.module:Attr)"
                if takes and "." in spec else "")
        raise UnknownNameError(
            f"unknown {self.kind} {spec!r}{hint}; valid {self.kind}s: "
            f"{', '.join([*self.names(), *plugins])}"
            + "".join(f"; or {p}:NAME" for p in self._prefixes)
            + ("; or a module path package.module:Attr" if takes else ""))

    def split(self, text: str) -> list[str]:
        """The specs of a comma-separated list (``all``: the built-in names), each resolved
        (errors as :meth:`get`); a spec naming an object named before is dropped, so one
        run is planned once (``nws,benchmarks.methods.nws_method:NWSMethod`` is one)."""
        out: list[tuple[Any, str]] = []
        for spec in (s.strip() for s in text.split(",")):
            if not spec:
                raise PluginError(f"{self.kind} list {text!r} has an empty item: give "
                                  f"comma-separated names or specs")
            for one in self.names() if spec == "all" else [spec]:
                obj = self.get(one)
                if not any(seen is obj for seen, _ in out):
                    out.append((obj, self.canonical(one)))
        return [spec for _, spec in out]

    def canonical(self, spec: str) -> str:
        """The one spelling of ``spec``'s object every spelling plans under: a built-in's
        name, an entry point's name, else the object's own module path (a re-export
        ``pkg:Class`` of ``pkg.impl:Class`` becomes ``pkg.impl:Class``). So a sweep planned
        with one spelling and its status asked with another find the same run folders and
        job records (the harness already takes them for one run)."""
        obj = self.get(spec)
        path = object_path(obj)
        for name in self._entries:
            if self._builtin_path(name) == path:
                return name
        for name, plugin in self._load_plugins().items():
            if plugin.target is obj:
                return name
        return path if ":" in spec else spec

    def names(self) -> list[str]:
        """The built-in names (``--method all``): what entry points add is :meth:`plugins`."""
        return list(self._entries)

    def entries(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def plugins(self) -> dict[str, Plugin]:
        """What entry points added, by name (loaded on the first call)."""
        return dict(self._load_plugins())

    def broken(self) -> dict[str, str]:
        """Entry points left out, by name: why."""
        self._load_plugins()
        return dict(self._broken)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._load_plugins()

    def provenance(self, obj: Any) -> dict[str, str | None] | None:
        """None for a built-in object; else where the plugin comes from, for the run
        identity: ``{"class": "pkg.mod:Class", "distribution": NAME, "version": V}`` (the
        last two None when no installed distribution provides it)."""
        path = object_path(obj)
        if any(e.target is obj or e.target == path for e in self._entries.values()):
            return None
        found = next((p for p in self._load_plugins().values() if p.path == path), None)
        dist, version = ((found.distribution, found.version) if found and found.distribution
                         else distribution_of(path.partition(":")[0]))
        return {"class": path, "distribution": dist, "version": version}

    def forget_plugins(self) -> None:
        """Forget what entry points and module paths gave: the next lookup loads them anew
        (a process that installs a plugin while running; tests)."""
        self._plugins, self._broken, self._claimed = None, {}, {}

    def describe(self) -> str:
        plugins = self._load_plugins()
        rows = [(e.name, e.help) for e in self._entries.values()]
        rows += [(p.name, f"{p.help}  [plugin {p.path}"
                  + (f", {p.distribution} {p.version}" if p.distribution else "") + "]")
                 for p in plugins.values()]
        rows += [(f"{p}:NAME", help) for p, (_, help) in self._prefixes.items()]
        if self.group is not None:
            rows.append(("pkg.module:Attr", f"a plugin's {self.kind} by its module path"))
        width = max((len(n) for n, _ in rows), default=0)
        lines = [f"{self.kind}s:"] + [f"  {n:<{width}}  {h}".rstrip() for n, h in rows]
        lines += [f"  left out: entry point {name}: {why}" for name, why in self._broken.items()]
        return "\n".join(lines)

    # -- resolution ----------------------------------------------------------------------
    def _builtin(self, name: str) -> T:
        target = self._entries[name].target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target

    def _builtin_path(self, name: str) -> str:
        target = self._entries[name].target
        return target if isinstance(target, str) else object_path(target)

    def _check(self, obj: Any, source: str) -> str | None:
        """The validator's name for ``obj``; its TypeError as a :class:`PluginError`."""
        if self.validate is None:
            return None
        try:
            return self.validate(obj)
        except TypeError as err:
            raise PluginError(f"{self.kind} {source!r}: {err}") from err

    def _clash(self, name: str, path: str, source: str) -> str | None:
        """Why ``name`` (of the object at ``path``, given as ``source``) is taken, or None."""
        if name in self._entries and self._builtin_path(name) != path:
            return (f"{self.kind} {source!r} ({path}) is named {name!r} like the built-in "
                    f"{self.kind} {name} ({self._builtin_path(name)}); give it another name")
        other = (self._plugins or {}).get(name) or self._claimed.get(name)
        if other is not None and other.path != path:
            return (f"{self.kind} {source!r} ({path}) is named {name!r} like the plugin "
                    f"{other.source} ({other.path}); give one of them another name")
        return None

    def _prefixed(self, spec: str, prefix: str, rest: str) -> T:
        factory, _ = self._prefixes[prefix]
        obj = factory(rest)
        self._check(obj, spec)
        return obj

    def _module_path(self, spec: str) -> T:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise PluginError(f"{self.kind} {spec!r}: a module path is package.module:Attr")
        obj = _import(module, attr, f"{self.kind} {spec!r}")
        path = object_path(obj)
        name = self._check(obj, spec)
        if name is None:
            return obj
        if name in self._entries and self._builtin_path(name) == path:
            return obj  # a built-in given by its module path
        why = self._clash(name, path, spec)
        if why:
            raise PluginError(why)
        self._claimed.setdefault(name, Plugin(name, obj, path, spec, help=_help_of(obj)))
        return obj

    def _load_plugins(self) -> dict[str, Plugin]:
        """The group's entry points, imported once (module doc); failures logged once."""
        if self._plugins is not None:
            return self._plugins
        self._plugins = {}
        if self.group is None:
            return self._plugins
        by_name: dict[str, list[metadata.EntryPoint]] = defaultdict(list)
        for ep in metadata.entry_points(group=self.group):
            if ep.value not in {e.value for e in by_name[ep.name]}:
                by_name[ep.name].append(ep)
        for name, eps in sorted(by_name.items()):
            try:
                self._plugins[name] = self._entry_point(name, eps)
            except PluginError as err:
                self._broken[name] = str(err)
                log.warning("%s entry point %r left out: %s", self.kind, name, err)
        return self._plugins

    def _entry_point(self, name: str, eps: list[metadata.EntryPoint]) -> Plugin:
        """The plugin of entry point(s) ``name``; PluginError saying why it cannot be one."""
        where = " and ".join(_ep_text(ep) for ep in eps)
        if len(eps) > 1:
            raise PluginError(f"two entry points claim it: {where}; uninstall one")
        ep = eps[0]
        if name in self._entries:
            raise PluginError(f"{where} is named like the built-in {self.kind} {name} "
                              f"({self._builtin_path(name)}); the built-in is used")
        try:
            obj = ep.load()
        except (Exception, SystemExit) as err:  # any error of a plugin's import (a
            # sys.exit() at import included): it is left out, named
            raise PluginError(f"{where}: {type(err).__name__}: {err}") from err
        own = self._check(obj, where)
        if own is not None and own != name:
            raise PluginError(f"{where}: its {self.kind} is named {own!r}; name the entry "
                              f"point {own!r} (rows and run folders show that name)")
        why = self._clash(name, object_path(obj), where)
        if why:
            raise PluginError(why)
        dist = ep.dist
        return Plugin(name, obj, object_path(obj), where, dist.name if dist else None,
                      dist.version if dist else None, _help_of(obj))


def _ep_text(ep: metadata.EntryPoint) -> str:
    dist = f" (distribution {ep.dist.name} {ep.dist.version})" if ep.dist else ""
    return f"{ep.name} = {ep.value}{dist}"


def _import(module: str, attr: str, what: str) -> Any:
    """``module``'s (dotted) attribute ``attr``; PluginError naming ``what`` and the cause."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (module == err.name or module.startswith(err.name + ".")):
            raise PluginError(
                f"{what}: no module named {err.name!r} (install its package, or put the "
                f"folder holding it on PYTHONPATH)") from err
        raise PluginError(f"{what}: importing {module} raised ModuleNotFoundError: {err}"
                          ) from err
    except (Exception, SystemExit) as err:  # the plugin's own import failed: say how (also
        # a sys.exit() at import, which would otherwise end the command without a word)
        raise PluginError(f"{what}: importing {module} raised {type(err).__name__}: {err}"
                          ) from err
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what}: module {module} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
