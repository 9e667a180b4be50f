"""user activity: blocked flag and last-seen time

last_seen_at is backfilled from the events log.

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


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER most things in place, so Alembic rebuilds the table there.
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("is_blocked", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_users_last_seen_at"), ["last_seen_at"])
    op.execute(
        "UPDATE users SET last_seen_at = "
        "(SELECT max(events.created_at) FROM events WHERE events.user_id = users.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_index(batch.f("ix_users_last_seen_at"))
        batch.drop_column("last_seen_at")
        batch.drop_column("is_blocked")
