"""SQLAlchemy engines configured for a bot: SQLite tuned for one busy process, PostgreSQL pooled.

SQLite connections get WAL (readers never block the writer, backups stay consistent), a busy
timeout (a locked database waits instead of failing at once) and foreign keys. The stdlib driver
does not BEGIN before DDL or SELECT, so SQLAlchemy emits BEGIN itself (the recipe in SQLAlchemy's
SQLite documentation): a revision's DDL then commits or rolls back as one unit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from dbkeeper.config import DatabaseSettings, normalize_database_url
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

Purpose = Literal["app", "migrations"]
# Execution option naming the kind of BEGIN SQLite connections emit: DEFERRED, IMMEDIATE.
SQLITE_BEGIN = "dbkeeper_sqlite_begin"


def database_url(settings: DatabaseSettings) -> URL:
    return make_url(normalize_database_url(settings.url))


def safe_url(url: URL | str) -> str:
    """The URL as it may be shown to people: without the password."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases and other engines."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    return Path(database)


def create_database_engine(settings: DatabaseSettings, purpose: Purpose = "app") -> Engine:
    """An engine for the bot's queries (``app``) or for schema changes (``migrations``).

    Migration connections are short-lived (no pool) and, on SQLite, run with foreign keys off:
    Alembic's batch mode rebuilds tables by copy-and-rename, which would cascade or fail with
    them on. The migrator checks ``PRAGMA foreign_key_check`` before each commit instead.
    """
    url = database_url(settings)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, settings, purpose)
    return _postgresql_engine(url, settings, purpose)


def _sqlite_engine(url: URL, settings: DatabaseSettings, purpose: Purpose) -> Engine:
    kwargs: dict[str, Any] = {}
    if purpose == "migrations":
        kwargs["poolclass"] = NullPool
    engine = create_engine(url, **kwargs)
    busy_timeout = int(settings.busy_timeout_ms)
    foreign_keys = "OFF" if purpose == "migrations" else "ON"

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN (see module doc)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout}")
            if sqlite_file(url) is not None:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute(f"PRAGMA foreign_keys = {foreign_keys}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgresql_engine(url: URL, settings: DatabaseSettings, purpose: Purpose) -> Engine:
    connect_args = {
        "connect_timeout": max(1, round(settings.connect_timeout_seconds)),
        "application_name": f"dbkeeper-{purpose} pid {os.getpid()}",
    }
    if purpose == "migrations":
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    return create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_seconds,
        pool_pre_ping=True,  # a restarted server's dead connections are replaced, not returned
        connect_args=connect_args,
    )
