"""Finding the plugins of a run: installed ones, and those the configuration names.

Two sources, loaded in this order:

1. the entry-point group ``dbkeeper.plugins`` (dbkeeper installs its database plugin there;
   any installed package may add its own);
2. ``[bot] plugins``: import strings (``package.module`` exporting ``plugin``, or
   ``package.module:Class``). When the key is not set, the companions the installed plugins
   name (the database plugin names the example feature while the schema is the example's).

The classes are ordered by ``Plugin.order`` (the database plugin first), then by how they were
found. A plugin that cannot be imported, is not a plugin, or shares another's name stops startup
with one line naming it (``ConfigError``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

from dbkeeper.config import ConfigError
from dbkeeper.plugin import Plugin

ENTRY_POINT_GROUP = "dbkeeper.plugins"


def plugin_classes(
    chosen: Sequence[str] | None,
    raw: Mapping[str, Any],
    *,
    embedded: bool = False,
    label: str = "configuration",
) -> list[type[Plugin]]:
    """The plugin classes of a run, ordered (see the module docstring).

    ``chosen``: ``[bot] plugins`` when it is set, else None. ``embedded``: dbkeeper runs in
    someone else's bot, which never gets the example feature unless it names it.
    """
    found: list[type[Plugin]] = []
    for entry in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
    ):
        found.append(_load(entry.value, f"entry point {entry.name!r} ({entry.value})", label))
    if chosen is None:
        chosen = [] if embedded else [c for cls in found for c in cls.companions(raw)]
    for spec in chosen:
        found.append(_load(spec, f"[bot] plugins: {spec!r}", label))
    unique: dict[type[Plugin], None] = dict.fromkeys(found)
    names: dict[str, type[Plugin]] = {}
    for cls in unique:
        if cls.name in names:
            raise ConfigError(
                f"{label}: two plugins are named {cls.name!r} ({_where(names[cls.name])} and "
                f"{_where(cls)}); load only one of them"
            )
        names[cls.name] = cls
    _check_orders(list(unique), label)
    return sorted(unique, key=lambda cls: cls.order)  # stable: found order within an order


def _check_orders(classes: Sequence[type[Plugin]], label: str) -> None:
    """Order 0 is the database plugin's, and nothing comes before it: every other plugin
    starts after the database is ready and stops before it closes."""
    for cls in classes:
        if cls.order < 0:
            raise ConfigError(
                f"{label}: plugin {cls.name!r} ({_where(cls)}) has order {cls.order}: orders "
                "start at 0, the database plugin's (first to start, last to stop); use 1 or more"
            )
    first = [cls for cls in classes if cls.order == 0]
    if len(first) > 1:
        named = " and ".join(f"{cls.name!r} ({_where(cls)})" for cls in first)
        raise ConfigError(
            f"{label}: plugins {named} both have order 0, the database plugin's (first to "
            "start, last to stop); give the other one 1 or more"
        )


def _load(spec: str, what: str, label: str) -> type[Plugin]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, and any error the module raises on import
        reason = f"{type(error).__name__}: {error}"
        raise ConfigError(f"{label}: {what} cannot be imported: {reason}") from None
    target: Any = module
    for part in (attribute or "plugin").split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(
                f"{label}: {what}: {module_name} has no {attribute or 'plugin'!r} "
                "(name the class as 'module:Class', or export it as 'plugin')"
            )
    if not (isinstance(target, type) and issubclass(target, Plugin)):
        raise ConfigError(f"{label}: {what} is not a dbkeeper plugin (a Plugin subclass)")
    return target


def _where(cls: type[Plugin]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
