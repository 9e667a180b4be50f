"""dbkeeper's bookkeeping tables, defined once.

``alembic_version`` is Alembic's (the current revision); ``schema_migrations`` is dbkeeper's
(every attempt to apply, revert or adopt a revision). Neither belongs to the bot's schema: drift
detection, autogenerate (``alembic_env.include_object``), record counts and row counts leave
them out.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, Text

VERSION_TABLE = "alembic_version"
HISTORY_TABLE = "schema_migrations"

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


BOOKKEEPING_TABLES = frozenset({HISTORY_TABLE, VERSION_TABLE})


def is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING_TABLES
