"""Extra Alembic revisions that tests drop into a copy of migrations/ (see ``scripts_dir``)."""

from __future__ import annotations

from pathlib import Path

_HEADER = '''"""{doc}

Revision ID: {rev}
Revises: {down}
"""

import os
import pathlib
import time

import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = "{down}"
branch_labels = None
depends_on = None
'''

BROKEN = """

def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer(), primary_key=True))
    op.execute("INSERT INTO chats (id, type, title) VALUES (777, 'group', 'half-done')")
    op.execute("ALTER TABLE no_such_table ADD COLUMN x INTEGER")


def downgrade() -> None:
    op.drop_table("notes")
"""

# Inserts a marker row, announces itself with a file, then waits for a "release" file: lets a
# test hold a migration in the middle (to race other processes against it, or to kill it).
GATED = """

def upgrade() -> None:
    op.execute("INSERT INTO chats (id, type, title) VALUES (4242, 'private', 'gate')")
    gate = os.environ.get("DBKEEPER_GATE_DIR")
    if not gate:
        return
    pathlib.Path(gate, f"entered-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not pathlib.Path(gate, "release").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("gate never released")
        time.sleep(0.02)


def downgrade() -> None:
    op.execute("DELETE FROM chats WHERE id = 4242")
"""

ADD_NOTES = """

def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("notes")
"""


def add_revision(
    scripts_dir: Path, body: str, *, rev: str = "0004", down: str = "0003", doc: str = "test"
) -> Path:
    path = scripts_dir / "versions" / f"{rev}_{doc.replace(' ', '_')}.py"
    path.write_text(_HEADER.format(rev=rev, down=down, doc=doc) + body)
    return path

# A statement that runs for hours unless it is interrupted: real work for the database (a
# counter SQLite or PostgreSQL steps through row by row), not a sleep in Python. Before it, a
# marker row (rolled back with the revision) and, with DBKEEPER_GATE_DIR, an "entered-PID" file.
# DBKEEPER_LONG_ROWS sets how far it counts (default: a few milliseconds' worth).
LONG = """

def upgrade() -> None:
    op.execute("INSERT INTO chats (id, type, title) VALUES (4343, 'private', 'long')")
    rows = int(os.environ.get("DBKEEPER_LONG_ROWS", "1000"))
    gate = os.environ.get("DBKEEPER_GATE_DIR")
    if gate:
        pathlib.Path(gate, f"entered-{os.getpid()}").touch()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"SELECT count(*) FROM (SELECT generate_series(1, {rows}::bigint)) AS spin")
    else:
        op.execute(
            "WITH RECURSIVE spin(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM spin "
            f"WHERE n < {rows}) SELECT count(*) FROM spin"
        )


def downgrade() -> None:
    op.execute("DELETE FROM chats WHERE id = 4343")
"""

# How far LONG counts when a test wants it to run until interrupted (hours on either engine).
FOREVER = str(10**13)
