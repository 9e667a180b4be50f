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
