"""The parts of a restore. The workflow itself, in order, is ``Operations.restore``:

verify (``prepare``: the backup proven sound into a staging copy, the live database untouched;
``prepare_raw``: the same for a database file obtained elsewhere, a restore from the replica)
-> pause the bot's database work -> safety copy (``keep_current``) -> swap (``swap``) ->
reopen -> migrate forward.

None of these parts calls back into the workflow; each says what it did.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackupError, InvalidBackup
from .engines.base import ContentFacts, Limits, Progress
from .manifest import Backup, BadManifest, read_manifest
from .pipeline import UNTRUSTED, Backups
from .store import remove

log = logging.getLogger("dbkeeper.backup")
UNCHANGED = "The live database was not touched."


@dataclass
class RestoreCandidate:
    """A backup proven sound, ready to be swapped in."""

    name: str
    path: Path
    raw: Path  # the database to swap in (a staging copy, or the backup file itself)
    facts: ContentFacts
    record: Backup | None  # None: a file without a manifest (its own checks alone)
    staging: Path | None

    def discard(self) -> None:
        """Remove the staging copy, if it was not swapped in."""
        if self.staging is not None:
            remove(self.staging)


@dataclass(frozen=True)
class RestoreReport:
    name: str
    schema_version: int  # of the backup
    safety: Backup | None  # the copy of the database it replaced
    reopened: Any  # the migration report of the reopened database
    duration_seconds: float
    set_aside: list[Path] = field(default_factory=list)  # a damaged database, kept as it was
    adopted: int | None = None  # off-site copies this restore adopted (None: none, or failed)


def prepare(backups: Backups, name: str, progress: Progress, limits: Limits) -> RestoreCandidate:
    """Prove backup ``name`` sound and fit for this database; nothing live is touched."""
    path = backups.store.resolve(name)
    problem = backups.engine.unavailable()
    if problem:
        raise BackupError(f"cannot restore: {problem}")
    try:
        record = read_manifest(path)
    except BadManifest as error:  # never taken for "no manifest": the checksum is not skipped
        raise InvalidBackup(f"cannot restore {name}: {error}. {UNTRUSTED}") from None
    staging = backups.engine.staging()
    try:
        raw, facts = backups.inspector.inspect(path, record, staging, progress, limits)
    except InvalidBackup as error:
        if staging is not None:
            remove(staging)
        text = str(error)
        text = text[len(name) :].strip() if text.startswith(name) else text
        raise InvalidBackup(f"cannot restore {name}: it {text}. {UNCHANGED}") from None
    except BaseException:
        if staging is not None:
            remove(staging)
        raise
    if record is None:
        log.warning("%s has no manifest: restoring on its own checks alone", name)
    return RestoreCandidate(name, path, raw, facts, record, staging)


def prepare_raw(
    backups: Backups, label: str, raw: Path, progress: Progress, limits: Limits
) -> RestoreCandidate:
    """Prove a raw database file obtained elsewhere (a restore from the replica) sound and fit
    for this database, like a backup's content; it becomes the staging copy (removed unless
    swapped in). ``raw`` must lie where ``engine.staging()`` puts copies (beside the live
    database)."""
    try:
        facts = backups.engine.check(raw, progress, limits)
        backups.inspector.admissible(label, facts)
    except InvalidBackup as error:
        remove(raw)
        text = str(error)
        text = text[len(label) :].strip() if text.startswith(label) else text
        raise InvalidBackup(f"cannot restore {label}: it {text}. {UNCHANGED}") from None
    except BaseException:
        remove(raw)
        raise
    return RestoreCandidate(label, raw, raw, facts, None, raw)


def keep_current(
    backups: Backups, candidate: RestoreCandidate, progress: Progress, limits: Limits
) -> tuple[Backup | None, bool]:
    """A verified safety copy of the live database (``pre-restore``), while holding
    ``backups.exclusive``. Returns (the copy, whether the live database is too damaged to copy:
    then it is set aside by ``swap`` instead)."""
    if not backups.engine.live_exists():
        return None, False
    backups.restoring = candidate.path  # rotation must not take what is being restored
    try:
        return backups.take("pre-restore", limits, progress), False
    except BackupError as error:
        damaged = isinstance(error.__cause__, InvalidBackup)
        if not (damaged and backups.engine.can_set_aside):
            raise BackupError(
                f"restore stopped before touching the live database: the safety backup of it "
                f"failed ({error}). Nothing was changed."
            ) from error
        return None, True
    finally:
        backups.restoring = None


def swap(backups: Backups, candidate: RestoreCandidate, *, set_aside_damaged: bool) -> list[Path]:
    """Put the candidate in place of the live database (every connection is closed).

    A damaged live database first gets a second name (its very bytes kept) while it stays in
    place; then one rename puts the candidate over it. There is a database file at every
    instant. On failure the live database is as it was; the error says so.
    """
    engine = backups.engine
    set_aside: list[Path] = []
    try:
        if set_aside_damaged:
            set_aside = engine.set_aside(f"damaged-{backups.store.stem(backups.now())}")
            log.warning(
                "the live database fails its integrity check, so no verified safety backup of "
                "it can exist; it is kept as it was: %s",
                ", ".join(str(path) for path in set_aside),
            )
        engine.replace_live(candidate.raw)
    except BaseException as error:
        with contextlib.suppress(Exception):
            engine.put_back(set_aside)
        raise BackupError(
            f"restoring {candidate.name} failed while replacing the database: {error}. The "
            "live database is as it was."
        ) from error
    if candidate.raw == candidate.staging:
        candidate.staging = None  # it is the live database now
    return set_aside
