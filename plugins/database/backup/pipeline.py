"""Backups: consistent, compressed, verified, rotated, restorable; one at a time per directory.

Taking a backup (``create``):

1. claim a name (``bot-db-<UTC second>``; see ``backup_store`` for same-second starts);
2. the engine writes a consistent raw copy to a temporary file (SQLite: the backup API under a
   pinned snapshot; PostgreSQL: ``pg_dump`` in custom format), fsynced;
3. at the same time, on two threads: the engine proves the raw copy sound (SQLite:
   ``PRAGMA quick_check``, every page and B-tree, and rows per table; PostgreSQL:
   ``pg_restore -f /dev/null`` reads every byte) while it is compressed (zstd on two threads;
   sha256 of content and file on the way);
4. the compressed file is read back from disk: its sha256 must be the one computed while
   writing it, and zstd decompresses it against the frame's content checksum (gzip: the
   content's sha256 is compared), so the backup holds exactly the bytes that passed the check;
5. manifest, rename into place, fsync: the backup is listed; then rotation, which therefore
   never runs after a failed backup. A failure removes every temporary file and is recorded
   (``stats``).
6. SQLite: the full ``integrity_check`` runs after, in the background, on the raw copy kept
   for it (``full_check.py``); the manifest records it (``full_check``).

With a deadline (the shutdown budget) the verified raw copy is committed first, then
compressed only if that fits in the time left; otherwise it stays raw (``pending_compression``
in its manifest) and ``compress_pending`` compresses it at the next start.

Backups, restores, deferred compressions and full checks exclude each other: a thread lock
within the process and a ``flock`` on the directory across processes. ``wait=False`` requests
(manual, scheduled) are refused with ``BackupInProgress``; safety backups wait. A full check
holding the directory gives it up to any of them at once (it runs again after).

Rotation keeps the newest ``keep`` routine backups (scheduled, manual, shutdown) and, apart
from them, the newest ``keep`` safety copies (pre-migration, pre-downgrade, pre-restore): a
burst of scheduled backups never rotates away the copy taken before a restore. The newest
fully checked backup is never rotated away.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from dbkeeper.plugin import Deadline
from dbkeeper.texts import counted, size

from ..errors import BackupError, BackupInProgress, InvalidBackup, describe_error
from ..locks import UnsafePath, acquire
from ..settings import BackupSettings
from .compression import (
    SUFFIXES,
    CorruptData,
    Digest,
    codec_for_suffix,
    compress,
    create_private,
    decompress,
    hash_file,
    read_back,
)
from .engines.base import (
    BackupEngine,
    ContentFacts,
    DeferredCheck,
    Interrupted,
    Limits,
    Progress,
    no_progress,
    serialized,
)
from .full_check import FullChecks
from .inspect import BackupInspector, RevisionSource
from .manifest import Backup, BadManifest, read_manifest
from .retention import REASONS, pool_name, to_rotate
from .store import BackupStore, Listing, remove

log = logging.getLogger("dbkeeper.backup")

# Compression speed assumed until this process has measured its own (bytes per second); only
# used to decide whether compressing fits in the shutdown budget. Deliberately low.
ASSUMED_RATES = {"gzip": 20e6, "zstd": 100e6}
UNTRUSTED = (
    "Its checksum cannot be compared, so it is not used: `dbkeeper backup verify NAME` runs "
    "every other check; if you trust the file, remove the manifest and it is restored on its "
    "own checks. Nothing was changed."
)


@dataclass(frozen=True)
class BackupFailure:
    at: datetime
    reason: str
    error: str


@dataclass(frozen=True)
class BackupStats:
    count: int
    total_bytes: int
    newest: Backup | None
    oldest: Backup | None
    last_failure: BackupFailure | None  # the latest failed attempt, if newer than the last success
    last_success_at: datetime | None
    last_duration_seconds: float | None
    damaged: int = 0  # files with a backup's name that are not counted (``Backups.scan``)
    full_check_pending: list[Backup] = field(default_factory=list)  # newest first
    full_check_failed: list[Backup] = field(default_factory=list)  # damaged by it, newest first
    newest_fully_checked: Backup | None = None
    checking: str | None = None  # the backup whose full check runs now (in this process)


@dataclass(frozen=True)
class VerifyResult:
    name: str
    ok: bool
    problem: str | None
    info: Backup | None
    seconds: float


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _is_no_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left" in str(error).lower() or "disk is full" in str(error).lower()


class Backups:
    """Creates, lists, verifies, rotates and restores the backups of one database."""

    def __init__(
        self,
        settings: BackupSettings,
        engine: BackupEngine,
        schema: RevisionSource,
        *,
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.schema = schema
        self.store = BackupStore(
            Path(settings.dir), spare_record=engine.side_file(".backup-failure.json")
        )
        self.inspector = BackupInspector(engine, schema)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._holder_state = threading.Lock()  # guards who holds ``_lock`` and ``_yielding``
        self._yielding: threading.Event | None = None  # set: the holder gives ``_lock`` up
        self._current: tuple[str, float] | None = None  # (what, monotonic start) while running
        self._rates: dict[str, float] = {}
        self._last_failure: BackupFailure | None = None
        self._last_success_at: datetime | None = None
        self._last_duration: float | None = None
        self.restoring: Path | None = None  # never rotated away while a restore reads it
        self.full_checks = FullChecks(self)

    # -- state --------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    @property
    def running(self) -> bool:
        """True while this process takes a backup, restores or compresses one."""
        return self._current is not None

    @property
    def available(self) -> bool:
        return self.engine.unavailable() is None

    def list(self) -> list[Backup]:
        """Complete, verified backups that pass the listing's cheap checks, newest first."""
        return self.store.entries()

    def scan(self) -> Listing:
        """The sound backups and, apart, the files with a backup's name that are not."""
        return self.store.scan(self._clock())

    def get(self, name: str) -> Backup | None:
        """Backup ``name`` (None when its file has no manifest); ``InvalidBackup`` if there is
        none, or when its manifest does not parse (it is not to be trusted)."""
        path = self.store.resolve(name)
        try:
            return read_manifest(path)
        except BadManifest as error:
            raise InvalidBackup(f"{name}: {error}. {UNTRUSTED}") from None

    def stats(self) -> BackupStats:
        listing = self.scan()
        backups = listing.backups
        newest = backups[0] if backups else None
        success = max(
            (t for t in (self._last_success_at, newest and newest.created_at) if t), default=None
        )
        failure = self._last_failure
        recorded = self.store.last_failure()
        if recorded is not None and (failure is None or recorded[0] > failure.at):
            failure = BackupFailure(*recorded)
        if failure is not None and success is not None and failure.at <= success:
            failure = None
        duration = self._last_duration
        if duration is None and newest is not None:
            duration = newest.duration_seconds
        return BackupStats(
            count=len(backups),
            total_bytes=sum(b.size_bytes for b in backups),
            newest=newest,
            oldest=backups[-1] if backups else None,
            last_failure=failure,
            last_success_at=success,
            last_duration_seconds=duration,
            damaged=len(listing.damaged),
            full_check_pending=[b for b in backups if b.full_check == "pending"],
            full_check_failed=[
                entry.record
                for entry in listing.damaged
                if entry.record is not None and entry.record.full_check == "failed"
            ],
            newest_fully_checked=next((b for b in backups if b.fully_checked), None),
            checking=self.full_checks.checking,
        )

    def estimate_next_bytes(self) -> int:
        """Free space the next backup needs at its peak (raw copy and compressed file at once)."""
        raw = self.engine.live_bytes()
        newest = next(iter(self.list()), None)
        if not self.engine.compressible:  # a dump: like the last one, with room to grow
            return int(newest.size_bytes * 1.5) if newest else raw
        codec = self._codec(raw)
        if codec == "none":
            return raw
        ratio = 1.0
        for backup in self.list():
            if backup.compression == codec and backup.content_bytes:
                ratio = backup.size_bytes / backup.content_bytes
                break
        return raw + int(raw * ratio)

    # -- creating -----------------------------------------------------------------------------

    def create(
        self,
        reason: str = "manual",
        *,
        wait: bool = False,
        deadline: Deadline | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> Backup:
        """Take, verify and rotate a backup (blocking). Raises ``BackupError`` on failure.

        ``wait``: if another backup runs, wait for it (else ``BackupInProgress``).
        ``deadline``: commit the raw copy first and compress only if time is left.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown backup reason {reason!r} (one of {', '.join(REASONS)})")
        limits = Limits(deadline, (stop,) if stop else ())
        taking = False
        try:
            with self.exclusive(f"{reason} backup", wait=wait, limits=limits):
                taking = True
                return self.take(reason, limits, serialized(progress))
        except BackupInProgress:
            raise  # not a failure: the request was not started
        except Exception as error:
            if taking:
                raise  # ``take`` recorded it
            # Taking the locks failed (a full or read-only disk, an unsafe directory, the
            # deadline while waiting): nothing was taken, and it is a failure all the same.
            failure = self._failure_message(reason, error)
            self._record_failure(reason, failure)
            raise BackupError(failure) from error

    def take(self, reason: str, limits: Limits, progress: Progress) -> Backup:
        """Take, verify and rotate a backup while holding ``exclusive`` (a restore's safety
        copy); ``create`` is the same with the locks taken for it."""
        temporary: list[Path] = []
        try:
            problem = self.engine.unavailable()
            if problem:
                raise BackupError(f"cannot back up: {problem}")
            if not self.engine.live_exists():
                raise BackupError(
                    f"there is no database at {self.engine.source()}: nothing to back up"
                )
            self.store.ensure()
            # A raw copy still kept for a full check that did not start goes first: the disk
            # never holds two raw copies (that check decompresses its backup instead).
            self.full_checks.drop_kept()
            for leftover in self.store.leftovers():  # we hold the directory: nobody writes them
                remove(leftover)
            created_at, stem = self.claim_name()
            log.info("backup %s (%s) started", stem, reason)
            started = time.monotonic()  # a same-second wait is not the backup's duration
            info = self._take(reason, created_at, stem, started, limits, progress, temporary)
        except Exception as error:
            for path in temporary:
                remove(path)
            failure = self._failure_message(reason, error)
            self._record_failure(reason, failure)
            raise BackupError(failure) from error
        except BaseException:
            for path in temporary:
                remove(path)
            raise
        self._last_success_at = info.created_at
        self._last_duration = info.duration_seconds
        self.rotate(info)
        if info.pending_compression and not limits.stopped():
            self._compress_deferred(info, limits, progress)
        return self._current_info(info)

    def _take(
        self,
        reason: str,
        created_at: datetime,
        stem: str,
        started: float,
        limits: Limits,
        progress: Progress,
        temporary: builtins.list[Path],
    ) -> Backup:
        phases: dict[str, float] = {}
        raw = self.store.temp(stem + self.engine.raw_suffix)
        temporary.append(raw)
        create_private(raw).close()
        clock = time.monotonic()
        early = self.engine.snapshot(raw, progress, limits)
        phases["snapshot"] = time.monotonic() - clock
        content_bytes = raw.stat().st_size
        codec = self._codec(content_bytes)
        pending = None
        if limits.deadline is not None and codec != "none":
            pending, codec = codec, "none"  # commit raw first; compress after, if time is left
        packed = None
        if codec != "none":
            packed = self.store.temp(stem + self.engine.raw_suffix + SUFFIXES[codec])
            temporary.append(packed)
        facts, content, file = self._check_and_pack(raw, packed, codec, progress, limits, phases)
        facts = self._merge(early, facts)
        checked_at = self._clock().isoformat(timespec="seconds")
        deferred = isinstance(self.engine, DeferredCheck)
        name = stem + self.engine.raw_suffix + (SUFFIXES[codec] if packed else "")
        record = Backup(
            name=name,
            created_at=created_at,
            reason=reason,
            engine=self.engine.kind,
            compression=codec if packed else self.engine.raw_compression,
            size_bytes=file.bytes,
            sha256=file.sha256,
            content_bytes=content.bytes,
            content_sha256=content.sha256,
            schema_revision=facts.revision,
            schema_version=self._version(facts.revision),
            tables={k: v for k, v in facts.tables.items() if v is not None},
            duration_seconds=round(time.monotonic() - started, 3),
            phases={k: round(v, 3) for k, v in phases.items()},
            pending_compression=pending,
            source=self.engine.source(),
            tool=self.engine.tool(),
            quick_check_at=checked_at if deferred else None,
            full_check="pending" if deferred else "passed",
            full_check_at=None if deferred else checked_at,
        )
        info = self.store.commit(packed or raw, record)
        if packed is not None and not (deferred and self.full_checks.keep(info, raw)):
            remove(raw)
        self._log_created(info)
        return info

    def _check_and_pack(
        self,
        raw: Path,
        packed: Path | None,
        codec: str,
        progress: Progress,
        limits: Limits,
        phases: dict[str, float],
    ) -> tuple[ContentFacts, Digest, Digest]:
        """Check the raw copy on a second thread while compressing (or hashing) it here.

        The compressed file is read back here too, so that only the longer of the two lines
        of work adds to the time of the backup. The check is the engine's inline one
        (SQLite: ``quick_check``; the full one runs after the backup is listed).
        """
        raw_bytes = raw.stat().st_size
        abandon = threading.Event()
        engine = self.engine
        inline = engine.quick_check if isinstance(engine, DeferredCheck) else engine.check
        name = "quick check" if isinstance(engine, DeferredCheck) else "check"

        def timed_check() -> ContentFacts:
            clock = time.monotonic()
            facts = inline(raw, progress, limits.also(abandon))
            phases[name] = time.monotonic() - clock
            return facts

        with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-backup-check") as pool:
            checking = pool.submit(timed_check)
            try:
                clock = time.monotonic()
                if packed is None:
                    content = hash_file(
                        raw, lambda done: progress("checksum", done, raw_bytes), limits.check
                    )
                    file = content
                    phases["checksum"] = time.monotonic() - clock
                else:  # an engine may have compressed it while taking it (PostgreSQL)
                    adopt = getattr(self.engine, "packed_copy", None)
                    made = adopt(raw, packed, codec) if adopt is not None else None
                    content, file = made or compress(
                        raw,
                        packed,
                        codec,
                        progress=lambda done: progress("compress", done, raw_bytes),
                        check=limits.check,
                    )
                    elapsed = time.monotonic() - clock
                    phases["compress"] = elapsed
                    self._rates[codec] = raw_bytes / max(elapsed, 1e-6)
                    self._read_back(packed, codec, content, file, progress, limits, phases)
            except BaseException:
                abandon.set()
                raise
            facts = checking.result()
        return facts, content, file

    @staticmethod
    def _read_back(
        packed: Path,
        codec: str,
        content: Digest,
        file: Digest,
        progress: Progress,
        limits: Limits,
        phases: dict[str, float],
    ) -> None:
        """Read back what reached the disk: it must be exactly the copy being checked.

        zstd: the file's sha256 against the one computed while writing it, and every frame
        decompressed against its content checksum (computed by the compressor over the copy
        it read, whose sha256 is ``content``): the content is not hashed twice. gzip: the
        content's sha256 against the copy's.
        """
        clock = time.monotonic()
        if codec == "zstd":
            read_file, read_bytes = read_back(
                packed,
                codec,
                progress=lambda done: progress("read-back", done, file.bytes),
                check=limits.check,
            )
            phases["read-back"] = time.monotonic() - clock
            if read_file != file or read_bytes != content.bytes:
                raise BackupError(
                    "the compressed file does not read back as it was written (sha256 "
                    f"{read_file.sha256[:12]}, expected {file.sha256[:12]}; {read_bytes} bytes "
                    f"of content, expected {content.bytes}): the disk or the file system "
                    "corrupts writes"
                )
            return
        read_file, read_content = decompress(
            packed,
            codec,
            progress=lambda done: progress("read-back", done, file.bytes),
            check=limits.check,
        )
        phases["read-back"] = time.monotonic() - clock
        if read_content != content or read_file != file:
            raise BackupError(
                "the compressed file does not read back as the copy that was checked "
                f"(content sha256 {read_content.sha256[:12]}, expected {content.sha256[:12]})"
                ": the disk or the file system corrupts writes"
            )

    # -- deferred compression -----------------------------------------------------------------

    def compress_pending(self, *, stop: threading.Event | None = None) -> builtins.list[Backup]:
        """Compress backups kept raw at shutdown (the next start calls this in the background)."""
        limits = Limits(None, (stop,) if stop else ())
        done: list[Backup] = []
        pending = [b for b in self.list() if b.pending_compression]
        if not pending:
            return done
        # It waits for a full check (the shutdown backup's, at the start after it) rather than
        # interrupting it: the check then reads the raw file, and nothing is decompressed.
        try:
            with self.exclusive("deferred compression", wait=True, limits=limits, preempt=False):
                # Read again: a full check may have recorded its result meanwhile.
                for backup in [b for b in self.list() if b.pending_compression]:
                    if limits.stopped():
                        break
                    compressed = self._compress_deferred(backup, limits, no_progress)
                    if compressed is not None:
                        done.append(compressed)
        except BackupError:
            if not limits.stopped():
                raise
            log.info("deferred compression stopped while waiting: it runs at the next start")
        return done

    def _compress_deferred(
        self, backup: Backup, limits: Limits, progress: Progress
    ) -> Backup | None:
        """Replace a raw backup by its compressed form; on interruption it stays raw."""
        codec = backup.pending_compression
        assert codec is not None
        remaining = limits.remaining()
        if remaining is not None:
            needed = backup.content_bytes / self._rate(codec)
            if needed > remaining / 2:
                log.info(
                    "kept %s uncompressed: %s would need about %.1fs of the %.1fs left; it is "
                    "compressed at the next start",
                    backup.name,
                    codec,
                    needed,
                    remaining,
                )
                return None
        name = backup.name + SUFFIXES[codec]
        packed = self.store.temp(name)
        started = time.monotonic()
        try:
            content, file = compress(
                backup.path,
                packed,
                codec,
                progress=lambda done: progress("compress", done, backup.content_bytes),
                check=limits.check,
            )
            _, read_content = decompress(packed, codec, check=limits.check)
            if content.sha256 != backup.content_sha256 or read_content != content:
                raise BackupError(f"{backup.name} did not read back as itself after compression")
            elapsed = time.monotonic() - started
            phases = {**backup.phases, "compress (deferred)": round(elapsed, 3)}
            updated = replace(
                backup,
                name=name,
                compression=codec,
                size_bytes=file.bytes,
                sha256=file.sha256,
                pending_compression=None,
                phases=phases,
            )
            info = self.store.commit(packed, updated)
            self.store.delete(backup.path)
        except Interrupted as why:
            remove(packed)
            log.info("compressing %s %s; it stays raw until the next start", backup.name, why)
            return None
        except (OSError, BackupError, CorruptData) as error:
            remove(packed)
            log.warning("compressing %s failed (%s); it stays uncompressed", backup.name, error)
            return None
        self._rates[codec] = backup.content_bytes / max(time.monotonic() - started, 1e-6)
        log.info(
            "compressed %s -> %s: %s -> %s in %.1fs",
            backup.name,
            name,
            size(backup.size_bytes),
            size(info.size_bytes),
            elapsed,
        )
        return info

    # -- rotation -----------------------------------------------------------------------------

    def claim_name(self) -> tuple[datetime, str]:
        """A backup's time and name stem no other file has (``BackupStore.claim_time``) on
        this manager's clock."""
        return self.store.claim_time(self._clock, self._sleep)

    def rotate(self, new: Backup) -> None:
        protected = [self.restoring] if self.restoring is not None else []
        for old in to_rotate(self.store.entries(), new.reason, self.settings.keep, protected):
            try:
                self.store.delete(old.path)
            except OSError as error:
                log.warning("could not delete %s during rotation: %s", old.name, error)
                continue
            log.info(
                "rotated out %s (%s); keeping the newest %d %s",
                old.name,
                old.reason,
                self.settings.keep,
                pool_name(new.reason),
            )

    # -- verifying ----------------------------------------------------------------------------

    def verify(
        self, name: str | None = None, *, progress: Progress | None = None
    ) -> builtins.list[VerifyResult]:
        """Re-check one backup (or all): checksum, full decompression, engine check, manifest."""
        progress = serialized(progress)
        limits = Limits()
        if name is not None:
            self.store.resolve(name)  # a bad name fails before waiting for anything
        with self.exclusive("verification", wait=True, limits=limits):
            if name is not None:
                paths = [self.store.resolve(name)]
            else:  # the damaged ones too: verifying says what is wrong with each
                listing = self.scan()
                paths = [backup.path for backup in listing.backups]
                paths += [
                    entry.path
                    for entry in listing.damaged
                    if stat.S_ISREG(os.lstat(entry.path).st_mode)
                ]
                paths.sort(key=lambda path: path.name, reverse=True)
            return [self._verify_one(path, progress, limits) for path in paths]

    def _verify_one(self, path: Path, progress: Progress, limits: Limits) -> VerifyResult:
        started = time.monotonic()
        unreadable: BadManifest | None = None
        try:
            manifest = read_manifest(path)
        except BadManifest as error:  # every other check still runs; it never passes
            manifest, unreadable = None, error
        info = manifest
        scratch = self.store.temp("verify-" + path.name)
        compressed = codec_for_suffix(path.name) != "none"
        try:
            self.inspector.inspect(
                path, manifest, scratch if compressed else None, progress, limits
            )
            if unreadable is not None:
                raise InvalidBackup(
                    f"{unreadable}: its checksum cannot be compared (every other check passed)"
                    "; remove the manifest if you trust the file"
                )
        except (InvalidBackup, CorruptData) as error:
            log.warning("verification of %s failed: %s", path.name, error)
            if manifest is not None and manifest.full_check != "failed":
                info = self._record_full_check(manifest, str(error))  # damaged from now on
            return VerifyResult(path.name, False, str(error), info, time.monotonic() - started)
        except OSError as error:
            raise BackupError(
                f"cannot verify {path.name}: {error.strerror or error} (decompressing it needs "
                f"about {size(manifest.content_bytes if manifest else 0)} free in "
                f"{self.store.directory}); the backup itself was not changed"
            ) from error
        finally:
            remove(scratch)
        if manifest is not None and manifest.full_check != "passed":
            if manifest.full_check == "failed":
                log.warning(
                    "%s passes its full check now; the earlier one failed (%s) on the same "
                    "bytes (its checksum matches): that failure was the machine's (a read error, "
                    "memory?), not the file's. It is no longer marked damaged.",
                    path.name,
                    manifest.full_check_problem,
                )
            info = self._record_full_check(manifest, None)
        log.info("verified %s in %.2fs", path.name, time.monotonic() - started)
        return VerifyResult(path.name, True, None, info, time.monotonic() - started)

    def _record_full_check(self, manifest: Backup, problem: str | None) -> Backup:
        """What ``backup verify`` found, in the manifest: a verification is a full check."""
        return self.store.update(
            replace(
                manifest,
                full_check="failed" if problem else "passed",
                full_check_at=self._clock().isoformat(timespec="seconds"),
                full_check_problem=problem,
            )
        )

    # -- housekeeping -------------------------------------------------------------------------

    def cleanup(self) -> builtins.list[Path]:
        """Remove leftovers of interrupted backups and restores (when no backup is running)."""
        if not self.store.directory.is_dir() and not self.engine.leftovers():
            return []
        try:
            with self.exclusive("cleanup", wait=False, limits=Limits()):
                found = self.store.leftovers(self.full_checks.in_use()) + self.engine.leftovers()
                for path in found:
                    remove(path)
        except BackupInProgress:
            return []  # whoever holds the directory is not done; its files are not leftovers
        if found:
            log.info(
                "removed %d leftover%s of an interrupted backup: %s",
                len(found),
                "s" if len(found) > 1 else "",
                ", ".join(path.name for path in found),
            )
        return found

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(
        self,
        what: str,
        *,
        wait: bool,
        limits: Limits,
        preempt: bool = True,
        yields: threading.Event | None = None,
    ) -> Iterator[None]:
        """One backup/restore at a time: in this process, then across processes.

        ``yields``: the holder gives the directory up when this event is set (a full check).
        ``preempt``: such a holder in this process is asked to (its backup stays pending) and
        this request waits the moment that takes, even with ``wait=False``; the full checks
        look again when this is done. Whatever fails on the way (a full disk while taking the
        lock, a stop request) releases what was taken; the next request finds both locks free.
        """

        def gave_up(why: str) -> BackupError:
            return BackupError(f"the {what} {why}")

        def take_or_preempt() -> tuple[bool, bool]:
            """(taken, whether the holder was asked to yield), as one step: the holder and
            whether it yields never change in between."""
            with self._holder_state:
                if self._lock.acquire(blocking=False):
                    self._yielding = yields
                    return True, False
                if preempt and self._yielding is not None:
                    self._yielding.set()
                    return False, True
                return False, False

        taken, yielding = take_or_preempt()
        if not taken:
            if not wait and not yielding:
                raise BackupInProgress(self._busy_text())
            acquire(
                lambda: take_or_preempt()[0],
                holder=self._busy_text,
                timeout=None,
                on_wait=lambda holder: log.info("the %s waits for %s", what, holder),
                gave_up=gave_up,
                stopped=limits.stopped,
            )
        try:
            file_lock = self.store.lock()
            if not file_lock.try_acquire():
                if not wait:
                    raise BackupInProgress(
                        f"another process is taking a backup or restoring in {self.store.directory}"
                        f" ({file_lock.holder()}); try again when it is done"
                    )
                acquire(
                    file_lock.try_acquire,
                    holder=file_lock.holder,
                    timeout=None,
                    on_wait=lambda holder: log.info("the %s waits for %s", what, holder),
                    gave_up=gave_up,
                    stopped=limits.stopped,
                )
            try:
                self._current = (what, time.monotonic())
                yield
            finally:
                self._current = None
                file_lock.release()
        finally:
            with self._holder_state:
                self._yielding = None
                self._lock.release()
            if preempt and self.full_checks.accepting:
                self.full_checks.request()  # a new backup to check, or one that yielded

    def _busy_text(self) -> str:
        current = self._current
        if current is None:
            return "a backup is already running"
        return f"a {current[0]} is already running (for {time.monotonic() - current[1]:.0f}s)"

    def _codec(self, content_bytes: int) -> str:
        if not self.engine.compressible or content_bytes < self.settings.compress_min_bytes:
            return "none"
        return self.settings.compression

    def _rate(self, codec: str) -> float:
        return self._rates.get(codec, ASSUMED_RATES[codec])

    def _version(self, revision: str | None) -> int:
        return int(self.schema.version_of(revision))

    @staticmethod
    def _merge(early: ContentFacts | None, checked: ContentFacts) -> ContentFacts:
        if early is None:
            return checked
        tables = {name: early.tables.get(name, count) for name, count in checked.tables.items()}
        tables.update({k: v for k, v in early.tables.items() if k not in tables})
        return ContentFacts(early.revision or checked.revision, tables)

    def _current_info(self, info: Backup) -> Backup:
        """The backup as it is now (deferred compression may have renamed it)."""
        stem = info.name.split(".", 1)[0]
        for backup in self.list():
            if backup.name.split(".", 1)[0] == stem:
                return backup
        return info

    def _failure_message(self, reason: str, error: BaseException) -> str:
        kept = "the partial files were removed and the existing backups are untouched"
        if isinstance(error, BackupInProgress):
            return str(error)
        if isinstance(error, Interrupted):
            return (
                f"the {reason} backup {error} before it was complete: no backup was taken "
                f"({kept}). Give shutdown more time ([shutdown] timeout_seconds and docker "
                "stop --time) or rely on scheduled backups."
            )
        if _is_no_space(error):
            need = size(self.estimate_next_bytes())
            free = size(self.store.free_bytes())
            return (
                f"the {reason} backup failed: no space left in {self.store.directory} "
                f"(it needs about {need}, {free} are free); {kept}. Free some space or point "
                "[backup] dir at a larger disk."
            )
        if isinstance(error, OSError) and error.errno == errno.EROFS:
            return (
                f"the {reason} backup failed: {error.filename or self.store.directory} is on a "
                f"read-only file system; {kept}. Remount it read-write (a file system that "
                "turned read-only after errors needs checking) or point [backup] dir elsewhere."
            )
        if isinstance(error, UnsafePath):
            return f"the {reason} backup was refused: {error}"
        if isinstance(error, InvalidBackup):
            return (
                f"the new {reason} backup failed verification: the copy {error}. It was "
                f"deleted; {kept}. The live database may be damaged: check it and the disk."
            )
        if isinstance(error, BackupError):
            return f"the {reason} backup failed: {error}; {kept}"
        return f"the {reason} backup failed: {describe_error(error)}; {kept}"

    def _record_failure(self, reason: str, message: str) -> None:
        at = self._clock()
        self._last_failure = BackupFailure(at, reason, message)
        self.store.record_failure(at, reason, message)
        log.error("%s", message)

    def _log_created(self, info: Backup) -> None:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in info.phases.items())
        if info.compression in ("gzip", "zstd"):
            packed = f"{size(info.size_bytes)} from {size(info.content_bytes)} ({info.compression})"
        else:
            packed = f"{size(info.size_bytes)} ({info.compression})"
        log.info(
            "backup %s (%s): %s, schema v%d, %s, %s; verified in %.2fs (%s)",
            info.name,
            info.reason,
            packed,
            info.schema_version,
            counted(len(info.bot_tables), "table"),
            counted(info.rows, "row"),
            info.duration_seconds,
            phases,
        )
