"""user activity: blocked flag and last-seen time

last_seen_at is backfilled from the events log: each user's latest event, found in one pass
over events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The first version of this file backfilled with a subquery per user on the unindexed
# events.user_id: it read the whole events table once per user (59 s at 10,000 users, hours at
# 200,000; bench/README.md). This one gives the same result in one pass, so databases that
# applied the first version are not warned that it changed (dbkeeper accepts these checksums).
supersedes_checksums = ("51d6394ac7f2f6e6da4ce49edc3024fb143dd0763bccf083fef1ce40559a2a84",)

LAST_SEEN = "tmp_last_seen_0003"


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER most things in place, so Alembic rebuilds the table there.
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("is_blocked", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    # Every user's latest event in one pass over events, keyed by user: each user is then
    # one lookup (users without events keep NULL).
    op.create_table(
        LAST_SEEN,
        sa.Column("user_id", sa.BigInteger(), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True)),
        prefixes=["TEMPORARY"],
    )
    op.execute(
        f"INSERT INTO {LAST_SEEN} (user_id, seen_at) "
        "SELECT user_id, max(created_at) FROM events WHERE user_id IS NOT NULL GROUP BY user_id"
    )
    op.execute(
        f"UPDATE users SET last_seen_at = (SELECT seen_at FROM {LAST_SEEN} "
        f"WHERE {LAST_SEEN}.user_id = users.id) WHERE id IN (SELECT user_id FROM {LAST_SEEN})"
    )
    op.drop_table(LAST_SEEN)
    # after the backfill: one index build instead of an update per row
    op.create_index(op.f("ix_users_last_seen_at"), "users", ["last_seen_at"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_index(batch.f("ix_users_last_seen_at"))
        batch.drop_column("last_seen_at")
        batch.drop_column("is_blocked")
