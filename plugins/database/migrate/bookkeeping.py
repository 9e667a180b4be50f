"""dbkeeper's bookkeeping tables, defined once.

``alembic_version`` is Alembic's (the current revision); ``schema_migrations`` is dbkeeper's
(every attempt to apply, revert or adopt a revision); ``dbkeeper_leader`` is the leader's lease
on PostgreSQL (one row: who leads, and its heartbeat; see ``leadership.py``);
``dbkeeper_size_samples`` is database care's size history (``care.growth``); Litestream adds two
of its own to a replicated SQLite database (``REPLICATION_TABLES``). None belongs to the
bot's schema: drift detection, autogenerate (``alembic_env.include_object``), record counts and
row counts leave them out.
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
LEADER_TABLE = "dbkeeper_leader"
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

# Its own MetaData: the leader election creates it, on PostgreSQL only (SQLite instances share
# one machine and elect with a file lock), not the migrator with ``schema_migrations``.
leader_metadata = MetaData()
dbkeeper_leader = Table(
    LEADER_TABLE,
    leader_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one lease
    Column("holder", String(255), nullable=False),  # the instance's name; "" when released
    Column("token", String(64), nullable=False),  # the holder's claim; "" when released
    Column("term", BigInteger, nullable=False),  # +1 with every claim
    Column("beat", BigInteger, nullable=False),  # +1 with every renewal: the heartbeat
    Column("renewed_at", DateTime(timezone=True)),  # for people: nobody compares clocks
)

# Litestream (replication) keeps these two in the database it replicates, and so in every copy
# restored from its replica: not the bot's either.
REPLICATION_TABLES = frozenset({"_litestream_seq", "_litestream_lock"})
BOOKKEEPING_TABLES = (
    frozenset({HISTORY_TABLE, VERSION_TABLE, LEADER_TABLE, SIZE_TABLE}) | REPLICATION_TABLES
)


def is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING_TABLES
