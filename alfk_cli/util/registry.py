"""Named plug-ins: architectures, kernels, pseudo-label estimators and strategies.

One small pattern for every extension point (the ``timm.register_model`` idea). Built-ins
register exactly like user code does::

    from alfk_cli.strategies.kernels import KERNELS, Kernel

    @KERNELS.register("fisher")
    class FisherOnly(Kernel):
        ...

A registry is a read-only mapping from name to object, so ``name in KERNELS``, ``KERNELS[name]``
and ``list(KERNELS)`` work. An unknown name raises :class:`UnknownName` (an ``AlfkError``)
naming the known ones. Installed packages can add entries without an import: an entry point in
the group ``alfk.<kind>`` (``alfk.architectures``, ``alfk.kernels``, ``alfk.estimators``,
``alfk.strategies``) names a module, or a callable, which registers its objects itself. Entry
points are loaded the first time a name that is not registered yet is looked up, or the registry
is listed: a run that only uses built-in names never reads the installed packages' metadata nor
imports a plug-in (which may import torch).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from alfk_cli.errors import AlfkError

T = TypeVar("T")


class UnknownName(AlfkError):
    """A name that no registered object has."""


class Registry(Mapping[str, T], Generic[T]):
    """Objects of one kind by name, in registration order."""

    def __init__(self, kind: str, group: str):
        self.kind = kind  # for messages: "architecture", "kernel", ...
        self.group = group  # entry-point group
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` and return it unchanged.

        A second object under a taken name is an error unless ``replace`` (tests, overrides).
        """
        if not name or not isinstance(name, str) or any(c in name for c in " ,:\n"):
            raise ValueError(f"{self.kind} name {name!r} must be a word without ',', ':' or spaces")

        def add(obj: T) -> T:
            if name in self._items and not replace and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def register_instance(self, name: str) -> Callable[[type], type]:
        """Class decorator: register one instance of the decorated class as ``name`` (its
        ``name`` attribute set to it) and return the class unchanged."""

        def add(cls: type) -> type:
            inst = cls()
            inst.name = name
            self.register(name)(inst)
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy object clean up with this)."""
        self._items.pop(name, None)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                obj = ep.load()  # importing the module registers its objects
            except Exception as exc:  # a broken plug-in must not break the built-ins
                raise AlfkError(
                    f"cannot load {self.kind} plug-in {ep.name!r} ({ep.value}): {exc}"
                ) from exc
            if callable(obj) and not isinstance(obj, type):
                obj()

    def __getitem__(self, name: str) -> T:
        if name in self._items:  # registered already: no entry point needs loading
            return self._items[name]
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}"
            ) from None

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self._items:
            self._load_plugins()
        return self._items.get(name, default)

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._items))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._items)

    def __contains__(self, name: Any) -> bool:
        if name in self._items:
            return True
        self._load_plugins()
        return name in self._items

    def names(self) -> tuple[str, ...]:
        """The registered names, built-ins first, for help texts and tests."""
        return tuple(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._items)})"
