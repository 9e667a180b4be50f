"""Typed settings from a TOML file, environment overrides and built-in defaults.

Every key is declared once, in the dataclasses below, with its type, default and the rule its
value must satisfy. Loading walks the file against those declarations, so an unknown key, a
value of the wrong type or an impossible value stops startup with one message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_OVERRIDES = {
    "TELEGRAM_BOT_TOKEN": ("telegram", "token"),
    "DATABASE_URL": ("database", "url"),
}
DEFAULT_CONFIG_PATH = Path("config.toml")
SECRET_KEYS = {("telegram", "token"), ("telegram", "webhook_secret"), ("database", "url")}


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key."""


Check = Callable[[Any], str | None]


def _setting(default: Any, check: Check | None = None, *, doc: str = "") -> Any:
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"check": check, "doc": doc})


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        return "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def non_negative_each(values: tuple[float, ...]) -> str | None:
    if not values:
        return "must list at least one delay"
    return None if all(v >= 0 for v in values) else "delays must not be negative"


def http_url_or_empty(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return "must be empty or start with http:// or https://"


def database_url(value: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(normalize_database_url(value))
    except ArgumentError:
        return "is not a database URL (expected sqlite:///path or postgresql+psycopg://...)"
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        return f"uses {url.get_backend_name()!r}; dbkeeper supports sqlite and postgresql"
    return None


def directory_or_empty(value: str) -> str | None:
    if not value or Path(value).is_dir():
        return None
    return "must be empty or an existing directory"


def log_level(value: str) -> str | None:
    return one_of("DEBUG", "INFO", "WARNING", "ERROR")(value.upper())


def normalize_database_url(url: str) -> str:
    """Map driverless PostgreSQL URLs (as hosting providers hand them out) to psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class TelegramSettings:
    token: str = _setting("", doc="empty and no TELEGRAM_BOT_TOKEN: local mode")
    admin_ids: tuple[int, ...] = _setting((), doc="Telegram user ids allowed to run admin commands")
    alert_chat_id: int = _setting(0, doc="0: alerts go to each admin's private chat")
    api_base_url: str = _setting("", http_url_or_empty, doc="e.g. a local Bot API server")
    webhook_url: str = _setting("", http_url_or_empty, doc="set: webhook mode; empty: polling")
    webhook_port: int = _setting(8443, port, doc="port of PTB's webhook server")
    webhook_listen: str = _setting("0.0.0.0", doc="address PTB's webhook server binds")
    webhook_secret: str = _setting("", doc="checked on every webhook request; empty: none")
    local_bot_api: bool = _setting(False, doc="api_base_url is a local Bot API (2000 MB uploads)")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = _setting("sqlite:///data/bot.db", database_url, doc="SQLAlchemy URL")
    connect_retries: int = _setting(3, at_least(1), doc="connection attempts at startup")
    retry_backoff_seconds: tuple[float, ...] = _setting(
        (1, 2, 3), non_negative_each, doc="waits between attempts; the last one repeats"
    )
    busy_timeout_ms: int = _setting(5000, at_least(0), doc="SQLite: wait this long for a lock")
    pool_size: int = _setting(5, at_least(1), doc="PostgreSQL: connections kept open")
    max_overflow: int = _setting(10, at_least(0), doc="PostgreSQL: extra connections at peaks")
    pool_timeout_seconds: float = _setting(30, positive, doc="wait this long for a free connection")
    connect_timeout_seconds: float = _setting(10, positive, doc="PostgreSQL: TCP connect timeout")


@dataclass(frozen=True)
class MigrationSettings:
    auto_upgrade: bool = _setting(True, doc="apply pending revisions at startup")
    retries: int = _setting(3, at_least(1), doc="attempts per revision on transient errors")
    critical_tables: tuple[str, ...] = _setting((), doc="empty: every table of the head schema")
    lock_timeout_seconds: float = _setting(
        600, positive, doc="wait this long for another instance's migration"
    )
    script_location: str = _setting("", doc="empty: dbkeeper's own migrations/ directory")


@dataclass(frozen=True)
class HealthSettings:
    interval_seconds: float = _setting(300, positive, doc="seconds between health checks")
    size_warning_mb: float = _setting(500, positive, doc="database size that degrades health")
    http_host: str = _setting("127.0.0.1", doc="address of the health HTTP API")
    http_port: int = _setting(3001, port, doc="port of the health HTTP API")
    check_timeout_seconds: float = _setting(10, positive, doc="a check slower than this fails")
    alert_repeat_seconds: float = _setting(
        14400, positive, doc="remind the admins this often while a problem lasts"
    )
    http_cache_seconds: float = _setting(
        10, positive, doc="HTTP answers reuse a health result this recent (one check for many)"
    )
    quick_check_max_mb: float = _setting(
        32, at_least(0), doc="SQLite: quick_check on every check up to this size"
    )
    integrity_interval_seconds: float = _setting(
        3600, positive, doc="SQLite above quick_check_max_mb: quick_check this often"
    )


@dataclass(frozen=True)
class BackupSettings:
    dir: str = _setting("data/backups", doc="where backups are written")
    interval_seconds: float = _setting(86400, positive, doc="seconds between scheduled backups")
    keep: int = _setting(7, at_least(1), doc="newest backups kept by rotation")
    compression: str = _setting("gzip", one_of("gzip", "zstd", "none"), doc="gzip | zstd | none")
    compress_min_bytes: int = _setting(1048576, at_least(0), doc="smaller backups stay raw")
    on_shutdown: bool = _setting(True, doc="take a final backup when the bot stops")
    send_to_chat: bool = _setting(False, doc="/backup also uploads the file to the admin")
    pg_bin_dir: str = _setting(
        "", directory_or_empty, doc="PostgreSQL: directory of pg_dump and pg_restore; empty: PATH"
    )


@dataclass(frozen=True)
class InstanceSettings:
    name: str = _setting("", doc="this instance's name in answers; empty: host:pid")
    leader_poll_seconds: float = _setting(
        5, positive, doc="how often instances check who leads (a standby takes over in two polls)"
    )

    @property
    def display_name(self) -> str:
        """The configured name, or ``host:pid``: unique among instances, and says where to look."""
        return self.name or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ShutdownSettings:
    timeout_seconds: float = _setting(9, positive, doc="budget for the whole graceful shutdown")


@dataclass(frozen=True)
class LoggingSettings:
    level: str = _setting("INFO", log_level, doc="DEBUG | INFO | WARNING | ERROR")


@dataclass(frozen=True)
class Settings:
    telegram: TelegramSettings = field(default_factory=TelegramSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    migrations: MigrationSettings = field(default_factory=MigrationSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
    instance: InstanceSettings = field(default_factory=InstanceSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = field(default="built-in defaults", compare=False)

    @property
    def local_mode(self) -> bool:
        """No bot token: the database plugin runs without Telegram."""
        return not self.telegram.token

    def secrets(self) -> list[str]:
        """Values that must never reach logs, chat messages or HTTP answers."""
        from sqlalchemy.engine import make_url

        found = [v for v in (self.telegram.token, self.telegram.webhook_secret) if v]
        password = make_url(self.database.url).password
        if password:
            found.append(str(password))
        return found


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in dataclasses.fields(Settings)
    if f.name != "source"
}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    required: bool = False,
) -> Settings:
    """Read settings from ``path`` (default ``config.toml``) and the environment.

    A missing file means built-in defaults, unless ``required`` (the path was given explicitly).
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if config_path.is_file():
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{config_path}: cannot be read: {exc.strerror}") from None
        source = str(config_path)
    elif required:
        raise ConfigError(f"{config_path}: no such configuration file")
    return settings_from_mapping(raw, environ=environ, source=source)


def settings_from_mapping(
    raw: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "built-in defaults",
) -> Settings:
    """Build settings from an already-parsed TOML document plus environment overrides."""
    label = source if source != "built-in defaults" else "configuration"
    data = {name: dict(values) for name, values in raw.items() if isinstance(values, Mapping)}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{label}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{label}: [{name}] must be a table of keys, not a value")
    from_env: dict[tuple[str, str], str] = {}
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = (environ or {}).get(variable)
        if value:
            data.setdefault(section, {})[key] = value
            from_env[(section, key)] = variable
    sections = {
        name: _build_section(name, cls, data.get(name, {}), label, from_env)
        for name, cls in SECTIONS.items()
    }
    return Settings(**sections, source=source)


def _build_section(
    name: str,
    cls: type,
    values: Mapping[str, Any],
    label: str,
    from_env: Mapping[tuple[str, str], str],
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{label}: unknown key [{name}] {key} (known keys: {', '.join(fields)})"
            )
        where = f"{label}: [{name}] {key}"
        if (name, key) in from_env:
            where = f"environment: {from_env[(name, key)]} ([{name}] {key})"
        secret = (name, key) in SECRET_KEYS
        converted = _convert(value, hints[key], where, secret)
        check = fields[key].metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(f"{where} = {_show(value, secret)}: {problem}")
        kwargs[key] = converted
    return cls(**kwargs)


def _convert(value: Any, hint: Any, where: str, secret: bool = False) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(
                f"{where}: expected a list of {_type_name(item_type)}, got {_show(value, secret)}"
            )
        return tuple(_convert(item, item_type, where, secret) for item in value)
    if isinstance(hint, types.UnionType):
        raise TypeError(f"unsupported setting type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            raise ConfigError(f"{where}: must be a finite number, got {value}")
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a declaration error, not a user error
        raise TypeError(f"unsupported setting type {hint}")
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {_show(value, secret)}")


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _show(value: Any, secret: bool = False) -> str:
    if secret:
        return _hide_secret(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _hide_secret(value: Any) -> str:
    """Show a database URL without its password; show nothing of a token."""
    if isinstance(value, str) and "://" in value:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            return f'"{make_url(value).render_as_string(hide_password=True)}"'
        except ArgumentError:
            pass
    return "(value hidden)"


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the source of ``config.example.toml``."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((section, f.name, f.default, f.metadata.get("doc", "")))
    return rows
