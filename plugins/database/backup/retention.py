"""Which backups rotation removes: a pure function over the listing.

Two pools, counted apart: routine backups (scheduled, manual, shutdown) and safety copies
(pre-migration, pre-downgrade, pre-restore). A new backup rotates only its own pool, keeping the
newest ``keep`` of it, so a burst of scheduled backups never pushes out the copy taken before a
restore. ``protected`` backups (one a restore is reading right now) are never removed, nor is
the newest fully checked backup of all: a SQLite backup is listed before its full
``integrity_check`` ran, so while the newest ones are pending (or one failed), the last one known
to pass in full stays, beyond ``keep`` if need be.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from .manifest import Backup

ROUTINE_REASONS = ("scheduled", "manual", "shutdown")
SAFETY_REASONS = ("pre-migration", "pre-downgrade", "pre-restore")
REASONS = ROUTINE_REASONS + SAFETY_REASONS


def pool_of(reason: str) -> tuple[str, ...]:
    return ROUTINE_REASONS if reason in ROUTINE_REASONS else SAFETY_REASONS


def pool_name(reason: str) -> str:
    return "routine backups" if reason in ROUTINE_REASONS else "safety copies"


def to_rotate(
    backups: Sequence[Backup],
    new_reason: str,
    keep: int,
    protected: Collection[Path] = (),
) -> list[Backup]:
    """The backups of ``new_reason``'s pool beyond the newest ``keep`` (``backups`` newest
    first), except the protected ones and the newest fully checked one."""
    pool = pool_of(new_reason)
    same = [backup for backup in backups if backup.reason in pool]
    checked = next((backup for backup in backups if backup.fully_checked), None)
    kept = {*protected, *([checked.path] if checked is not None else [])}
    return [backup for backup in same[keep:] if backup.path not in kept]
