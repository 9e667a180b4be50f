"""dbkeeper's bookkeeping tables, defined once.

``alembic_version`` is Alembic's (the current revision); ``schema_migrations`` is dbkeeper's
(every attempt to apply, revert or adopt a revision); ``dbkeeper_size_samples`` is database
care's size history (``care.growth``). None belongs to the bot's schema: drift detection,
autogenerate (``alembic_env.include_object``), record counts and row counts leave them out.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

VERSION_TABLE = "alembic_version"
HISTORY_TABLE = "schema_migrations"
SIZE_TABLE = "dbkeeper_size_samples"

bookkeeping_metadata = MetaData()
schema_migrations = Table(
    HISTORY_TABLE,
    bookkeeping_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(64), nullable=False, index=True),
    Column("description", String(255), nullable=False, default=""),
    Column("direction", String(16), nullable=False),  # upgrade | downgrade | baseline
    Column("attempt", Integer, nullable=False, default=1),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("execution_ms", Integer),
    Column("success", Boolean),  # NULL: running, or interrupted if nobody runs it any more
    Column("error", Text),
    Column("checksum", String(64)),
    Column("host", String(255), nullable=False, default=""),
    Column("pid", Integer, nullable=False, default=0),
)

# One row per size sample: taken at health checks (no closer than their interval), thinned to
# one a day once older than two days (``care.growth``).
size_samples = Table(
    SIZE_TABLE,
    bookkeeping_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("taken_at", DateTime(timezone=True), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),  # the database (SQLite: pages in use too)
    Column("disk_free_bytes", BigInteger),  # its volume; NULL where it cannot be seen
)


BOOKKEEPING_TABLES = frozenset({HISTORY_TABLE, VERSION_TABLE, SIZE_TABLE})
# Backed up and verified like any table, but not counted in a backup's rows: every health check
# adds to them, so the count would change between two backups of the same data.
UNCOUNTED_TABLES = frozenset({SIZE_TABLE})


def is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING_TABLES
