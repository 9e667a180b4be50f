"""Copies of the verified backups off the machine: upload, prove, record, rotate, fetch back.

``sync`` runs after a backup is committed (never under the backup lock) and, at the next
start, for what a shutdown left. In order:

1. one sync at a time: ``.dbkeeper-offsite.lock`` in the backup directory (across processes);
2. list the off-site copies (``<url>/backups/``: an object and its manifest per backup);
3. the local backups that have no copy there (by their time stamp, so a backup compressed
   after its upload counts as copied), except those the rotation would drop at once;
4. for each, newest first: encrypt with age into a temporary file beside the backups when
   ``encrypt_to`` is set (streamed, constant memory; the plaintext read must have the local
   backup's sha256), upload, HEAD for its size, read it all back for our own sha256 (multipart
   ETags are not md5s), then write its manifest object: the ``Backup`` record's JSON plus
   what is stored (object name, size, sha256, recipients). The manifest is the commit point:
   a copy without one is not listed, and is removed a day later;
5. rotate off-site with the local policy (``retention.to_rotate``, ``[backup] keep`` per
   pool) over this setup's own copies only (below): manifest first, then the object;
6. record the outcome in ``.dbkeeper-offsite.json`` beside the backups (the health check,
   ``/dbstats`` and ``backup list`` read it: no request to the storage for them).

Whose copies are rotated. The state file records the names of the copies uploaded from this
backup directory (``own_copies``; claimed before each upload, so a crash between the object
and its manifest leaves no own copy behind unknown), pruned to what is still listed. Only
those are rotated; a copy of unknown origin is never deleted automatically, only counted
(``foreign_copies``: the ``offsite`` check, ``/dbstats`` and ``backup list --offsite`` name
them, and each process logs a warning the first time it sees them). A new machine started
before its restore, or a backup directory whose state file was lost (a wiped disk), owns
nothing: every copy already there is kept, and its own copies rotate among themselves.

A restore from an off-site copy that is not this setup's (``adopt``) adopts every copy
listed at that moment: the operator chose that lineage, so rotation resumes over it. The
restored copy itself stays off-site until a routine backup taken after the restore is there
too (``adopted_from``): otherwise the first rotation could remove every copy of the restored
data while the newest copies are those of the database it replaced.

A state file written before ``own_copies`` existed (an earlier version: this machine has been
uploading) adopts, at its first sync, the copies whose backups are still in the backup
directory (the same time stamp; the local rotation keeps the same set as the off-site one)
and the one it recorded as its last upload. Anything else off-site is kept as of unknown
origin: never delete on a guess.

A failed upload never touches the local backups: it is recorded (and alerted by the plugin),
and the next sync uploads every backup still missing off-site, the failed one included. A
sync stopped by a deadline (shutdown) or a stop request is not a failure: what is left waits
for the next sync.

``fetch`` brings an off-site copy back as a local backup: downloaded and decrypted into
temporary files under the backup lock, checked against its manifest (sizes, sha256 of the
object and of the decrypted backup), committed only when everything matches; any failure
removes every byte written (pyrage writes plaintext before it notices a truncated
ciphertext). The restore then takes the same verified, atomic path as any local backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dbkeeper.logs import SECRETS
from dbkeeper.texts import size

from ..backup.compression import CHUNK, create_private
from ..backup.engines.base import Interrupted, Limits, Progress, no_progress
from ..backup.manifest import MANIFEST_SUFFIX, Backup
from ..backup.pipeline import Backups
from ..backup.retention import ROUTINE_REASONS, SAFETY_REASONS, to_rotate
from ..backup.store import EXAMPLE_NAME, NAME_PATTERN, remove
from ..errors import BackupError, InvalidBackup, describe_error
from ..locks import FileLock, held, open_private
from ..settings import OffsiteSettings
from .age import (
    NotDecryptable,
    WrongIdentity,
    decrypt,
    encrypt,
    identity_secrets,
    load_identities,
    parse_recipients,
)
from .storage import ObjectMissing, ObjectStorage, StorageError, StoredObject, open_storage

log = logging.getLogger("dbkeeper.offsite")
AGE_SUFFIX = ".age"
STATE_NAME = ".dbkeeper-offsite.json"
LOCK_NAME = ".dbkeeper-offsite.lock"
TEMP_PREFIX = ".dbkeeper-offsite-tmp-"
MAX_MANIFEST_BYTES = 1 << 20
ORPHAN_AGE = timedelta(days=1)  # an object without a manifest this old is a failed upload's


@dataclass(frozen=True)
class OffsiteCopy:
    """One backup off-site: its record, and what is stored."""

    backup: Backup  # the record, as the local manifest says (its path: meaningless here)
    object_key: str  # the name of the stored object (``<name>`` or ``<name>.age``)
    size_bytes: int  # of the stored object
    sha256: str  # of the stored object
    recipients: tuple[str, ...]  # age recipients it is encrypted to (empty: not encrypted)
    uploaded_at: datetime

    @property
    def name(self) -> str:
        return self.backup.name

    @property
    def encrypted(self) -> bool:
        return bool(self.recipients)

    def manifest_json(self) -> str:
        data = json.loads(self.backup.to_json())
        data["offsite"] = {
            "object": self.object_key,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "encryption": "age" if self.recipients else "none",
            "recipients": list(self.recipients),
            "uploaded_at": self.uploaded_at.isoformat(),
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_manifest(cls, text: str, name: str) -> OffsiteCopy:
        """Parse a manifest object; ``ValueError`` says what is wrong with it."""
        backup = Backup.from_json(text)
        if backup.name != name:
            raise ValueError(f"it describes another backup ({backup.name[:60]})")
        stored = json.loads(text).get("offsite")
        if not isinstance(stored, dict):
            raise ValueError("it has no off-site part")
        key, length, digest = stored.get("object"), stored.get("size_bytes"), stored.get("sha256")
        recipients = stored.get("recipients", [])
        if key not in (name, name + AGE_SUFFIX):
            raise ValueError(f"its object name {str(key)[:60]!r} is not {name}[.age]")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError("its size is not a number")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("its sha256 is malformed")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("its recipients are malformed")
        if bool(recipients) != key.endswith(AGE_SUFFIX):
            raise ValueError("its encryption and its object name disagree")
        try:
            uploaded = datetime.fromisoformat(str(stored.get("uploaded_at"))).astimezone(UTC)
        except ValueError:
            raise ValueError("its upload time is not a time") from None
        return cls(backup, key, length, digest, tuple(recipients), uploaded)


@dataclass(frozen=True)
class DamagedCopy:
    name: str
    problem: str


@dataclass(frozen=True)
class OffsiteListing:
    copies: list[OffsiteCopy]  # sound, newest first
    damaged: list[DamagedCopy]
    orphans: list[StoredObject] = field(default_factory=list)  # objects without a manifest

    @property
    def total_bytes(self) -> int:
        return sum(copy.size_bytes for copy in self.copies)

    @property
    def names(self) -> frozenset[str]:
        """Every backup listed (sound or damaged)."""
        return frozenset(
            [copy.name for copy in self.copies] + [entry.name for entry in self.damaged]
        )


@dataclass(frozen=True)
class UploadReport:
    """What a sync did. ``failure``: why it failed (the local backups are untouched);
    ``deferred``: stopped by a deadline or a stop request, the rest waits."""

    uploaded: list[OffsiteCopy] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    failure: str | None = None
    deferred: str | None = None
    copies: int | None = None  # off-site after the sync (None: the listing failed)
    total_bytes: int = 0
    where: str = ""
    foreign: int = 0  # of ``copies``: of unknown origin (kept, never rotated)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def uploaded_name(self, name: str) -> OffsiteCopy | None:
        stem = _stem(name)
        return next((copy for copy in self.uploaded if _stem(copy.name) == stem), None)


@dataclass(frozen=True)
class OffsiteStatus:
    """The recorded outcome of the syncs (``.dbkeeper-offsite.json``)."""

    last_upload_at: datetime | None = None
    last_upload_name: str = ""
    last_success_at: datetime | None = None  # the last sync that completed (uploads or not)
    last_failure_at: datetime | None = None
    last_failure: str = ""
    failures_total: int = 0
    copies: int = 0
    total_bytes: int = 0
    # The copies uploaded from here (or adopted) still off-site; None: a state file from a
    # version that did not record them (resolved by ``OffsiteCopies.lineage``).
    own_copies: frozenset[str] | None = frozenset()
    foreign_copies: int = 0  # sound copies off-site of unknown origin: kept, never rotated
    adopted_from: str = ""  # the copy a restore adopted, kept until a newer backup is there
    adopted_at: datetime | None = None

    @property
    def failing(self) -> bool:
        """The last sync failed (and none succeeded since)."""
        if self.last_failure_at is None:
            return False
        return self.last_success_at is None or self.last_failure_at > self.last_success_at

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "last_upload_at": _iso(self.last_upload_at),
            "last_upload_name": self.last_upload_name,
            "last_success_at": _iso(self.last_success_at),
            "last_failure_at": _iso(self.last_failure_at),
            "last_failure": self.last_failure,
            "failures_total": self.failures_total,
            "copies": self.copies,
            "total_bytes": self.total_bytes,
            "foreign_copies": self.foreign_copies,
            "adopted_from": self.adopted_from,
            "adopted_at": _iso(self.adopted_at),
        }
        if self.own_copies is not None:  # None stays absent: the adoption is still to be done
            data["own_copies"] = sorted(self.own_copies)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> OffsiteStatus:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")

        def moment(key: str) -> datetime | None:
            value = data.get(key)
            return datetime.fromisoformat(value).astimezone(UTC) if value else None

        def count(key: str) -> int:
            value = data.get(key, 0)
            return value if isinstance(value, int) and value >= 0 else 0

        own = data.get("own_copies")
        own_copies: frozenset[str] | None = None
        if own is not None:  # malformed: nothing is ours (nothing is deleted)
            valid = isinstance(own, list) and all(isinstance(name, str) for name in own)
            own_copies = frozenset(own) if valid else frozenset()
        return cls(
            own_copies=own_copies,
            foreign_copies=count("foreign_copies"),
            adopted_from=str(data.get("adopted_from") or ""),
            adopted_at=moment("adopted_at"),
            last_upload_at=moment("last_upload_at"),
            last_upload_name=str(data.get("last_upload_name", "")),
            last_success_at=moment("last_success_at"),
            last_failure_at=moment("last_failure_at"),
            last_failure=str(data.get("last_failure", "")),
            failures_total=count("failures_total"),
            copies=count("copies"),
            total_bytes=count("total_bytes"),
        )


def foreign_note(count: int) -> str:
    """What to say about ``count`` copies off-site of unknown origin (never rotated)."""
    if count == 1:
        return (
            "1 copy not uploaded from here is kept (never rotated): restore it "
            "(`dbkeeper backup restore NAME`) or delete it by hand"
        )
    return (
        f"{count} copies not uploaded from here are kept (never rotated): restore one "
        "(`dbkeeper backup restore NAME`) or delete them by hand"
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _as_checked_here(copies: Sequence[OffsiteCopy], kept_here: Sequence[Backup]) -> list[Backup]:
    """The copies' records with their full check as the local backups ``kept_here`` have it. A
    copy is uploaded before its backup's full check ends, and only the local manifest learns
    the outcome; a copy whose backup is gone here keeps what its own manifest says."""
    here = {_stem(backup.name): backup for backup in kept_here}
    records = []
    for copy in copies:
        local = here.get(_stem(copy.name))
        records.append(
            copy.backup
            if local is None
            else replace(
                copy.backup,
                full_check=local.full_check,
                full_check_at=local.full_check_at,
                full_check_problem=local.full_check_problem,
            )
        )
    return records


def _stem(name: str) -> str:
    """``bot-db-2026-01-31_03-00-00`` of any of its file names (raw or compressed)."""
    return name.split(".", 1)[0]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OffsiteCopies:
    """The off-site copies of one backup directory's backups."""

    def __init__(
        self,
        settings: OffsiteSettings,
        backups: Backups,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        location = settings.location
        if location is None:
            raise ValueError("[offsite] url is empty")
        self.settings = settings
        self.backups = backups
        self.where = location.url_for("backups")
        self.recipients = tuple(settings.encrypt_to)
        self._environ = environ
        self._clock = clock
        self._parsed_recipients: list[Any] | None = None
        self._foreign_logged = 0  # the count of foreign copies this process last warned about

    @property
    def keep(self) -> int:
        return self.backups.settings.keep

    @property
    def directory(self) -> Path:
        return self.backups.store.directory

    # -- configuration ---------------------------------------------------------------------

    def storage(self, limits: Limits | None = None) -> ObjectStorage:
        """The storage, its requests bounded by what is left of ``limits``' deadline."""
        remaining = limits.remaining() if limits is not None else None
        return open_storage(self.settings, environ=self._environ, timeout=remaining)

    def check(self) -> None:
        """Everything that can be known without a request: credentials present, the SSE-C key
        readable, the recipients valid. ``StorageError`` says what is missing."""
        self.storage()
        self._recipients()

    def _recipients(self) -> list[Any]:
        if self._parsed_recipients is None:
            self._parsed_recipients = parse_recipients(self.recipients)
        return self._parsed_recipients

    # -- the state file ----------------------------------------------------------------------

    def status(self) -> OffsiteStatus:
        """The recorded outcome of the syncs (of any process using this backup directory)."""
        path = self.directory / STATE_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return OffsiteStatus()
        try:
            raw = os.read(fd, MAX_MANIFEST_BYTES)
        finally:
            os.close(fd)
        try:
            return OffsiteStatus.from_json(raw.decode("utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            log.warning("%s cannot be read (%s); starting afresh", path, error)
            return OffsiteStatus()

    def _save(self, status: OffsiteStatus) -> None:
        try:
            self.backups.store.ensure()
            scratch = self.directory / f"{TEMP_PREFIX}state.{os.getpid()}-{secrets.token_hex(4)}"
            fd = open_private(scratch, new=True)
            try:
                os.write(fd, status.to_json().encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(scratch, self.directory / STATE_NAME)
        except (OSError, BackupError) as error:
            log.warning("could not record the off-site state in %s: %s", self.directory, error)

    def _update(self, **changes: Any) -> None:
        """Change some fields of the recorded state (under the sync lock: one writer)."""
        self._save(replace(self.status(), **changes))

    # -- whose copies --------------------------------------------------------------------------

    def lineage(self, status: OffsiteStatus, listing: OffsiteListing) -> frozenset[str]:
        """The copies in ``listing`` this setup rotates: uploaded from here, or adopted.

        A state file without ``own_copies`` (an earlier version's) adopts the copies whose
        backups are still here (by time stamp) and its recorded last upload; the rest is of
        unknown origin (the module's docstring says why).
        """
        listed = listing.names
        if status.own_copies is not None:
            return status.own_copies & listed
        here = {_stem(backup.name) for backup in self.backups.list()}
        if status.last_upload_name:
            here.add(_stem(status.last_upload_name))
        return frozenset(name for name in listed if _stem(name) in here)

    def adopt(self, restored: str) -> int | None:
        """After a restore from the off-site copy ``restored``: unless it is this setup's
        already, every copy listed now becomes this setup's (rotated from now on), and
        ``restored`` stays off-site until a routine backup taken after now is there too.

        Returns how many copies were adopted (0: ``restored`` is this setup's), or None when
        the storage could not be listed: nothing changes then (every copy is kept).
        """
        limits = Limits()
        try:
            with self._locked(limits):
                status = self.status()
                listing = self.listing(self.storage(limits))
                owned = self.lineage(status, listing)
                if restored in owned:
                    return 0
                adopted = listing.names - owned
                self._update(
                    own_copies=listing.names,
                    foreign_copies=0,
                    adopted_from=restored,
                    adopted_at=self._clock(),
                )
        except (BackupError, OSError, Interrupted) as error:
            log.warning(
                "restored from %s, but the copies in %s were not adopted (%s): they are all "
                "kept, never rotated; `dbkeeper backup list --offsite` names them",
                restored,
                self.where,
                _text(error),
            )
            return None
        self._foreign_logged = 0
        log.info(
            "adopted %d off-site cop%s in %s (the restore of %s chose them): rotated with this "
            "setup's from now on; %s is kept until a backup taken after the restore is there",
            len(adopted),
            "y" if len(adopted) == 1 else "ies",
            self.where,
            restored,
            restored,
        )
        return len(adopted)

    # -- listing ---------------------------------------------------------------------------------

    def listing(self, storage: ObjectStorage | None = None) -> OffsiteListing:
        """The copies off-site (one LIST, one small GET per copy), newest first."""
        storage = storage or self.storage()
        objects = {item.key: item for item in storage.list()}
        copies: list[OffsiteCopy] = []
        damaged: list[DamagedCopy] = []
        referenced: set[str] = set()
        for key in sorted(objects):
            if not key.endswith(MANIFEST_SUFFIX):
                continue
            name = key[: -len(MANIFEST_SUFFIX)]
            if not NAME_PATTERN.match(name):
                continue
            referenced.add(key)
            try:
                copy = self._read_manifest(storage, name)
            except ObjectMissing:
                continue  # rotated away meanwhile
            except ValueError as error:
                damaged.append(DamagedCopy(name, f"its manifest cannot be read ({error})"))
                continue
            referenced.add(copy.object_key)
            stored = objects.get(copy.object_key)
            if stored is None:
                damaged.append(DamagedCopy(name, f"its object {copy.object_key} is missing"))
            elif stored.size != copy.size_bytes:
                damaged.append(
                    DamagedCopy(
                        name,
                        f"{copy.object_key} is {stored.size} bytes but its manifest says "
                        f"{copy.size_bytes}: truncated or replaced",
                    )
                )
            else:
                copies.append(copy)
        orphans = [item for key, item in objects.items() if key not in referenced]
        copies.sort(key=lambda copy: copy.backup.created_at, reverse=True)
        return OffsiteListing(copies, damaged, orphans)

    def _read_manifest(self, storage: ObjectStorage, name: str) -> OffsiteCopy:
        with storage.open(name + MANIFEST_SUFFIX) as stream:
            raw = stream.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            return OffsiteCopy.from_manifest(raw.decode("utf-8"), name)
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None

    def find(self, name: str) -> OffsiteCopy:
        """The off-site copy of backup ``name`` (``InvalidBackup`` when there is none)."""
        if not NAME_PATTERN.match(name):
            raise InvalidBackup(
                f"{name!r} is not a backup name: give a name as `dbkeeper backup list --offsite`"
                f" shows it (like {EXAMPLE_NAME}). Nothing was changed."
            )
        storage = self.storage()
        try:
            copy = self._read_manifest(storage, name)
        except ObjectMissing:
            raise InvalidBackup(
                f"there is no backup named {name} in {self.directory}, nor off-site in "
                f"{self.where}; `dbkeeper backup list --offsite` shows the copies there. "
                "Nothing was changed."
            ) from None
        except ValueError as error:
            raise InvalidBackup(
                f"cannot restore {name}: its off-site manifest cannot be read ({error}). "
                "Nothing was changed."
            ) from None
        return copy

    # -- syncing -----------------------------------------------------------------------------

    def sync(self, limits: Limits | None = None) -> UploadReport:
        """Upload every local backup missing off-site (newest first), verify each, rotate.

        Never raises for the storage: the report says what failed, and it is recorded.
        """
        limits = limits or Limits()
        started = time.monotonic()
        try:
            with self._locked(limits):
                try:
                    report = self._sync(limits)
                except (BackupError, OSError) as error:  # the listing: recorded under the lock
                    report = UploadReport(failure=self._failure_text(error), where=self.where)
                    self._record(report)
        except Interrupted as why:
            report = UploadReport(deferred=f"the off-site upload {why}", where=self.where)
        except (BackupError, OSError) as error:  # the lock
            report = UploadReport(failure=self._failure_text(error), where=self.where)
            self._record(report)
        if report.deferred:
            log.info("%s; what is not uploaded yet waits for the next upload", report.deferred)
        elif report.failure:
            log.error("off-site copy failed: %s", report.failure)
        elif report.uploaded or report.rotated:
            log.info(
                "off-site: %d uploaded, %d rotated out; %d copies, %s in %s (%.1fs)",
                len(report.uploaded),
                len(report.rotated),
                report.copies,
                size(report.total_bytes),
                self.where,
                time.monotonic() - started,
            )
        return report

    @contextlib.contextmanager
    def _locked(self, limits: Limits) -> Iterator[None]:
        self.backups.store.ensure()
        lock = FileLock(self.directory / LOCK_NAME)

        def gave_up(why: str) -> Exception:
            return Interrupted(why) if limits.stopped() else BackupError(f"the upload {why}")

        with held(
            lock,
            timeout=None,
            on_wait=lambda holder: log.info("the off-site upload waits for %s", holder),
            gave_up=gave_up,
            stopped=limits.stopped,
        ):
            for leftover in self.directory.glob(TEMP_PREFIX + "*"):
                remove(leftover)  # ours, from a process that died while uploading
            yield

    def _sync(self, limits: Limits) -> UploadReport:
        storage = self.storage(limits)
        listing = self.listing(storage)
        status = self.status()
        owned = set(self.lineage(status, listing))
        if status.own_copies is None:
            log.info(
                "adopted %d of the %d copies in %s as uploaded from here (their backups are "
                "here, or the last upload; the state file predates this record)",
                len(owned),
                len(listing.copies),
                self.where,
            )
        mine = [copy for copy in listing.copies if copy.name in owned]
        copied = {_stem(copy.name) for copy in listing.copies}  # never overwrite anyone's
        kept_here = self.backups.list()  # read once: the rotation below uses it too
        local = [b for b in kept_here if _stem(b.name) not in copied]
        doomed = self._doomed(_as_checked_here(mine, kept_here) + local, status)
        pending = [b for b in local if b.name not in doomed]
        uploaded: list[OffsiteCopy] = []
        failure: str | None = None
        deferred: str | None = None
        for backup in pending:  # newest first: the most valuable copy goes first
            try:
                limits.check()
                owned.add(backup.name)  # claimed before its manifest can exist (a crash)
                self._update(own_copies=frozenset(owned))
                uploaded.append(self._upload(storage, backup, limits))
            except Interrupted as why:
                deferred = f"the off-site upload {why}"
                break
            except FileNotFoundError:
                log.info("%s was rotated or renamed before its upload; skipped", backup.name)
            except (BackupError, OSError) as error:
                failure = f"uploading {backup.name} to {self.where} failed: " + _text(error)
                break
        copies = sorted(
            [*listing.copies, *uploaded], key=lambda copy: copy.backup.created_at, reverse=True
        )
        mine = [copy for copy in copies if copy.name in owned]
        rotated: list[str] = []
        if deferred is None:
            try:
                rotated = self._rotate(storage, mine, kept_here, listing, status)
            except (BackupError, OSError) as error:
                failure = failure or f"rotating the copies in {self.where} failed: {_text(error)}"
        kept = [copy for copy in copies if copy.name not in rotated]
        foreign = [copy for copy in kept if copy.name not in owned]
        report = UploadReport(
            uploaded=uploaded,
            rotated=rotated,
            failure=failure,
            deferred=deferred,
            copies=len(kept),
            total_bytes=sum(copy.size_bytes for copy in kept),
            where=self.where,
            foreign=len(foreign),
        )
        lineage: dict[str, Any] = {
            "own_copies": frozenset(owned - set(rotated)),
            "foreign_copies": len(foreign),
        }
        if status.adopted_from and not self._protected(status, [c.backup for c in mine]):
            lineage.update(adopted_from="", adopted_at=None)  # a newer backup is there
        self._record(report, **lineage)
        if foreign and len(foreign) != self._foreign_logged:
            log.warning(
                "%s: %s (a new machine started before its restore, or a lost %s)",
                self.where,
                foreign_note(len(foreign)),
                STATE_NAME,
            )
        self._foreign_logged = len(foreign)
        return report

    def _protected(self, status: OffsiteStatus, backups: Sequence[Backup]) -> frozenset[str]:
        """The copy a restore adopted, while no routine backup taken after it is among
        ``backups``: until then it may be the only copy of the restored data off-site."""
        adopted_at = status.adopted_at
        if not status.adopted_from or adopted_at is None:
            return frozenset()
        if status.adopted_from not in {backup.name for backup in backups}:
            return frozenset()
        if any(b.reason in ROUTINE_REASONS and b.created_at > adopted_at for b in backups):
            return frozenset()
        return frozenset([status.adopted_from])

    def _doomed(self, backups: Sequence[Backup], status: OffsiteStatus) -> set[str]:
        """Names the rotation would remove from ``backups`` (both pools; this setup's only)."""
        ordered = sorted(backups, key=lambda backup: backup.created_at, reverse=True)
        doomed: set[str] = set()
        for reason in (ROUTINE_REASONS[0], SAFETY_REASONS[0]):
            doomed.update(backup.name for backup in to_rotate(ordered, reason, self.keep))
        return doomed - self._protected(status, ordered)

    def _upload(self, storage: ObjectStorage, backup: Backup, limits: Limits) -> OffsiteCopy:
        """Upload one backup, prove the stored object, then commit its manifest."""
        started = time.monotonic()
        encrypted = bool(self.recipients)
        key = backup.name + (AGE_SUFFIX if encrypted else "")
        scratch: Path | None = None
        try:
            # Opened once: a rotation or compression meanwhile cannot take it from under us.
            with open(backup.path, "rb") as source:
                if encrypted:
                    scratch = self.directory / (
                        f"{TEMP_PREFIX}{key}.{os.getpid()}-{secrets.token_hex(4)}"
                    )
                    length, digest = self._encrypt(source, scratch, backup, limits)
                    with open(scratch, "rb") as payload:
                        storage.put(key, payload, check=limits.check)
                else:
                    length, digest = backup.size_bytes, backup.sha256
                    storage.put(key, source, check=limits.check)
        finally:
            if scratch is not None:
                remove(scratch)
        self._prove(storage, key, length, digest, limits, backup.name)
        copy = OffsiteCopy(backup, key, length, digest, self.recipients, self._clock())
        manifest = copy.manifest_json().encode()
        storage.put(key_of_manifest(backup.name), io.BytesIO(manifest), check=limits.check)
        with storage.open(key_of_manifest(backup.name)) as stream:
            if stream.read(MAX_MANIFEST_BYTES + 1) != manifest:
                raise StorageError(f"the manifest of {backup.name} does not read back as written")
        log.info(
            "uploaded %s to %s: %s%s, verified (size and sha256 read back) in %.2fs",
            backup.name,
            self.where,
            size(length),
            " (age-encrypted)" if encrypted else "",
            time.monotonic() - started,
        )
        return copy

    def _encrypt(
        self, source: Any, scratch: Path, backup: Backup, limits: Limits
    ) -> tuple[int, str]:
        with create_private(scratch) as sink:
            reader, writer = encrypt(source, sink, self._recipients(), limits.check)
        if reader.bytes != backup.size_bytes or reader.sha256 != backup.sha256:
            raise BackupError(
                f"the local backup {backup.name} does not match its manifest (sha256 "
                f"{reader.sha256[:12]}…, expected {backup.sha256[:12]}…): not uploaded; "
                f"`dbkeeper backup verify {backup.name}` checks it"
            )
        return writer.bytes, writer.sha256

    def _prove(
        self,
        storage: ObjectStorage,
        key: str,
        length: int,
        digest: str,
        limits: Limits,
        name: str,
    ) -> None:
        """The stored object has the size and sha256 of what was sent (read back in full)."""
        stored = storage.head(key)
        problem = None
        if stored is None:
            problem = "it is not there after the upload"
        elif stored.size != length:
            problem = f"it is {stored.size} bytes, {length} were sent"
        else:
            hasher = hashlib.sha256()
            with storage.open(key) as stream:
                while chunk := stream.read(CHUNK):
                    limits.check()
                    hasher.update(chunk)
            if hasher.hexdigest() != digest:
                problem = (
                    f"it reads back with sha256 {hasher.hexdigest()[:12]}…, not "
                    f"{digest[:12]}… (the local file or the transfer is damaged)"
                )
        if problem is not None:
            with contextlib.suppress(StorageError):
                storage.delete(key)
            raise StorageError(f"the uploaded copy of {name} failed verification: {problem}")

    def _rotate(
        self,
        storage: ObjectStorage,
        copies: list[OffsiteCopy],
        kept_here: Sequence[Backup],
        listing: OffsiteListing,
        status: OffsiteStatus,
    ) -> list[str]:
        """The local rotation policy over this setup's ``copies`` (their full checks as
        ``kept_here`` has them); plus what failed uploads and replaced copies left behind."""
        rotated = []
        for name in sorted(self._doomed(_as_checked_here(copies, kept_here), status)):
            copy = next(copy for copy in copies if copy.name == name)
            storage.delete(key_of_manifest(name))  # the copy is gone from listings first
            storage.delete(copy.object_key)
            rotated.append(name)
            log.info(
                "rotated out the off-site copy %s (%s); keeping the newest %d",
                name,
                copy.backup.reason,
                self.keep,
            )
        sound = {_stem(copy.name) for copy in copies}
        for entry in listing.damaged:
            if _stem(entry.name) in sound and entry.name not in {c.name for c in copies}:
                storage.delete(key_of_manifest(entry.name))
                for suffix in ("", AGE_SUFFIX):
                    storage.delete(entry.name + suffix)
        now = self._clock()
        for orphan in listing.orphans:
            if now - orphan.modified > ORPHAN_AGE:
                storage.delete(orphan.key)
                log.info("removed %s off-site: an upload that never completed", orphan.key)
        return rotated

    def _record(self, report: UploadReport, **lineage: Any) -> None:
        """The outcome of a sync, and (``lineage``) whose copies are off-site now."""
        previous = self.status()
        now = self._clock()
        newest = report.uploaded[0] if report.uploaded else None
        status = replace(previous, **lineage)
        if newest is not None:
            status = replace(
                status, last_upload_at=newest.uploaded_at, last_upload_name=newest.name
            )
        if report.copies is not None:
            status = replace(status, copies=report.copies, total_bytes=report.total_bytes)
        if report.failure is not None:
            status = replace(
                status,
                last_failure_at=now,
                last_failure=report.failure,
                failures_total=previous.failures_total + 1,
            )
        elif report.deferred is None:
            status = replace(status, last_success_at=now)
        self._save(status)

    def _failure_text(self, error: BaseException) -> str:
        return f"the off-site copy to {self.where} failed: {_text(error)}"

    # -- fetching a copy back --------------------------------------------------------------------

    def fetch(
        self, name: str, identity: Path | None = None, progress: Progress | None = None
    ) -> Backup:
        """Bring the off-site copy of ``name`` back into the backup directory, verified.

        Refuses (``InvalidBackup``, nothing kept) an encrypted copy without ``identity``, a
        wrong identity, a damaged, truncated or missing object.
        """
        progress = progress or no_progress
        copy = self.find(name)
        identities: list[Any] = []
        if copy.encrypted:
            if identity is None:
                raise InvalidBackup(
                    f"the off-site copy of {name} is encrypted with age (to "
                    f"{', '.join(_short_key(r) for r in copy.recipients)}): give the secret "
                    "key with --identity FILE (a file written by age-keygen). Nothing was "
                    "changed."
                )
            try:
                identities = load_identities(identity)
            except ValueError as error:
                raise InvalidBackup(f"{error}. Nothing was changed.") from None
            SECRETS.add(*identity_secrets(identities))
        storage = self.storage()
        backups = self.backups
        limits = Limits()
        with backups.exclusive("download of an off-site copy", wait=True, limits=limits):
            backups.store.ensure()
            existing = backups.store.directory / name
            if os.path.lexists(existing):
                return backups.get(name) or copy.backup.at(existing)
            written: list[Path] = []
            try:
                download = backups.store.temp(name + ".download")
                written.append(download)
                self._download(storage, copy, download, progress)
                plain = download
                if copy.encrypted:
                    plain = backups.store.temp(name)
                    written.append(plain)
                    self._decrypt(copy, download, plain, identities, identity)
                    remove(download)
                checked = _digest_file(plain)
                if checked != (copy.backup.size_bytes, copy.backup.sha256):
                    raise InvalidBackup(
                        f"cannot restore {name}: the off-site copy does not hold the backup its "
                        f"manifest describes ({checked[0]} bytes, sha256 {checked[1][:12]}…; "
                        f"expected {copy.backup.size_bytes} bytes, "
                        f"{copy.backup.sha256[:12]}…). Nothing was changed."
                    )
                info = backups.store.commit(plain, copy.backup)
            except BaseException:
                for path in written:
                    remove(path)
                raise
        log.info("fetched %s from %s (%s)", name, self.where, size(copy.size_bytes))
        return info

    def _download(
        self, storage: ObjectStorage, copy: OffsiteCopy, target: Path, progress: Progress
    ) -> None:
        hasher = hashlib.sha256()
        done = 0
        try:
            with storage.open(copy.object_key) as stream, create_private(target) as sink:
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
                    sink.write(chunk)
                    done += len(chunk)
                    progress("download", done, copy.size_bytes)
                sink.flush()
                os.fsync(sink.fileno())
        except ObjectMissing:
            raise InvalidBackup(
                f"cannot restore {copy.name}: its off-site object {copy.object_key} is missing "
                f"from {self.where}. Nothing was changed."
            ) from None
        progress("download", copy.size_bytes, copy.size_bytes)
        if done != copy.size_bytes or hasher.hexdigest() != copy.sha256:
            what = (
                f"{done} bytes, its manifest says {copy.size_bytes}: truncated"
                if done != copy.size_bytes
                else f"its sha256 is {hasher.hexdigest()[:12]}…, its manifest says "
                f"{copy.sha256[:12]}…"
            )
            raise InvalidBackup(
                f"cannot restore {copy.name}: the off-site copy is damaged ({what}). "
                "Nothing was changed."
            )

    def _decrypt(
        self,
        copy: OffsiteCopy,
        source: Path,
        target: Path,
        identities: list[Any],
        identity: Path | None,
    ) -> None:
        try:
            with open(source, "rb") as reader, create_private(target) as sink:
                decrypt(reader, sink, identities)
                sink.flush()
                os.fsync(sink.fileno())
        except WrongIdentity:
            raise InvalidBackup(
                f"cannot restore {copy.name}: no key in {identity} can decrypt its off-site "
                f"copy (it is encrypted to {', '.join(_short_key(r) for r in copy.recipients)})"
                ". Nothing was changed."
            ) from None
        except NotDecryptable as error:
            raise InvalidBackup(
                f"cannot restore {copy.name}: its off-site copy does not decrypt ({error}): it "
                "is damaged. Nothing was changed, and nothing of it was kept."
            ) from None


def key_of_manifest(name: str) -> str:
    return name + MANIFEST_SUFFIX


def _digest_file(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    length = 0
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            hasher.update(chunk)
            length += len(chunk)
    return length, hasher.hexdigest()


def _short_key(recipient: str) -> str:
    return recipient if len(recipient) <= 20 else f"{recipient[:12]}…{recipient[-6:]}"


def _text(error: BaseException) -> str:
    if isinstance(error, BackupError):
        return str(error)
    return describe_error(error, limit=400)


__all__ = [
    "DamagedCopy",
    "OffsiteCopies",
    "OffsiteCopy",
    "OffsiteListing",
    "OffsiteStatus",
    "UploadReport",
    "foreign_note",
]
