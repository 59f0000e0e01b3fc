"""Registries that packages installed beside fedmerge extend through entry points (merge methods, model families).

A :class:`PluginRegistry` is a name -> value mapping holding the built-ins and what was registered in this process,
and loads its entry-point group on the first lookup, not at import: a plugin module that imports fedmerge would
otherwise be loaded while fedmerge is itself half-imported, and be left out. Entry points reach every process (the
Flower ServerApp's and ClientApps' too), which an in-process registration does not. A plugin that fails to load is
left out with a warning and its name and reason are kept, for the unknown-name errors to say (:meth:`failures`).
A plugin whose loading replaced or removed an entry already registered (``METHODS["ties"] = ...`` in its module,
in this registry or another) is left out as well, with an error naming it: those entries are put back, and what it
registered is removed. Torch-free (the lowest layer: imports nothing of fedmerge).
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from importlib.metadata import EntryPoint, entry_points
from typing import TypeVar

logger = logging.getLogger(__name__)

V = TypeVar("V")
_REGISTRIES: list[weakref.ref[PluginRegistry]] = []  # every registry made, so that loading one checks them all
_MISSING = object()


def check_target(kind: str, name: str, target: str, *, find: bool = True) -> None:
    """ValueError unless ``target`` names ``"module:attribute"`` (and, with ``find``, a module that can be found;
    finding a submodule imports its parent packages, so an entry point read at every scenario load skips it)."""
    module, _, attribute = str(target).partition(":")
    if not (module and attribute):
        raise ValueError(f"{kind} {name!r}: {target!r} must be 'module:attribute' (e.g. 'mypkg.mod:Thing')")
    if not find:
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"{kind} {name!r}: module {module!r} is not importable ({target!r})")


class PluginRegistry(MutableMapping[str, V]):
    """The registered ``kind`` entries by name: the built-ins, the ones set in this process, and those of the
    entry-point ``group``, each passed to ``register(entry_point)`` (which checks it and stores it here, or raises)
    on the first lookup (:meth:`load_plugins`)."""

    def __init__(self, kind: str, group: str, builtins: Mapping[str, V],
                 register: Callable[[EntryPoint], None]) -> None:
        self.kind, self.group = kind, group
        self._entries = dict(builtins)
        self._register = register
        self._loaded = False
        self.errors: dict[str, str] = {}  # plugin name -> why it was left out
        self._everywhere = dict(builtins)  # what every process has: the built-ins and the entry points' entries
        _REGISTRIES.append(weakref.ref(self))

    def _all(self) -> dict[str, V]:
        if not self._loaded:
            self.load_plugins()
        return self._entries

    def load_plugins(self) -> None:
        """Register every entry point of the group, once per process (later calls do nothing); one that fails is
        left out with a warning and recorded in :attr:`errors`."""
        if self._loaded:
            return
        self._loaded = True  # first: loading registers through this mapping
        self.errors.clear()
        for entry in entry_points(group=self.group):
            registries = [r for r in (ref() for ref in _REGISTRIES) if r is not None]
            snapshots = [(r, dict(r._entries)) for r in registries]  # noqa: SLF001 - one class
            before = dict(self._entries)
            failure = None
            try:
                self._register(entry)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop fedmerge; it is named
                failure = f"{type(exc).__name__}: {exc}"
            changed = [f"{r.kind} {n!r}" for r, kept in snapshots for n in r._changed_since(kept)]  # noqa: SLF001
            if changed:  # its module replaced entries while loading: every registry is put back as it was (nothing
                for registry, kept in snapshots:  # of the plugin stays, in any registry) and the plugin left out
                    registry._entries.clear()  # noqa: SLF001
                    registry._entries.update(kept)  # noqa: SLF001
                failure = (f"loading it replaced or removed the registered {', '.join(changed)} (restored)"
                           + (f"; then {failure}" if failure else ""))
                logger.error("%s plugin %r (%s) left out: %s", self.kind, entry.name, entry.value, failure)
            elif failure:
                logger.warning("%s plugin %r (%s) left out: %s", self.kind, entry.name, entry.value, failure)
            if failure:
                self.errors[entry.name] = failure
            # an entry point reaches every process, with whatever its module registered while loading
            self._everywhere.update({n: v for n, v in self._entries.items() if before.get(n) is not v})

    def _changed_since(self, kept: Mapping[str, V]) -> list[str]:
        """The names of ``kept`` (a snapshot of :attr:`_entries`) whose entry was replaced or removed since."""
        return [n for n, v in kept.items() if self._entries.get(n, _MISSING) is not v]

    @property
    def registered_here(self) -> set[str]:
        """Names whose entry exists in this process only: set by a call here (``register_method``, a plugin module
        imported by hand, an entry replaced), not a built-in or an entry point's; other processes, the Flower
        engine's, lack them."""
        everywhere = self._everywhere
        return {n for n, v in self._all().items() if n not in everywhere or everywhere[n] is not v}

    def failures(self) -> str:
        """"; plugin 'x' (reason) failed to load" for each plugin left out: added to unknown-name errors."""
        return "".join(f"; plugin {n!r} ({reason}) failed to load" for n, reason in self.errors.items())

    def __getitem__(self, name: str) -> V:
        return self._all()[name]

    def __setitem__(self, name: str, value: V) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()
