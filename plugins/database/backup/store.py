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

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InvalidBackup
from ..locks import FileLock, backup_lock, check_directory, open_private
from .manifest import MANIFEST_SUFFIX, Backup, manifest_path, read_manifest, write_manifest

PREFIX = "bot-db-"
TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
NAME_PATTERN = re.compile(
    r"^bot-db-(?P<time>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)(?P<suffix>\.db(?:\.gz|\.zst)?|\.dump)$"
)
TEMP_PREFIX = ".dbkeeper-tmp-"
FAILURE_NAME = ".dbkeeper-last-failure.json"
EXAMPLE_NAME = "bot-db-2026-01-31_03-00-00.db.gz"


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
    def __init__(self, directory: Path) -> None:
        self.directory = directory

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
            if not self._taken(stem):
                return now, stem
            sleep(max(0.01, 1 - now.microsecond / 1e6))

    def _taken(self, stem: str) -> bool:
        if not self.directory.is_dir():
            return False
        return any(entry.name.startswith(stem + ".") for entry in os.scandir(self.directory))

    def temp(self, label: str) -> Path:
        """A fresh temporary path in the directory; no listing ever matches it."""
        return self.directory / f"{TEMP_PREFIX}{label}.{os.getpid()}-{secrets.token_hex(4)}"

    def resolve(self, name: str) -> Path:
        """The file of backup ``name``: a plain name in the directory, never a path."""
        if not NAME_PATTERN.match(name):
            raise InvalidBackup(
                f"{name!r} is not a backup name: give a name as `dbkeeper backup list` shows it "
                f"(like {EXAMPLE_NAME}), not a path. Nothing was changed."
            )
        path = self.directory / name
        if not path.is_file():
            raise InvalidBackup(
                f"there is no backup named {name} in {self.directory}; `dbkeeper backup list` "
                "shows the backups there. Nothing was changed."
            )
        return path

    # -- the directory ------------------------------------------------------------------------

    def ensure(self) -> None:
        """The directory exists, and is safe to write into (``locks.check_directory``)."""
        check_directory(self.directory, "the backup directory")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def lock(self) -> FileLock:
        self.ensure()
        return backup_lock(self.directory)

    def entries(self) -> list[Backup]:
        """Complete backups, newest first: a file with the contract's name and its manifest.

        When a deferred compression was interrupted after its result was committed, the same
        backup exists raw and compressed: the compressed one is listed.
        """
        if not self.directory.is_dir():
            return []
        by_stem: dict[str, Backup] = {}
        for item in os.scandir(self.directory):
            match = NAME_PATTERN.match(item.name)
            if not match or not item.is_file(follow_symlinks=False):
                continue
            backup = read_manifest(Path(item.path))
            if backup is None or backup.name != item.name:
                continue
            stem = item.name[: -len(match["suffix"])]
            known = by_stem.get(stem)
            if known is None or known.pending_compression:
                by_stem[stem] = backup
        return sorted(by_stem.values(), key=lambda b: b.created_at, reverse=True)

    def commit(self, file: Path, backup: Backup) -> Backup:
        """Make ``file`` the backup ``backup.name``: manifest first, then the rename, fsync."""
        target = self.directory / backup.name
        write_manifest(backup, manifest_path(target), self.temp(backup.name + MANIFEST_SUFFIX))
        os.replace(file, target)
        fsync_directory(self.directory)
        return backup.at(target)

    def delete(self, path: Path) -> None:
        """Delete a backup: the file first, so that a crash leaves an orphan manifest at most."""
        remove(path)
        remove(manifest_path(path))
        fsync_directory(self.directory)

    def leftovers(self) -> list[Path]:
        """Temporary files, manifests without their backup, raw twins of compressed backups."""
        if not self.directory.is_dir():
            return []
        found: list[Path] = []
        names = {item.name for item in os.scandir(self.directory)}
        listed = {entry.path.name for entry in self.entries()}
        for name in sorted(names):
            path = self.directory / name
            orphan = name.endswith(MANIFEST_SUFFIX) and name[: -len(MANIFEST_SUFFIX)] not in names
            if name.startswith(TEMP_PREFIX) or orphan:
                found.append(path)
            elif NAME_PATTERN.match(name) and name not in listed and name.endswith(".db"):
                backup = read_manifest(path)
                if backup is not None and backup.pending_compression:
                    found += [path, manifest_path(path)]  # its compressed twin was committed
        return found

    def free_bytes(self) -> int:
        target = self.directory if self.directory.is_dir() else self.directory.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        return shutil.disk_usage(target).free

    # -- the last failure, kept across restarts ----------------------------------------------

    def record_failure(self, at: datetime, reason: str, error: str) -> None:
        """Best effort: a full disk may refuse even this small file."""
        scratch = self.temp("failure")
        try:
            self.ensure()
            fd = open_private(scratch)
            try:
                data = {"at": at.isoformat(), "reason": reason, "error": error}
                os.write(fd, json.dumps(data).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(scratch, self.directory / FAILURE_NAME)
        except OSError:
            remove(scratch)

    def last_failure(self) -> tuple[datetime, str, str] | None:
        try:
            data = json.loads((self.directory / FAILURE_NAME).read_text(encoding="utf-8"))
            return datetime.fromisoformat(data["at"]), str(data["reason"]), str(data["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
