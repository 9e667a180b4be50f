"""The backup directory: names, temporary files, atomic commits, leftovers, its lock.

A backup becomes visible in one step. It is written and verified under a temporary name that
no listing ever matches (``.dbkeeper-tmp-...``), its manifest is written atomically beside the
final name, then the file is renamed into place and the directory fsynced. A crash at any
point leaves either a complete, verified backup or leftovers that ``leftovers()`` finds and
the next start removes.

Names carry the UTC second the snapshot was taken (``bot-db-2026-01-31_03-00-00.db.gz``).
Backups are serialized (one at a time per directory), so two can only collide in name when
they start within the same second: the second one then waits for the next second. Names stay
in the contract's format and sort in the order the backups were taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..errors import DatabaseError, InvalidBackup
from ..locks import FileLock, backup_lock, check_directory, open_private
from .manifest import (
    MANIFEST_SUFFIX,
    Backup,
    BadManifest,
    manifest_path,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("dbkeeper.backup")

PREFIX = "bot-db-"
TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
NAME_PATTERN = re.compile(
    r"^bot-db-(?P<time>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)(?P<suffix>\.db(?:\.gz|\.zst)?|\.dump(?:\.zst)?)$"
)
TEMP_PREFIX = ".dbkeeper-tmp-"
TEMP_OWNER = re.compile(r"\.(\d+)-[0-9a-f]{8}$")  # the pid in a ``temp`` name
RAW = (".db", ".dump")  # the suffixes of uncompressed backups
FAILURE_NAME = ".dbkeeper-last-failure.json"
EXAMPLE_NAME = "bot-db-2026-01-31_03-00-00.db.gz"
FAILURE_RECORD_BYTES = 4096
NO_MANIFEST = (
    "has no manifest (copied in by hand?): not counted; `dbkeeper backup verify` checks it, "
    "and a restore checks it on its own"
)
# A manifest dated later than this is not trusted (clocks of hosts sharing a volume may differ).
FUTURE_TOLERANCE = timedelta(minutes=5)
# What each kind of backup file starts with: (what it is, its first bytes).
MAGIC = {
    "db": ("a SQLite database", b"SQLite format 3\x00"),
    "gz": ("a gzip file", b"\x1f\x8b"),
    "zst": ("a zstd file", b"\x28\xb5\x2f\xfd"),
    "dump": ("a pg_dump archive", b"PGDMP"),
}


@dataclass(frozen=True)
class Damaged:
    """A file with a backup's name that is not counted as a backup, and why."""

    name: str
    path: Path
    problem: str
    record: Backup | None  # what its manifest says, when it parses

    @property
    def label(self) -> str:
        """DAMAGED, or UNVERIFIED for a file without a manifest (copied in by hand)."""
        return "UNVERIFIED" if self.problem == NO_MANIFEST else "DAMAGED"


@dataclass(frozen=True)
class Listing:
    backups: list[Backup]  # sound, newest first
    damaged: list[Damaged]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


class BackupStore:
    def __init__(self, directory: Path, *, spare_record: Path | None = None) -> None:
        self.directory = directory
        self.spare_record = spare_record  # where a failure is recorded when the directory refuses

    # -- names --------------------------------------------------------------------------------

    @staticmethod
    def stem(moment: datetime) -> str:
        return PREFIX + moment.astimezone(UTC).strftime(TIME_FORMAT)

    def claim_time(
        self, clock: Callable[[], datetime], sleep: Callable[[float], None]
    ) -> tuple[datetime, str]:
        """A moment whose name no backup in the directory uses yet (waits out a taken second)."""
        while True:
            now = clock()
            stem = self.stem(now)
            if not self.taken(stem):
                return now, stem
            sleep(max(0.01, 1 - now.microsecond / 1e6))

    def taken(self, stem: str) -> bool:
        if not self.directory.is_dir():
            return False
        return any(entry.name.startswith(stem + ".") for entry in os.scandir(self.directory))

    def temp(self, label: str) -> Path:
        """A fresh temporary path in the directory (created with ``open_private(new=True)``);
        no listing ever matches it."""
        return self.directory / f"{TEMP_PREFIX}{label}.{os.getpid()}-{secrets.token_hex(4)}"

    def resolve(self, name: str) -> Path:
        """The file of backup ``name``: a plain name in the directory, never a path."""
        if not NAME_PATTERN.match(name):
            raise InvalidBackup(
                f"{name!r} is not a backup name: give a name as `dbkeeper backup list` shows it "
                f"(like {EXAMPLE_NAME}), not a path. Nothing was changed."
            )
        path = self.directory / name
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if info is None or stat.S_ISDIR(info.st_mode):
            raise InvalidBackup(
                f"there is no backup named {name} in {self.directory}; `dbkeeper backup list` "
                "shows the backups there. Nothing was changed."
            )
        if not stat.S_ISREG(info.st_mode):
            raise InvalidBackup(
                f"{name} in {self.directory} is not a regular file (a link?): dbkeeper reads "
                "backups only from files of their own. Nothing was changed."
            )
        return path

    # -- the directory ------------------------------------------------------------------------

    def ensure(self) -> None:
        """The directory exists, and is safe to write into (``locks.check_directory``)."""
        check_directory(self.directory, "the backup directory")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.reserve_failure_record()

    def lock(self) -> FileLock:
        self.ensure()
        return backup_lock(self.directory)

    def entries(self) -> list[Backup]:
        """Complete backups that pass the cheap checks, newest first (``scan().backups``)."""
        return self.scan().backups

    def scan(self, now: datetime | None = None) -> Listing:
        """Every file with a backup's name: the sound ones (newest first) and the others.

        A backup counts only if what is cheap to check holds: its manifest parses and names
        it, the file is a regular file of the manifest's size and starts as its format does,
        and its time matches its name and is not in the future. Anything else is listed apart,
        with the reason, and never counted or rotated. One bad entry never fails the listing.
        When a deferred compression was interrupted after its result was committed, the same
        backup exists raw and compressed: the compressed one is listed (the raw one is a
        leftover).
        """
        if not self.directory.is_dir():
            return Listing([], [])
        now = now or datetime.now(UTC)
        by_stem: dict[str, Backup] = {}
        damaged: list[Damaged] = []
        for item in sorted(os.scandir(self.directory), key=lambda entry: entry.name):
            match = NAME_PATTERN.match(item.name)
            if not match:
                continue
            path = Path(item.path)
            try:
                backup, problem = self._check_entry(path, match, now)
            except Exception as error:
                backup, problem = None, f"cannot be read ({type(error).__name__}: {error})"
            if problem is not None:
                damaged.append(Damaged(item.name, path, problem, backup))
                continue
            assert backup is not None
            stem = item.name[: -len(match["suffix"])]
            known = by_stem.get(stem)
            if known is None or known.pending_compression:
                by_stem[stem] = backup
        backups = sorted(by_stem.values(), key=lambda b: b.created_at, reverse=True)
        return Listing(backups, damaged)

    @staticmethod
    def _check_entry(
        path: Path, match: re.Match[str], now: datetime
    ) -> tuple[Backup | None, str | None]:
        """(the record, None) for a sound entry; (what is known, why not) otherwise."""
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return None, "is not a regular file (a link or a directory): not a backup"
        try:
            backup = read_manifest(path)
        except BadManifest as error:
            return None, f"{error}: not usable until `dbkeeper backup verify` passes"
        if backup is None:
            return None, NO_MANIFEST
        if backup.name != path.name:
            return None, f"its manifest describes another file ({backup.name[:60]})"
        if info.st_size == 0:
            return backup, "is empty (0 bytes)"
        if info.st_size != backup.size_bytes:
            return backup, (
                f"is {info.st_size} bytes but its manifest says {backup.size_bytes}: truncated "
                "or replaced since it was made"
            )
        expected = MAGIC[match["suffix"].rsplit(".", 1)[-1]]
        with open(path, "rb") as handle:
            if handle.read(len(expected[1])) != expected[1]:
                return backup, f"does not start as {expected[0]} does: it was replaced"
        named = datetime.strptime(match["time"], TIME_FORMAT).replace(tzinfo=UTC)
        if backup.created_at > now + FUTURE_TOLERANCE:
            return backup, (
                f"is dated in the future ({backup.created_at:%Y-%m-%d %H:%M:%S} UTC): its "
                "manifest or the clock is wrong; not counted"
            )
        if backup.created_at.replace(microsecond=0) != named:
            return backup, (
                f"its manifest's time ({backup.created_at:%Y-%m-%d %H:%M:%S} UTC) is not the "
                "time in its name: not counted"
            )
        if backup.full_check == "failed":
            return backup, (
                f"failed the full integrity check ({backup.full_check_text}): "
                f"{backup.full_check_problem or 'no details'}; kept for inspection, never "
                "restored or rotated (delete it by hand)"
            )
        return backup, None

    def commit(self, file: Path, backup: Backup) -> Backup:
        """Make ``file`` the backup ``backup.name``: manifest first, then the rename, fsync."""
        target = self.directory / backup.name
        write_manifest(backup, manifest_path(target), self.temp(backup.name + MANIFEST_SUFFIX))
        os.replace(file, target)
        fsync_directory(self.directory)
        return backup.at(target)

    def update(self, backup: Backup) -> Backup:
        """Rewrite the manifest of the backup at ``backup.path`` (its checks changed)."""
        write_manifest(backup, manifest_path(backup.path), self.temp(backup.name + MANIFEST_SUFFIX))
        fsync_directory(self.directory)
        return backup

    def delete(self, path: Path) -> None:
        """Delete a backup: the file first, so that a crash leaves an orphan manifest at most."""
        remove(path)
        remove(manifest_path(path))
        fsync_directory(self.directory)

    def leftovers(self, in_use: Collection[Path] = ()) -> list[Path]:
        """Temporary files, manifests without their backup, raw twins of compressed backups;
        not those ``in_use`` (the raw copy kept for a backup's full check)."""
        if not self.directory.is_dir():
            return []
        found: list[Path] = []
        names = {item.name for item in os.scandir(self.directory)}
        listed = {entry.path.name for entry in self.entries()}
        for name in sorted(names):
            path = self.directory / name
            if path in in_use:
                continue
            orphan = name.endswith(MANIFEST_SUFFIX) and name[: -len(MANIFEST_SUFFIX)] not in names
            if name.startswith(TEMP_PREFIX) and _owner_alive(name):
                continue  # another running process's (the raw copy its full check will read)
            if name.startswith(TEMP_PREFIX) or orphan:
                found.append(path)
            elif NAME_PATTERN.match(name) and name not in listed and name.endswith(RAW):
                try:
                    backup = read_manifest(path)
                except BadManifest:
                    continue  # the operator's to look at, never removed for them
                twin = any(listed_name.startswith(name + ".") for listed_name in listed)
                if backup is not None and backup.pending_compression and twin:
                    found += [path, manifest_path(path)]  # its compressed twin was committed
        return found

    def free_bytes(self) -> int:
        target = self.directory if self.directory.is_dir() else self.directory.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        return shutil.disk_usage(target).free

    # -- the last failure, kept across restarts ----------------------------------------------

    def _failure_records(self) -> list[Path]:
        records = [self.directory / FAILURE_NAME]
        if self.spare_record is not None:
            records.append(self.spare_record)
        return records

    def reserve_failure_record(self) -> None:
        """Give the failure record its room now, while there is room: a full disk can still
        record why a backup failed (it is overwritten in place)."""
        path = self.directory / FAILURE_NAME
        if os.path.lexists(path):
            return
        with contextlib.suppress(OSError, DatabaseError):
            fd = open_private(path)
            try:
                os.pwrite(fd, b" " * FAILURE_RECORD_BYTES, 0)
            finally:
                os.close(fd)

    def record_failure(self, at: datetime, reason: str, error: str) -> bool:
        """Keep the last failure for other processes (``backup list``, health after a restart).

        Written in place into a file of fixed size, so a full disk still takes it once the
        file exists; in the backup directory, or (read-only, unsafe, full) beside the SQLite
        database. False when neither place took it.
        """
        data = {"at": at.isoformat(), "reason": reason, "error": error}
        encoded = json.dumps(data).encode()
        while len(encoded) > FAILURE_RECORD_BYTES:
            data["error"] = data["error"][: len(data["error"]) // 2] + "…"
            encoded = json.dumps(data).encode()
        problems = []
        for path in self._failure_records():
            try:
                if path.parent == self.directory:
                    self.ensure()
                fd = open_private(path)
                try:
                    os.pwrite(fd, encoded.ljust(FAILURE_RECORD_BYTES), 0)
                    os.ftruncate(fd, FAILURE_RECORD_BYTES)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return True
            except (OSError, DatabaseError) as problem:
                problems.append(f"{path}: {getattr(problem, 'strerror', None) or problem}")
        log.warning("could not record the backup failure (%s)", "; ".join(problems))
        return False

    def last_failure(self) -> tuple[datetime, str, str] | None:
        """The newest failure recorded in either place."""
        found = []
        for path in self._failure_records():
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
                at = datetime.fromisoformat(data["at"])
                found.append((at, str(data["reason"]), str(data["error"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return max(found, key=lambda record: record[0], default=None)


def _owner_alive(temp_name: str) -> bool:
    """Whether the temporary file ``temp_name`` (``temp``: it ends ``.<pid>-<hex>``) belongs
    to another process that still runs: it may use the file outside the directory lock."""
    found = TEMP_OWNER.search(temp_name)
    if found is None or int(found.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
