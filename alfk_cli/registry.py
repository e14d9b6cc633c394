"""Named plug-ins: architectures, kernels, pseudo-label estimators and strategies.

One small pattern for every extension point (the ``timm.register_model`` idea). Built-ins
register exactly like user code does::

    from alfk_cli.kernels import KERNELS, Kernel

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

A registry may also answer a whole family of names by prefix (``register_prefix``: the
architectures ``timm:NAME``): such a name is resolved when it is looked up, by a function that
builds its object (and may import heavy libraries then); it is not listed by name, but as a
pattern (``patterns``), since a family can hold thousands.
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
        # prefix -> (resolve(name) -> object, describe() -> one line for ``alfk list``)
        self._prefixes: dict[str, tuple[Callable[[str], T], Callable[[], str]]] = {}

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

    def register_prefix(
        self, prefix: str, resolve: Callable[[str], T], describe: Callable[[], str]
    ) -> None:
        """Answer every name that starts with ``prefix`` with ``resolve(name)``, which raises an
        ``AlfkError`` for a name of the family that does not exist; ``describe()`` is the
        family's line in ``alfk list``."""
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix {prefix!r} is already registered")
        self._prefixes[prefix] = (resolve, describe)

    def prefix_of(self, name: str) -> str | None:
        """The registered prefix ``name`` starts with, if any."""
        return next((p for p in self._prefixes if name.startswith(p)), None)

    def prefixes(self) -> tuple[str, ...]:
        """The registered prefixes (``timm:``)."""
        return tuple(self._prefixes)

    def patterns(self) -> list[str]:
        """One line per family of prefixed names (``timm:NAME — ...``)."""
        return [describe() for _, describe in self._prefixes.values()]

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
        prefix = self.prefix_of(name)
        if prefix is not None:
            return self._prefixes[prefix][0](name)
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            known = [*self._items, *(f"{p}NAME" for p in self._prefixes)]
            raise UnknownName(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(known)}"
            ) from None

    def get(self, name: str, default: Any = None) -> Any:
        if self.prefix_of(name) is not None and name not in self._items:
            try:
                return self[name]
            except AlfkError:
                return default
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
        if isinstance(name, str) and self.prefix_of(name) is not None:
            return self.get(name) is not None
        self._load_plugins()
        return name in self._items

    def names(self) -> tuple[str, ...]:
        """The registered names, built-ins first, for help texts and tests."""
        return tuple(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._items)})"
