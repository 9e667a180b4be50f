"""The one engine factory: every connection dbkeeper opens is made here, for one purpose.

==============  ===========================================================================
``app``         the bot's work: pooled; SQLite in WAL with a busy timeout and foreign keys
                on; PostgreSQL pre-pinged (a restarted server's dead connections are
                replaced, not handed out).
``migrations``  schema changes: no pool; SQLite with foreign keys off, since Alembic's
                batch mode rebuilds tables by copy-and-rename (the migrator checks
                ``PRAGMA foreign_key_check`` before each commit instead).
``probe``       health checks and statistics: no pool, read-only, every wait bounded by
                ``timeout``. A fresh connection per check fails within ``connect_timeout``
                when the server stopped answering, where a pooled one would block; a fresh
                SQLite connection reads what is on disk now and never creates the file.
``leader``      the leader lock: no pool, named after the instance so that every
                instance can see who leads.
``tool``        a short task of dbkeeper's own (a backup's snapshot), bounded by ``timeout``.
``maintenance`` database care's own writes (retention batches, size samples, space reclaim,
                ``ANALYZE``/``VACUUM``): no pool, so it is never timed with the bot's
                statements; SQLite in autocommit (each step says where its transaction
                begins and ends), foreign keys on, never creating the file.
==============  ===========================================================================

New SQLite databases are created with ``auto_vacuum = INCREMENTAL``: free pages can then be
given back to the file system in short steps (``care.maintenance``) instead of a ``VACUUM``
that blocks writers while it rewrites the whole file. An existing database keeps its mode
until something runs ``VACUUM`` on it.

SQLite connections: the stdlib driver does not BEGIN before DDL or SELECT, so SQLAlchemy emits
BEGIN itself (the recipe in SQLAlchemy's SQLite documentation): a revision's DDL then commits
or rolls back as one unit.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from .settings import DatabaseSettings, normalize_database_url

Purpose = Literal["app", "migrations", "probe", "leader", "tool", "maintenance"]
# Execution option naming the kind of BEGIN SQLite connections emit: DEFERRED, IMMEDIATE.
SQLITE_BEGIN = "dbkeeper_sqlite_begin"
# Every engine this factory made, and those an env.py makes while dbkeeper migrates: anything
# else that opens the bot's database is the bot's own.
OWN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_adopting = threading.local()


@contextlib.contextmanager
def adopting() -> Iterator[None]:
    """Engines that connect on this thread meanwhile are dbkeeper's (an Alembic env.py that
    builds its own engine while dbkeeper runs it)."""
    _adopting.active = True
    try:
        yield
    finally:
        _adopting.active = False


def is_own(engine: Engine) -> bool:
    """Whether ``engine`` is one of dbkeeper's (or wraps one: ``execution_options()``)."""
    origin = getattr(engine, "_proxied", engine)
    if origin in OWN_ENGINES:
        return True
    if getattr(_adopting, "active", False):
        OWN_ENGINES.add(origin)
        return True
    return False


APPLICATION_NAMES = {
    "app": "dbkeeper-app",
    "migrations": "dbkeeper-migrations",
    "probe": "dbkeeper-health",
    "leader": "dbkeeper-leader",
    "tool": "dbkeeper-backup",
    "maintenance": "dbkeeper-maintenance",
}


def database_url(settings: DatabaseSettings) -> URL:
    return make_url(normalize_database_url(settings.url))


def safe_url(url: URL | str) -> str:
    """The URL as it may be shown to people: without the password."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for other engines."""
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database or "")


def create_database_engine(
    settings: DatabaseSettings,
    purpose: Purpose = "app",
    *,
    timeout: float | None = None,
    name: str = "",
) -> Engine:
    """An engine for ``purpose`` (see the module docstring).

    ``timeout`` bounds every wait of a ``probe`` or ``tool`` connection; ``name`` is appended
    to the PostgreSQL ``application_name`` (the leader's instance name).
    """
    url = database_url(settings)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, settings, purpose, timeout)
    else:
        engine = _postgresql_engine(url, settings, purpose, timeout, name)
    OWN_ENGINES.add(engine)
    return engine


def _sqlite_engine(
    url: URL, settings: DatabaseSettings, purpose: Purpose, timeout: float | None
) -> Engine:
    busy_ms = int(settings.busy_timeout_ms)
    if timeout is not None:
        busy_ms = int(min(busy_ms, timeout * 1000))
    if purpose in ("probe", "leader", "tool", "maintenance"):
        file = sqlite_file(url)
        assert file is not None
        # mode=rw: a check never creates a database that is not there.
        engine = create_engine(
            "sqlite://",
            poolclass=NullPool,
            creator=lambda: sqlite3.connect(
                f"file:{quote(str(file.absolute()))}?mode=rw", uri=True, check_same_thread=False
            ),
        )

        @event.listens_for(engine, "connect")
        def _configure_probe(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # autocommit: no transaction held open
            dbapi_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if purpose == "probe":
                dbapi_connection.execute("PRAGMA query_only = ON")  # checks never write
            if purpose == "maintenance":
                dbapi_connection.execute("PRAGMA foreign_keys = ON")

        return engine

    kwargs: dict[str, Any] = {}
    if purpose == "migrations":
        kwargs["poolclass"] = NullPool
    engine = create_engine(url, **kwargs)
    foreign_keys = "OFF" if purpose == "migrations" else "ON"

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN (see module doc)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if cursor.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new database, before WAL mode writes its first page. (On an existing one
                # the pragma could write the header, and wait for another writer's lock.)
                cursor.execute("PRAGMA auto_vacuum = INCREMENTAL")
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


def _postgresql_engine(
    url: URL,
    settings: DatabaseSettings,
    purpose: Purpose,
    timeout: float | None,
    name: str,
) -> Engine:
    connect = (
        settings.connect_timeout_seconds
        if timeout is None
        else min(settings.connect_timeout_seconds, timeout)
    )
    application = f"{APPLICATION_NAMES[purpose]} {name or f'pid {os.getpid()}'}"[:63]
    connect_args: dict[str, Any] = {
        # libpq: whole seconds, and 1 means 2.
        "connect_timeout": max(2, math.ceil(connect)),
        "application_name": application,
    }
    if purpose == "probe" and timeout is not None:
        statement_ms = max(1, int(timeout * 1000))
        connect_args["options"] = (
            f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} "
            "-c default_transaction_read_only=on"
        )
    if purpose != "app":
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    return create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_seconds,
        pool_pre_ping=True,
        connect_args=connect_args,
    )
