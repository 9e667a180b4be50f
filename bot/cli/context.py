"""What every verb needs: the settings (loaded once, errors reported plainly) and the plugin."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from dbkeeper.config import ConfigError, Settings, load_settings
from dbkeeper.logs import setup_logging

F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR = 1
EXIT_CONFIG = 2


class CliContext:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(
                    self.config_path, required=self.config_path is not None
                )
            except ConfigError as error:
                click.echo(f"dbkeeper: {error}", err=True)
                raise SystemExit(EXIT_CONFIG) from None
            setup_logging(self._settings.logging.level, self._settings.secrets())
        return self._settings

    def database_plugin(self) -> Any:
        from dbkeeper.plugins.database import DatabasePlugin

        return DatabasePlugin(self.settings)


def fails_plainly(function: F) -> F:
    """Turn the plugin's operator-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dbkeeper.plugins.database.errors import DatabaseError

        try:
            return function(*args, **kwargs)
        except DatabaseError as error:
            click.echo(f"dbkeeper: error: {error}", err=True)
            raise SystemExit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]
