"""The parts of a restore. The workflow itself, in order, is ``Operations.restore``:

verify (``prepare``: the backup proven sound into a staging copy, the live database untouched;
a backup whose manifest says it passed the full check is proven by its file and content
sha256 alone; ``prepare_raw``: the full check of a database file obtained elsewhere, a restore
from the replica) -> pause the bot's database work -> keep the live database
(``keep_current``: by a second name in the backup directory, or a safety copy) -> swap
(``swap``) -> reopen -> migrate forward -> list the kept file (``finish_kept``: its sha256
and ``quick_check``, after the swap; a restore killed first leaves it to ``forget_unswapped``).

At its peak a SQLite restore holds the live file and the staging copy: twice the database
(the backup being restored aside), never a third copy.

None of these parts calls back into the workflow; each says what it did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dbkeeper.texts import size as size_text

from ..errors import BackupError, BackupInProgress, InvalidBackup
from .compression import hash_file
from .engines.base import ContentFacts, Limits, Progress
from .engines.sqlite import SqliteBackupEngine
from .inspect import SET_ASIDE_PHASE, trusted
from .manifest import Backup, BadManifest, read_manifest
from .pipeline import UNTRUSTED, Backups
from .store import NAME_PATTERN, TIME_FORMAT, fsync_directory, remove

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
        raw, facts = backups.inspector.inspect(path, record, staging, progress, limits, trust=True)
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
    elif trusted(record):
        log.info("%s matches its manifest (file and content sha256): checked when taken", name)
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


# The replaced SQLite file's second name in the backup directory from the moment it is set aside
# until it is listed (after the swap): never a leftover (``finish_kept``), never listed as is.
KEPT_PREFIX = ".dbkeeper-kept-"


@dataclass(frozen=True)
class Kept:
    """What a restore keeps of the database it replaces (``keep_current``)."""

    safety: Backup | None = None  # listed: a verified copy (or, after ``finish_kept``, the file)
    linked: Path | None = None  # the live file's second name, listed after the swap
    damaged: bool = False  # no listed copy can be made of it: ``swap`` keeps it beside itself

    @property
    def name(self) -> str | None:
        """The backup name the replaced database is (or will be) listed under."""
        if self.safety is not None:
            return self.safety.name
        return None if self.linked is None else self.linked.name.removeprefix(KEPT_PREFIX)


def keep_current(
    backups: Backups, candidate: RestoreCandidate, progress: Progress, limits: Limits
) -> Kept:
    """Keep the live database before it is replaced, while holding ``backups.exclusive`` and
    with every connection to it closed; meanwhile the candidate reaches the disk (fsync), so
    that it is whole before it is renamed into place.

    A SQLite file whose backup directory is on the same file system is kept as it is: a
    second name in the backup directory (``KEPT_PREFIX``), nothing copied, nothing read: its
    checksum and ``quick_check`` run after the swap (``finish_kept``), which lists it as a
    ``pre-restore`` backup kept raw and compressed later (``Backups.compress_pending``).
    Otherwise (another file system, a log another process holds, PostgreSQL) a verified
    ``pre-restore`` backup is taken as before.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-restore-sync") as pool:
        synced = pool.submit(_sync, candidate.raw)
        kept = _keep(backups, candidate, progress, limits)
        try:
            synced.result()
        except BaseException:
            if kept.linked is not None:  # the live file stays: no second name
                remove(kept.linked)
            raise
    return kept


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep(
    backups: Backups, candidate: RestoreCandidate, progress: Progress, limits: Limits
) -> Kept:
    engine = backups.engine
    if not engine.live_exists():
        return Kept()
    backups.restoring = candidate.path  # rotation must not take what is being restored
    try:
        if isinstance(engine, SqliteBackupEngine):
            try:
                return _set_aside(backups, engine)
            except (BackupError, OSError) as error:
                log.warning(
                    "the live database cannot be kept by a second name (%s): taking a copy of "
                    "it instead (a verified pre-restore backup)",
                    error,
                )
        return _safety_copy(backups, progress, limits)
    finally:
        backups.restoring = None


def _set_aside(backups: Backups, engine: SqliteBackupEngine) -> Kept:
    """The live file (checkpointed) gets a second name in the backup directory: the name it
    will be listed under, behind ``KEPT_PREFIX`` until ``finish_kept`` lists it."""
    engine.settle()
    store = backups.store
    store.ensure()
    _, stem = backups.claim_name()
    link = store.directory / f"{KEPT_PREFIX}{stem}{engine.raw_suffix}"
    engine.link_to(link)
    fsync_directory(store.directory)
    log.info("the live database is kept by a second name (nothing copied): %s", link.name)
    return Kept(linked=link)


def finish_kept(
    backups: Backups, link: Path, progress: Progress, limits: Limits
) -> tuple[Backup | None, list[Path]]:
    """List the replaced database kept at ``link`` as the ``pre-restore`` backup it is: hashed
    while ``quick_check`` reads it (what a listed backup needs; its full check stays pending,
    for the background checks). Holding ``backups.exclusive``; after the swap, or at the next
    start when a restore was killed before this (``forget_unswapped``).

    Returns (the backup, []), or (None, [where it is kept]) when it fails ``quick_check``: a
    damaged database is never listed, nor deleted; it goes beside the live database, where a
    restore keeps a damaged one (``<database>.damaged-<time>``).
    """
    engine = backups.engine
    assert isinstance(engine, SqliteBackupEngine)
    store = backups.store
    started = time.monotonic()
    name = link.name.removeprefix(KEPT_PREFIX)
    created_at = _kept_time(name)
    size = link.stat().st_size
    try:
        # Its checks and its checksum on two threads: both read the same cached pages.
        abandon = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-restore-check") as pool:
            examined = pool.submit(engine.quick_check, link, progress, limits.also(abandon))
            try:
                digest = hash_file(
                    link, lambda done: progress("checksum", done, size), limits.check
                )
            except BaseException:
                abandon.set()
                raise
            facts = examined.result()
    except InvalidBackup as error:
        return None, [_keep_damaged(backups, link, name, error)]
    if store.taken(name.removesuffix(engine.raw_suffix)):  # a backup took its second since
        created_at, stem = backups.claim_name()
        name = stem + engine.raw_suffix
    settings = backups.settings
    pending = settings.compression if size >= settings.compress_min_bytes else None
    record = Backup(
        name=name,
        created_at=created_at,
        reason="pre-restore",
        engine=engine.kind,
        compression=engine.raw_compression,
        size_bytes=digest.bytes,
        sha256=digest.sha256,
        content_bytes=digest.bytes,
        content_sha256=digest.sha256,
        schema_revision=facts.revision,
        schema_version=int(backups.schema.version_of(facts.revision)),
        tables={k: v for k, v in facts.tables.items() if v is not None},
        duration_seconds=round(time.monotonic() - started, 3),
        phases={SET_ASIDE_PHASE: round(time.monotonic() - started, 3)},
        pending_compression=None if pending == "none" else pending,
        source=engine.source(),
        tool=f"{engine.tool()}: the replaced file itself, kept by a second name",
        **_checks_pending(created_at),
    )
    with contextlib.suppress(OSError):
        os.chmod(link, 0o600)  # the backup's own file now
    info = store.commit(link, record)
    log.info(
        "the replaced database is listed as %s (%s, sha256 and quick_check in %.1fs)",
        info.name,
        size_text(info.size_bytes),
        time.monotonic() - started,
    )
    backups.rotate(info)
    backups.full_checks.request()
    return info, []


def _kept_time(name: str) -> datetime:
    match = NAME_PATTERN.match(name)
    assert match is not None, name
    return datetime.strptime(match["time"], TIME_FORMAT).replace(tzinfo=UTC)


def _keep_damaged(backups: Backups, link: Path, name: str, error: InvalidBackup) -> Path:
    engine = backups.engine
    assert isinstance(engine, SqliteBackupEngine) and engine.file is not None
    stem = name.removesuffix(engine.raw_suffix)
    target = engine.file.with_name(f"{engine.file.name}.damaged-{stem}")
    os.replace(link, target)
    fsync_directory(target.parent)
    fsync_directory(link.parent)
    log.warning(
        "the replaced database fails its checks (it %s), so no backup of it can be listed; it "
        "is kept as it was: %s",
        error,
        target,
    )
    return target


def _checks_pending(at: datetime) -> dict[str, Any]:
    """The manifest's record of its checks: ``quick_check`` passed, the full check still to
    run (the background checks take it)."""
    return {"quick_check_at": at.isoformat(timespec="seconds"), "full_check": "pending"}


def _safety_copy(backups: Backups, progress: Progress, limits: Limits) -> Kept:
    """A verified ``pre-restore`` backup of the live database (a copy)."""
    try:
        return Kept(backups.take("pre-restore", limits, progress))
    except BackupError as error:
        damaged = isinstance(error.__cause__, InvalidBackup)
        if not (damaged and backups.engine.can_set_aside):
            raise BackupError(
                f"restore stopped before touching the live database: the safety backup of it "
                f"failed ({error}). Nothing was changed."
            ) from error
        return Kept(damaged=True)


def swap(backups: Backups, candidate: RestoreCandidate, kept: Kept) -> list[Path]:
    """Put the candidate in place of the live database (every connection is closed).

    The live database already has a second name (the pre-restore backup, or, damaged, a
    name beside it) while it stays in place; then one rename puts the candidate over it.
    There is a database file at every instant. On failure the live database is as it was
    (its second name in the backup directory goes); the error says so.
    """
    engine = backups.engine
    set_aside: list[Path] = []
    try:
        if kept.damaged:
            set_aside = engine.set_aside(f"damaged-{backups.store.stem(backups.now())}")
            log.warning(
                "the live database fails its checks, so no backup of it can be listed; it is "
                "kept as it was: %s",
                ", ".join(str(path) for path in set_aside),
            )
        engine.replace_live(candidate.raw)
    except BaseException as error:
        with contextlib.suppress(Exception):
            engine.put_back(set_aside)
        if kept.linked is not None:
            with contextlib.suppress(Exception):
                remove(kept.linked)
        raise BackupError(
            f"restoring {candidate.name} failed while replacing the database: {error}. The "
            "live database is as it was."
        ) from error
    if candidate.raw == candidate.staging:
        candidate.staging = None  # it is the live database now
    return set_aside


def forget_unswapped(
    backups: Backups, progress: Progress | None = None
) -> tuple[list[Path], list[Backup]]:
    """What a restore killed before it was done left of the database it replaced, found by
    any command: a second name of the live file (killed before the swap: the live database
    is as it was) is removed; a kept file that is not the live one (killed after the swap,
    before ``finish_kept``) is the old database: listed now, never deleted.

    Holds the backup directory, like ``Backups.cleanup``; nothing while another process
    holds it (its restore may still be running). Returns (removed, listed).
    """
    engine = backups.engine
    directory = backups.store.directory
    if not isinstance(engine, SqliteBackupEngine) or not directory.is_dir():
        return [], []
    kept = sorted(directory.glob(f"{KEPT_PREFIX}*"))
    live = engine.file if engine.live_exists() else None
    linked = False
    if live is not None:
        with contextlib.suppress(OSError):
            linked = live.stat().st_nlink >= 2
    if not kept and not linked:
        return [], []
    found: list[Path] = []
    listed: list[Backup] = []
    try:
        with backups.exclusive("cleanup", wait=False, limits=Limits()):
            if linked:
                assert live is not None
                found += _second_names(backups, live)
            for path in sorted(directory.glob(f"{KEPT_PREFIX}*")):
                if path in found:
                    continue
                log.info(
                    "%s is the database a restore replaced, not listed yet: listing it", path.name
                )
                info, _ = finish_kept(backups, path, progress or _quiet, Limits())
                if info is not None:
                    listed.append(info)
    except BackupInProgress:
        return [], []
    if found:
        log.info(
            "removed %s: the live database by a second name, left by a restore interrupted "
            "before its swap (the live database is as it was)",
            ", ".join(path.name for path in found),
        )
    return found, listed


def _second_names(backups: Backups, live: Path) -> list[Path]:
    found = []
    directory = backups.store.directory
    for path in sorted(directory.iterdir()):
        named = NAME_PATTERN.match(path.name) or path.name.startswith(KEPT_PREFIX)
        with contextlib.suppress(OSError):
            if named and os.path.samefile(path, live):
                if path.name.startswith(KEPT_PREFIX):
                    remove(path)
                    fsync_directory(directory)
                else:
                    backups.store.delete(path)
                found.append(path)
    return found


def _quiet(phase: str, done: int, total: int | None) -> None:
    pass
