"""Open registries: what a config names (algorithms, models, datasets, partitions) and where it comes from.

A name resolves, in order, to:

1. an entry registered in this process (``fedmutual.register_model("tiny", build)`` and friends; the
   built-in ones register themselves when their package is first imported);
2. an installed plug-in: an entry point of the group ``fedmutual.<kind>s`` (e.g. ``fedmutual.models``)
   whose name is the requested name;
3. an import string ``"package.module:attribute"``, imported on first use, so that a ``config.json``
   naming a user's own model or algorithm stays rerunnable in a fresh process.

Names are case-insensitive and compared after ``_`` becomes ``-``; import strings are kept as written.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from fedmutual.errors import ConfigError

T = TypeVar("T")


def is_import_string(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:attribute``."""
    mod, sep, attr = name.partition(":")
    return bool(sep and mod and attr and all(p.isidentifier() for p in mod.split(".")) and attr.isidentifier())


def import_object(spec: str, what: str) -> object:
    """The object an import string ``"package.module:attribute"`` names; a ConfigError says what failed."""
    mod, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import module {mod!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} {spec!r}: module {mod!r} has no attribute {attr!r}") from None


def canonical(name: str) -> str:
    """The registry key of a name: lower case, ``_`` as ``-``; import strings unchanged."""
    name = str(name).strip()
    return name if is_import_string(name) else name.lower().replace("_", "-")


class Registry(Generic[T]):
    """Named entries of one kind, for configs to refer to.

    ``builtin`` is the package whose import registers the built-in entries; it is imported lazily, on the
    first lookup, so that low layers (the config) can name higher ones (the algorithms) without importing
    them. ``check`` validates an entry when it is registered or imported (raising TypeError or ValueError).
    """

    def __init__(self, kind: str, builtin: str | None = None, check: Callable[[str, object], T] | None = None):
        self.kind = kind
        self.group = f"fedmutual.{kind}s"
        self._builtin = builtin
        self._check = check
        self._entries: dict[str, T] = {}
        self._loaded = builtin is None
        self._builtin_names: list[str] = []

    def _load_builtin(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._builtin is not None
            importlib.import_module(self._builtin)

    def builtin_names(self) -> list[str]:
        """The names that fedmutual itself registers (entries defined in the built-in package)."""
        self._load_builtin()
        return list(self._builtin_names)

    def register(self, name: str, obj: object, replace: bool = False) -> T:
        """Add ``obj`` under ``name``; refuses to shadow an existing entry unless ``replace``."""
        key = canonical(name)
        if not key or ":" in key or "," in key:
            raise ValueError(f"invalid {self.kind} name {name!r}: use letters, digits, '-' and '_' (no ':' or ',')")
        self._load_builtin()
        if key in self._entries and not replace and self._entries[key] is not obj:
            raise ValueError(f"a {self.kind} named {key!r} is already registered; pass replace=True to replace it")
        entry = self._checked(key, obj)
        self._entries[key] = entry
        module = str(getattr(obj, "__module__", ""))
        if self._builtin is not None and module.startswith(self._builtin + ".") and key not in self._builtin_names:
            self._builtin_names.append(key)
        return entry

    def _checked(self, name: str, obj: object) -> T:
        if self._check is None:
            return obj  # type: ignore[return-value]
        try:
            return self._check(name, obj)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.kind} {name!r}: {e}") from None

    def names(self) -> list[str]:
        """Registered names (built-in first, in registration order), without import strings and plug-ins not yet loaded."""
        self._load_builtin()
        return [k for k in self._entries if not is_import_string(k)]

    def __contains__(self, name: object) -> bool:
        try:
            self.get(str(name))
        except ConfigError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry for ``name`` (registered, plug-in or import string); ConfigError listing the choices."""
        key = canonical(name)
        self._load_builtin()
        if key in self._entries:
            return self._entries[key]
        if is_import_string(key):
            entry = self._checked(key, import_object(key, self.kind))
            self._entries[key] = entry
            return entry
        plugin = self._entry_point(key)
        if plugin is not None:
            return plugin
        raise ConfigError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}, "
                          f"or an import string such as 'mypackage.module:Name'")

    def _entry_point(self, key: str) -> T | None:
        try:
            found = [ep for ep in metadata.entry_points(group=self.group) if canonical(ep.name) == key]
        except Exception:  # a broken distribution's metadata must not break name lookup
            return None
        if not found:
            return None
        try:
            obj = found[0].load()
        except Exception as e:
            raise ConfigError(f"{self.kind} {key!r}: the plug-in {found[0].value!r} failed to load ({type(e).__name__}: {e})") from None
        entry = self._checked(key, obj)
        self._entries.setdefault(key, entry)
        return self._entries[key]


def _check_algorithm(name: str, obj: object) -> type:
    if not (isinstance(obj, type) and callable(getattr(obj, "round", None)) and callable(getattr(obj, "handler_kinds", None))):
        raise TypeError(f"{obj!r} is not an Algorithm subclass (fedmutual.protocol.Algorithm)")
    return obj


#: Algorithms by name. Built-ins register themselves in ``fedmutual.algorithms``.
ALGORITHMS: Registry[type] = Registry("algorithm", builtin="fedmutual.algorithms", check=_check_algorithm)

A = TypeVar("A", bound=type)


def register_algorithm(cls: A | None = None, *, name: str | None = None, replace: bool = False) -> A | Callable[[A], A]:
    """Register an :class:`~fedmutual.protocol.Algorithm` subclass under ``name`` (default: its ``name``).

    Usable as a decorator (``@register_algorithm``) or a call (``register_algorithm(FedPer)``). Its settings
    table, if it declares ``Settings``, is the ``[<cls.name>]`` table of a config.
    """

    def add(klass: A) -> A:
        key = name or getattr(klass, "name", "")
        if not key:
            raise ValueError(f"{klass.__name__}: set the class attribute `name` (the registry and settings-table name)")
        ALGORITHMS.register(key, klass, replace=replace)
        return klass

    return add(cls) if cls is not None else add
