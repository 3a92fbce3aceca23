"""Plugin registry: compressors, A2A algorithms, experts, schedulers and gates, by name.

Built-ins register themselves with the same decorators third parties use::

    @register_compressor("mycodec")
    class MyCodec(Compressor): ...

A package can also ship plugins without being imported by the user, through the entry-point
group ``schedmoe.plugins``; the entry point's name is ``<kind>.<name>`` and its value the class::

    [project.entry-points."schedmoe.plugins"]
    "compressor.mycodec" = "mypkg.codecs:MyCodec"

Entry points are read lazily, the first time a name of that kind is looked up or listed.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Callable, Generic, TypeVar

from .errors import RegistryError

ENTRY_POINT_GROUP = "schedmoe.plugins"

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class map for one kind of plugin; every class must subclass `base`.

    `base_path` ("module:Class") is imported on first use, so the modules that define the base
    classes can register their built-ins while they are being imported.
    """

    def __init__(self, kind: str, base_path: str) -> None:
        self.kind = kind
        self._base_path = base_path
        self._classes: dict[str, type] = {}
        self._entry_points: dict[str, metadata.EntryPoint] | None = None

    @property
    def base(self) -> type:
        module, _, name = self._base_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def register(self, name: str, cls: type | None = None) -> Callable[[T], T] | type:
        """Register `cls` under `name`; usable as `@registry.register("name")`."""
        if cls is None:
            return lambda c: self.register(name, c)  # type: ignore[return-value]
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(
                f"cannot register {cls!r} as {self.kind} {name!r}: it must be a subclass of "
                f"{self.base.__module__}.{self.base.__qualname__}"
            )
        if name in self._classes and self._classes[name] is not cls:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered as {self._classes[name]!r}; "
                "pick another name"
            )
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type:
        """Class registered as `name`; loads a matching entry point on first use."""
        if name in self._classes:
            return self._classes[name]
        entry = self._plugin_entry_points().get(name)
        if entry is None:  # a plugin may have been installed since the last scan
            self.refresh_entry_points()
            entry = self._plugin_entry_points().get(name)
        if entry is not None:
            try:
                cls = entry.load()
            except Exception as exc:  # a broken plugin must name itself
                raise RegistryError(
                    f"loading {self.kind} {name!r} from entry point {entry.value!r} failed: {exc}"
                ) from exc
            if self._classes.get(name) is not cls:  # the import may have registered it already
                self.register(name, cls)
            return cls
        raise RegistryError(
            f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
        )

    def resolve(self, spec: str | type) -> type:
        """Accept a registered name or a class of the right type."""
        if isinstance(spec, str):
            return self.get(spec)
        if isinstance(spec, type) and issubclass(spec, self.base):
            return spec
        raise RegistryError(
            f"{self.kind} must be a registered name or a subclass of {self.base.__qualname__}, "
            f"got {spec!r}"
        )

    def name_of(self, cls: type) -> str | None:
        """The name `cls` is registered under, if any (entry points not yet loaded excluded)."""
        for name, registered in self._classes.items():
            if registered is cls:
                return name
        return None

    def names(self) -> list[str]:
        """Every name that `get` would accept, loaded or not."""
        return sorted(set(self._classes) | set(self._plugin_entry_points()))

    def _plugin_entry_points(self) -> dict[str, metadata.EntryPoint]:
        if self._entry_points is None:
            prefix = self.kind + "."
            self._entry_points = {
                ep.name[len(prefix):]: ep
                for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
                if ep.name.startswith(prefix)
            }
        return self._entry_points

    def refresh_entry_points(self) -> None:
        """Forget the cached entry points (after installing a plugin at run time)."""
        self._entry_points = None


_REGISTRIES = {
    "compressor": Registry("compressor", "schedmoe.ops.codecs.compressor:Compressor"),
    "a2a": Registry("a2a", "schedmoe.a2a_algos.base:A2AAlgorithm"),
    "expert": Registry("expert", "schedmoe.ops.experts.forms:Expert"),
    "scheduler": Registry("scheduler", "schedmoe.schedulers.base:Scheduler"),
    "gate": Registry("gate", "schedmoe.routing.base:Router"),
}


def registry(kind: str) -> Registry:
    """The registry of one kind: compressor, a2a, expert, scheduler or gate."""
    if kind not in _REGISTRIES:
        raise RegistryError(f"unknown plugin kind {kind!r}; kinds: {', '.join(_REGISTRIES)}")
    return _REGISTRIES[kind]


def register_compressor(name: str) -> Callable[[T], T]:
    return lambda cls: registry("compressor").register(name, cls)


def register_a2a(name: str) -> Callable[[T], T]:
    return lambda cls: registry("a2a").register(name, cls)


def register_expert(name: str) -> Callable[[T], T]:
    return lambda cls: registry("expert").register(name, cls)


def register_scheduler(name: str) -> Callable[[T], T]:
    return lambda cls: registry("scheduler").register(name, cls)


def register_gate(name: str) -> Callable[[T], T]:
    return lambda cls: registry("gate").register(name, cls)
