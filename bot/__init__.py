"""dbkeeper keeps a Telegram bot's database alive: a bot host whose main loop loads plugins,
and a database plugin that migrates, checks, backs up and restores any bot's schema.

``dbkeeper.install(application)`` adds it to a bot built with PTB's ``ApplicationBuilder``;
``dbkeeper.run(application)`` runs that bot (see ``dbkeeper.embed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from dbkeeper.app import LOCAL_MODE_TOKEN
    from dbkeeper.embed import application_builder, install, run

__all__ = ["LOCAL_MODE_TOKEN", "__version__", "application_builder", "install", "run"]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: ``import dbkeeper`` stays light."""
    if name in ("application_builder", "install", "run"):
        from dbkeeper import embed

        return getattr(embed, name)
    if name == "LOCAL_MODE_TOKEN":
        from dbkeeper.app import LOCAL_MODE_TOKEN

        return LOCAL_MODE_TOKEN
    raise AttributeError(f"module 'dbkeeper' has no attribute {name!r}")
