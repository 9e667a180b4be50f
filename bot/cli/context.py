"""What every verb needs: the settings (loaded once, errors reported plainly) and plain errors."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from dbkeeper.config import ConfigError, Settings, load_settings
from dbkeeper.logs import redact, setup_logging
from dbkeeper.plugin import OperatorError, Plugin

F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR = 1
EXIT_CONFIG = 2
# Errors of the machine, not of dbkeeper: one line, never a traceback.
PLAIN_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class CliContext:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._error: ConfigError | None = None

    def _load(self) -> Settings:
        if self._settings is None and self._error is None:
            try:
                self._settings = load_settings(
                    self.config_path, required=self.config_path is not None
                )
            except ConfigError as error:
                self._error = error
        if self._error is not None:
            raise self._error
        assert self._settings is not None
        return self._settings

    @property
    def settings(self) -> Settings:
        """The settings; a bad configuration ends the process with one line, status 2."""
        try:
            settings = self._load()
        except ConfigError as error:
            click.echo(f"dbkeeper: {error}", err=True)
            raise SystemExit(EXIT_CONFIG) from None
        setup_logging(settings.logging.level, settings.secrets())
        return settings

    def plugin_classes(self) -> list[type[Plugin]]:
        """The plugins of this configuration, for their sub-commands; with a bad configuration
        only the installed ones (the error is reported when a command needs the settings)."""
        try:
            return list(self._load().plugins)
        except ConfigError:
            from dbkeeper.loader import plugin_classes

            try:
                return plugin_classes([], {}, embedded=True)
            except ConfigError:
                return []


def fails_plainly(function: F) -> F:
    """Turn operator-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except OperatorError as error:
            click.echo(f"dbkeeper: error: {error}", err=True)
            raise SystemExit(EXIT_ERROR) from None
        except OSError as error:
            if error.errno not in PLAIN_ERRNOS:
                raise
            where = f" ({error.filename})" if error.filename else ""
            click.echo(
                f"dbkeeper: error: {PLAIN_ERRNOS[error.errno]}{redact(where)}; nothing "
                "half-done was kept",
                err=True,
            )
            raise SystemExit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]
