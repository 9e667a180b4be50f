"""Typed settings from a TOML file, environment overrides and built-in defaults.

Every key is declared once, in a section dataclass, with its type, default and the rule its
value must satisfy (:func:`setting`). The host declares its own sections (``[bot]``,
``[telegram]``, ``[health]``, ``[instance]``, ``[shutdown]``, ``[logging]``); each plugin
declares the sections it owns (``Plugin.sections``). Loading walks the file against those
declarations, so an unknown section or key, a value of the wrong type or an impossible value
stops startup with one message naming the key.

Which plugins are loaded is itself configuration (``[bot] plugins``), so loading reads the
host's sections first, finds the plugins (``dbkeeper.loader``), then checks their sections.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dbkeeper.plugin import Plugin

DEFAULT_CONFIG_PATH = Path("config.toml")
T = TypeVar("T")
# Upper bound of every interval and timeout: a year. Larger values are typos, and an unbounded
# float reaches APScheduler and asyncio as an OverflowError.
MAX_SECONDS = 365 * 86400.0


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key."""


Check = Callable[[Any], str | None]


def setting(
    default: Any,
    check: Check | None = None,
    *,
    doc: str = "",
    secret: bool = False,
    env: str | None = None,
    unset: bool = False,
) -> Any:
    """Declare one key of a section: its default, its rule, and what it means.

    ``secret``: never shown in errors, logs or answers (for a URL: its password only).
    ``env``: an environment variable that overrides the file.
    ``unset``: leaving the key out means something of its own (``Settings.is_set``); the
    example configuration shows it commented out.
    """
    if isinstance(default, list):
        default = tuple(default)
    return field(
        default=default,
        metadata={"check": check, "doc": doc, "secret": secret, "env": env, "unset": unset},
    )


def entries(item: type, *, example: str, doc: str = "") -> Any:
    """Declare that the section's other keys are names of the user's choosing, each a small
    table of the keys ``item`` declares (itself declared with :func:`setting`)::

        [retention]
        events = { column = "created_at", keep_days = 30 }

    The field holds ``{name: item}``. Errors name the key as ``[retention] events.keep_days``.
    ``example``: the name the example configuration shows (commented out).
    """
    return field(
        default_factory=dict,
        metadata={"entries": item, "doc": doc, "example": example, "unset": True},
    )


# -- rules -------------------------------------------------------------------------------------


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def seconds(minimum: float = 0.0) -> Check:
    """A duration in seconds: greater than 0, at least ``minimum``, at most a year."""

    def check(value: float) -> str | None:
        if value <= 0:
            return "must be greater than 0"
        if value < minimum:
            return f"must be at least {minimum:g}"
        if value > MAX_SECONDS:
            return f"must be at most {MAX_SECONDS:.0f} (a year)"
        return None

    return check


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum:g}"


def between(low: float, high: float) -> Check:
    return lambda value: None if low <= value <= high else f"must be between {low:g} and {high:g}"


def one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        return "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def http_url_or_empty(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return "must be empty or start with http:// or https://"


def log_level(value: str) -> str | None:
    return one_of("DEBUG", "INFO", "WARNING", "ERROR")(value.upper())


def import_strings(values: tuple[str, ...]) -> str | None:
    for value in values:
        module, _, attribute = value.partition(":")
        names = module.split(".") + (attribute.split(".") if attribute else [])
        if not all(name.isidentifier() for name in names):
            return f"{value!r} is not an import string such as 'package.module' or 'module:Class'"
    return None


# -- the host's sections -------------------------------------------------------------------------


@dataclass(frozen=True)
class BotSettings:
    plugins: tuple[str, ...] = setting(
        (),
        import_strings,
        doc=(
            "feature plugins to load (import strings) besides those installed under the "
            "entry-point group dbkeeper.plugins; not set: the example feature when the schema "
            "is dbkeeper's example schema, else none"
        ),
        unset=True,
    )


@dataclass(frozen=True)
class TelegramSettings:
    token: str = setting(
        "", doc="empty and no TELEGRAM_BOT_TOKEN: local mode", secret=True, env="TELEGRAM_BOT_TOKEN"
    )
    admin_ids: tuple[int, ...] = setting((), doc="Telegram user ids allowed to run admin commands")
    alert_chat_id: int = setting(0, doc="0: alerts go to each admin's private chat")
    api_base_url: str = setting("", http_url_or_empty, doc="e.g. a local Bot API server")
    webhook_url: str = setting("", http_url_or_empty, doc="set: webhook mode; empty: polling")
    webhook_port: int = setting(8443, port, doc="port of PTB's webhook server")
    webhook_listen: str = setting("0.0.0.0", doc="address PTB's webhook server binds")
    webhook_secret: str = setting(
        "", doc="checked on every webhook request; empty: none", secret=True
    )
    local_bot_api: bool = setting(False, doc="api_base_url is a local Bot API (2000 MB uploads)")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HealthSettings:
    interval_seconds: float = setting(300, seconds(), doc="seconds between health checks")
    size_warning_mb: float = setting(500, positive, doc="database size that degrades health")
    http_host: str = setting(
        "127.0.0.1", doc="address of the health HTTP API", env="DBKEEPER_HTTP_HOST"
    )
    http_port: int = setting(
        3001, port, doc="port of the health HTTP API", env="DBKEEPER_HTTP_PORT"
    )
    http_token: str = setting(
        "",
        doc=(
            "required when http_host is not a loopback address: the status page, /health, "
            "/api/* and /metrics ask for it (Bearer, or Basic with it as the password)"
        ),
        secret=True,
        env="DBKEEPER_HTTP_TOKEN",
    )
    check_timeout_seconds: float = setting(10, seconds(), doc="a check slower than this fails")
    alert_repeat_seconds: float = setting(
        14400, seconds(), doc="remind the admins this often while a problem lasts"
    )
    http_cache_seconds: float = setting(
        10, seconds(), doc="HTTP answers reuse a health result this recent (one check for many)"
    )
    quick_check_max_mb: float = setting(
        32, at_least(0), doc="SQLite: quick_check on every check up to this size"
    )
    integrity_interval_seconds: float = setting(
        3600, seconds(), doc="SQLite above quick_check_max_mb: quick_check this often"
    )

    def problems(self) -> Iterator[tuple[str, str]]:
        if not is_loopback(self.http_host) and not self.http_token:
            yield (
                "http_token",
                f"is required when http_host ({self.http_host}) is not a loopback address: "
                "the operators' pages and metrics must not be open to the network (or set "
                "DBKEEPER_HTTP_TOKEN)",
            )
        elif self.http_token and len(self.http_token) < 16:
            yield "http_token", "must be at least 16 characters (e.g. `openssl rand -hex 16`)"


@dataclass(frozen=True)
class InstanceSettings:
    name: str = setting("", doc="this instance's name in answers; empty: host:pid")
    leader_poll_seconds: float = setting(
        5,
        seconds(0.1),
        doc=(
            "P: the leader renews its lease every P and steps down 2P after its last renewal; "
            "a standby takes over within 4P of its death, 6P of it hanging"
        ),
    )

    @property
    def display_name(self) -> str:
        """The configured name, or ``host:pid``: unique among instances, and says where to look."""
        return self.name or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ShutdownSettings:
    timeout_seconds: float = setting(9, seconds(), doc="budget for the whole graceful shutdown")


@dataclass(frozen=True)
class LoggingSettings:
    level: str = setting("INFO", log_level, doc="DEBUG | INFO | WARNING | ERROR")


HOST_SECTIONS: dict[str, type] = {
    "bot": BotSettings,
    "telegram": TelegramSettings,
    "health": HealthSettings,
    "instance": InstanceSettings,
    "shutdown": ShutdownSettings,
    "logging": LoggingSettings,
}


# -- the settings of one run ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every section of one configuration: the host's, and those of the plugins it loads.

    Sections are attributes (``settings.telegram``, ``settings.backup``); typed code asks for
    a section by its class (``settings.section(BackupSettings)``).
    """

    sections: Mapping[str, Any]
    plugins: tuple[type[Plugin], ...] = ()
    source: str = field(default="built-in defaults", compare=False)
    explicit: frozenset[tuple[str, str]] = field(default=frozenset(), compare=False)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"no configuration section [{name}]")

    @property
    def bot(self) -> BotSettings:
        return typing.cast(BotSettings, self.sections["bot"])

    @property
    def telegram(self) -> TelegramSettings:
        return typing.cast(TelegramSettings, self.sections["telegram"])

    @property
    def health(self) -> HealthSettings:
        return typing.cast(HealthSettings, self.sections["health"])

    @property
    def instance(self) -> InstanceSettings:
        return typing.cast(InstanceSettings, self.sections["instance"])

    @property
    def shutdown(self) -> ShutdownSettings:
        return typing.cast(ShutdownSettings, self.sections["shutdown"])

    @property
    def logging(self) -> LoggingSettings:
        return typing.cast(LoggingSettings, self.sections["logging"])

    def section(self, cls: type[T]) -> T:
        """The section declared by ``cls`` (``ConfigError`` if no loaded plugin declares it)."""
        for value in self.sections.values():
            if type(value) is cls:
                return value
        raise ConfigError(f"no loaded plugin declares the section {cls.__name__}")

    def is_set(self, section: str, key: str) -> bool:
        """Whether ``[section] key`` was given (file or environment), not defaulted."""
        return (section, key) in self.explicit

    @property
    def local_mode(self) -> bool:
        """No bot token: the plugins run without Telegram."""
        return not self.telegram.token

    def secrets(self) -> list[str]:
        """Values that must never reach logs, chat messages or HTTP answers."""
        found: list[str] = []
        for value in self.sections.values():
            for f in dataclasses.fields(value):
                if f.metadata.get("secret"):
                    found += _secret_parts(getattr(value, f.name))
        return found

    def with_section(self, name: str, **changes: Any) -> Settings:
        """A copy with some keys of one section changed (checked like the file's)."""
        current = self.sections[name]
        values: dict[str, Any] = {}
        for f in dataclasses.fields(current):
            if f.metadata.get("entries"):  # named tables: their names are the keys
                values.update(getattr(current, f.name))
            else:
                values[f.name] = getattr(current, f.name)
        for key in changes:
            if key not in values:
                raise ConfigError(f"unknown key [{name}] {key}")
        values.update(changes)
        updated = _build_section(name, type(current), values, "configuration", {})
        return dataclasses.replace(self, sections={**self.sections, name: updated})


def _secret_parts(value: Any) -> list[str]:
    """A secret value as it may appear in text: itself, or a URL's password."""
    if not isinstance(value, str) or not value:
        return []
    if "://" in value:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            password = make_url(value).password
        except (ArgumentError, ValueError):
            return [value]
        return [str(password)] if password else []
    return [value]


# -- loading -----------------------------------------------------------------------------------


def config_directory(path: str | os.PathLike[str] | None) -> Path:
    """The directory a configuration belongs to: the file's, or where it would be."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    return config_path.absolute().parent


def make_importable(directory: Path) -> None:
    """Let ``[bot] plugins``, ``[migrations] metadata`` and an Alembic ``env.py`` import the
    user's own modules from the configuration's directory."""
    entry = str(directory)
    if entry not in sys.path:
        sys.path.insert(0, entry)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    required: bool = False,
    embedded: bool = False,
) -> Settings:
    """Read settings from ``path`` (default ``config.toml``) and the environment.

    A missing file means built-in defaults, unless ``required`` (the path was given explicitly).
    ``embedded``: dbkeeper runs inside someone else's bot (see ``dbkeeper.embed``).
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
    make_importable(config_directory(config_path))
    return settings_from_mapping(raw, environ=environ, source=source, embedded=embedded)


def settings_from_mapping(
    raw: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "built-in defaults",
    embedded: bool = False,
    plugins: Iterable[type[Plugin]] | None = None,
) -> Settings:
    """Build settings from an already-parsed TOML document plus environment overrides.

    ``plugins``: the plugin classes whose sections to accept; by default those the
    configuration names (``dbkeeper.loader.plugin_classes``).
    """
    from dbkeeper.loader import plugin_classes

    label = source if source != "built-in defaults" else "configuration"
    for name, values in raw.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{label}: [{name}] must be a table of keys, not a value")
    data = {name: dict(values) for name, values in raw.items()}
    from_env: dict[tuple[str, str], str] = {}
    explicit = {(name, key) for name, values in data.items() for key in values}

    def build(name: str, cls: type) -> Any:
        values = data.setdefault(name, {})
        for f in dataclasses.fields(cls):
            variable = f.metadata.get("env")
            if variable and (environ or {}).get(variable):
                value = (environ or {})[variable]
                # An environment variable is text: a number is read as one (a port, say).
                values[f.name] = int(value) if f.type in (int, "int") and value.isdigit() else value
                from_env[(name, f.name)] = variable
                explicit.add((name, f.name))
        return _build_section(name, cls, values, label, from_env)

    sections: dict[str, Any] = {name: build(name, cls) for name, cls in HOST_SECTIONS.items()}
    bot = typing.cast(BotSettings, sections["bot"])
    if plugins is None:
        chosen = bot.plugins if ("bot", "plugins") in explicit else None
        classes = plugin_classes(chosen, raw, embedded=embedded, label=label)
    else:
        classes = list(plugins)
    for cls in classes:
        for name, section_cls in cls.sections.items():
            if name in sections:
                raise ConfigError(
                    f"{label}: plugin {cls.name} declares the section [{name}], which is "
                    "already taken"
                )
            sections[name] = build(name, section_cls)
    for name in raw:
        if name not in sections:
            raise ConfigError(f"{label}: unknown section [{name}] (known: {', '.join(sections)})")
    return Settings(sections, tuple(classes), source, frozenset(explicit))


def _build_section(
    name: str,
    cls: type,
    values: Mapping[str, Any],
    label: str,
    from_env: Mapping[tuple[str, str], str],
    scope: str = "",
) -> Any:
    """Build section ``cls`` from ``values``; ``scope`` names its keys in errors
    (``[backup] ``, or ``[retention] events.`` for a named table)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    scope = scope or f"[{name}] "
    named = next((f for f in fields.values() if f.metadata.get("entries")), None)
    if named is not None:
        fields.pop(named.name)
        kwargs[named.name] = {}
    for key, value in values.items():
        if key not in fields and named is not None:
            item = named.metadata["entries"]
            kwargs[named.name][key] = _build_entry(name, key, item, value, label)
            continue
        if key not in fields:
            raise ConfigError(
                f"{label}: unknown key {scope}{key} (known keys: {', '.join(fields)})"
            )
        where = f"{label}: {scope}{key}"
        if (name, key) in from_env:
            where = f"environment: {from_env[(name, key)]} ({scope}{key})"
        secret = bool(fields[key].metadata.get("secret"))
        converted = _convert(value, hints[key], where, secret)
        check = fields[key].metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(f"{where} = {_show(value, secret)}: {problem}")
        kwargs[key] = converted
    section = cls(**kwargs)
    check_all = getattr(section, "problems", None)
    for key, problem in check_all() if check_all is not None else ():
        raise ConfigError(f"{label}: {scope}{key}: {problem}")
    return section


def _build_entry(section: str, name: str, item: type, value: Any, label: str) -> Any:
    """One named table of an ``entries`` section: ``[retention] events = { ... }``."""
    if isinstance(value, item):  # already built (``Settings.with_section``)
        return value
    if not isinstance(value, Mapping):
        keys = ", ".join(f.name for f in dataclasses.fields(item))
        raise ConfigError(
            f"{label}: [{section}] {name}: expected a table of {keys} "
            f"(e.g. {name} = {{ ... }}), got {_show(value)}"
        )
    return _build_section(section, item, value, label, {}, scope=f"[{section}] {name}.")


def _convert(value: Any, hint: Any, where: str, secret: bool = False) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{where}: expected a list of {_type_name(item_type)}, got {_show(value, secret)}"
            )
        return tuple(_convert(item, item_type, where, secret) for item in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {_show(value, secret)}")
        _, item_type = typing.get_args(hint)
        return {str(k): _convert(v, item_type, f"{where}.{k}", secret) for k, v in value.items()}
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
        except (ArgumentError, ValueError):
            pass
    return "(value hidden)"


def describe_keys(settings: Settings | None = None) -> list[tuple[str, str, Any, str, bool]]:
    """(section, key, default, doc, unset) for every key: the source of
    ``config.example.toml``."""
    settings = settings or settings_from_mapping({}, environ={})
    rows: list[tuple[str, str, Any, str, bool]] = []
    for section, value in settings.sections.items():
        for f in dataclasses.fields(value):
            meta = f.metadata
            if meta.get("entries"):  # named tables: the example's name, shown commented out
                rows.append((section, meta["example"], {}, meta.get("doc", ""), True))
                continue
            rows.append((section, f.name, f.default, meta.get("doc", ""), meta.get("unset", False)))
    return rows
