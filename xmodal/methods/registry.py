"""The method registry: ``@register_method`` on a :class:`~xmodal.methods.base.Method` subclass.

Built-in methods are the sub-packages of :mod:`xmodal.methods` (``supervised/``, ``kd/``...): each
package's ``__init__`` imports its method module, which registers itself. They are found by
listing the sub-packages, so adding a method is adding a package. Methods of other installed
packages register through the ``xmodal.methods`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from xmodal.errors import ConfigError
from xmodal.methods.base import Method, check_settings_dataclass

METHODS: dict[str, type[Method]] = {}
ENTRY_POINT_GROUP = "xmodal.methods"
_LOADED = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``.

    Raises:
        TypeError: The class declares no ``Settings`` dataclass.
        ValueError: Another class is registered under the same name.
    """
    check_settings_dataclass(cls)
    if cls.name in METHODS and METHODS[cls.name].__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def load_methods() -> dict[str, type[Method]]:
    """Import every built-in method package and every ``xmodal.methods`` entry point (once)."""
    global _LOADED
    if not _LOADED:
        import xmodal.methods as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg:
                importlib.import_module(f"{package.__name__}.{info.name}")
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
        _LOADED = True
    return METHODS


def get_method(name: str) -> type[Method]:
    """The method registered as ``name``.

    Raises:
        ConfigError: Unknown name (the message lists the known ones).
    """
    methods = load_methods()
    try:
        return methods[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(methods)}") from None
