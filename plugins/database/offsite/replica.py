"""The replica, read back: which moments it can restore, and a restore into a file. Blocking.

A point-in-time restore is checked against the replica's own listing *before* Litestream runs:
a time before its oldest file is refused (outside the retention window), a time after its
newest file restores the newest state and says so. Litestream itself, once compaction has
merged the per-second files of a period, silently restores the last state before the merged
range; so the position actually restored (its TXID, and when that state was replicated) is
read from Litestream's answer and the listing, and reported, never assumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbkeeper.config import Settings

from ..backup.engines.base import Limits
from ..settings import OffsiteSettings, ReplicationSettings
from .litestream import (
    Completed,
    Litestream,
    LtxFile,
    ReplicationError,
    Target,
    child_environment,
    protect_credentials,
    temporary_config,
    txid_text,
)

log = logging.getLogger("dbkeeper.replication")
SNAPSHOT_LEVEL = 9
FUTURE_TOLERANCE = timedelta(seconds=60)
UNCHANGED = "Nothing was changed."


def when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class Window:
    """What the replica holds: its files (every level), oldest first."""

    files: list[LtxFile]

    @property
    def oldest(self) -> datetime | None:
        return min((f.at for f in self.files), default=None)

    @property
    def newest(self) -> datetime | None:
        return max((f.at for f in self.files), default=None)

    @property
    def txid(self) -> int:
        return max((f.max_txid for f in self.files), default=0)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def snapshots(self) -> list[LtxFile]:
        return [f for f in self.files if f.level == SNAPSHOT_LEVEL]

    def replicated_at(self, txid: int) -> datetime | None:
        """When the state at ``txid`` reached the replica (the file ending there)."""
        ending = [f for f in self.files if f.max_txid == txid]
        return min(ending, key=lambda f: f.level).at if ending else None


@dataclass(frozen=True)
class Position:
    """The state a restore brought back."""

    txid: int
    replicated_at: datetime | None
    requested: datetime | None  # None: the newest state was asked for
    newest: datetime | None  # the replica's newest file when the restore ran

    def describe(self) -> str:
        state = (
            f"the state replicated at {when(self.replicated_at)}"
            if self.replicated_at is not None
            else "the replicated state"
        )
        text = f"{state} (txid {txid_text(self.txid)})"
        if self.requested is None:
            return f"{text}, the newest the replica holds"
        if self.newest is not None and self.requested >= self.newest:
            return (
                f"{text}: nothing newer was replicated before {when(self.requested)}, so this "
                "is the newest state"
            )
        if self.replicated_at is not None:
            gap = (self.requested - self.replicated_at).total_seconds()
            if gap > 5:
                return (
                    f"{text}, {gap:.0f}s before the time asked ({when(self.requested)}): the "
                    "replica keeps older periods at coarser steps, and this is its last state "
                    "before that time"
                )
        return f"{text}, the last state before {when(self.requested)}"


class Replica:
    """``<[offsite] url>/replica`` for one database, through the ``litestream`` tool."""

    def __init__(
        self,
        litestream: Litestream,
        database: Path,
        target: Target,
        settings: ReplicationSettings,
    ) -> None:
        self.litestream = litestream
        self.database = database
        self.target = target
        self.settings = settings
        protect_credentials()

    def _run(
        self, args: list[str], limits: Limits | None, timeout: float | None = None
    ) -> Completed:
        with temporary_config(self.database, self.target, self.settings) as config:
            return self.litestream.run(
                [*args, "-no-expand-env", "-config", str(config), str(self.database.resolve())],
                timeout=timeout or self.settings.restore_timeout_seconds,
                environment=child_environment(self.target),
                limits=limits,
            )

    def window(self, limits: Limits | None = None, timeout: float | None = None) -> Window:
        """The replica's files, every level (one listing per level: not for every second)."""
        result = self._run(["ltx", "-level", "all", "-json"], limits, timeout)
        if result.returncode != 0:
            raise ReplicationError(
                f"cannot list the replica at {self.target}: {explain(result.problem())}"
            )
        try:
            data = json.loads(result.stdout or "[]")
            files = [LtxFile.parse(entry) for entry in (data or [])]
        except (ValueError, KeyError, TypeError) as error:
            raise ReplicationError(
                f"litestream listed the replica at {self.target} in a form dbkeeper does not "
                f"read ({error}); is it Litestream 0.5?"
            ) from None
        return Window(sorted(files, key=lambda f: (f.at, f.level)))

    def check_time(self, at: datetime, window: Window, now: datetime | None = None) -> None:
        """Refuse a time the replica cannot restore (before making any change)."""
        now = now or datetime.now(UTC)
        if at > now + FUTURE_TOLERANCE:
            raise ReplicationError(
                f"{when(at)} is in the future (now is {when(now)}): give a past time in UTC, "
                f"e.g. {now - timedelta(minutes=10):%Y-%m-%dT%H:%M:%SZ}. {UNCHANGED}"
            )
        oldest = window.oldest
        if oldest is not None and at < oldest:
            raise ReplicationError(
                f"{when(at)} is outside the replica's retention window: it goes back to "
                f"{when(oldest)} ([replication] retention_hours = "
                f"{self.settings.retention_hours:g}). `dbkeeper backup list` shows the backups "
                f"that may be older. {UNCHANGED}"
            )

    def restore_into(
        self, output: Path, at: datetime | None = None, limits: Limits | None = None
    ) -> Position:
        """Write the replica's state at ``at`` (None: the newest) to ``output`` (which must
        not exist); returns the position restored. Nothing else is touched.

        A time is checked against the listing first; for the newest state the listing (which
        only names the moment restored) runs beside the restore instead."""
        started = time.monotonic()
        args = ["restore", "-o", str(output), "-integrity-check", "none", "-json"]
        with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-replica") as pool:
            listing = pool.submit(self.window, limits)
            if at is not None:
                window = listing.result()
                self._refuse_empty(window)
                self.check_time(at, window)
                if window.newest is not None and at < window.newest:
                    args += ["-timestamp", at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
            try:
                txid = self._restore(args, output, limits)
            except ReplicationError:
                self._refuse_empty(listing.result())  # the clearer reason, when it is that
                raise
            window = listing.result()
        if window.replicated_at(txid) is None:  # uploaded while it was listed
            window = self.window(limits)
        position = Position(txid, window.replicated_at(txid), at, window.newest)
        log.info(
            "litestream restored %s from %s in %.2fs",
            position.describe(),
            self.target,
            time.monotonic() - started,
        )
        return position

    def _refuse_empty(self, window: Window) -> None:
        if not window.files:
            raise ReplicationError(
                f"the replica at {self.target} holds nothing yet (replication has not uploaded "
                f"this database there): there is nothing to restore. {UNCHANGED}"
            )

    def _restore(self, args: list[str], output: Path, limits: Limits | None) -> int:
        """``litestream restore ARGS``; the TXID restored. Nothing is left behind on failure."""
        try:
            result = self._run(args, limits)
            if result.returncode != 0:
                raise ReplicationError(
                    f"restoring from the replica at {self.target} failed: "
                    f"{explain(result.problem())}. {UNCHANGED}"
                )
            try:
                return int(str(json.loads(result.stdout)["txid"]), 16)
            except (ValueError, KeyError, TypeError):
                raise ReplicationError(
                    f"litestream restore answered in a form dbkeeper does not read: "
                    f"{result.stdout[:200]!r}. {UNCHANGED}"
                ) from None
        except BaseException:
            for path in (output, output.with_name(output.name + ".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise


def replica_for(settings: Settings, database: Path | None, dialect: str) -> Replica:
    """The replica of this configuration's database, for a restore or a listing (blocking:
    finds the binary). It needs only ``[offsite] url`` and the credentials: a new machine
    restores before it replicates."""
    if dialect != "sqlite" or database is None:
        raise ReplicationError(
            f"the replica holds SQLite databases only; this database is {dialect}: restore a "
            "backup instead (`dbkeeper backup list`)"
        )
    replication = settings.section(ReplicationSettings)
    target = Target.of(settings.section(OffsiteSettings))
    return Replica(Litestream.find(replication.litestream_bin), database, target, replication)


def explain(problem: str) -> str:
    """Litestream's last words, with what they usually mean."""
    lowered = problem.lower()
    hints = [
        (
            ("signaturedoesnotmatch", "invalidaccesskeyid", "accessdenied", "403"),
            "the storage refused the credentials: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in dbkeeper's environment",
        ),
        (("nosuchbucket",), "the bucket does not exist: check [offsite] url"),
        (
            ("connection refused", "no such host", "i/o timeout", "dial tcp"),
            "the storage is unreachable: check [offsite] endpoint and the network",
        ),
        (
            ("no matching backup files", "no snapshots available"),
            "the replica holds nothing to restore",
        ),
        (("timestamp does not exist",), "the replica holds no state at that time"),
        (
            ("ec2 imds", "no ec2 imds role", "failed to refresh cached credentials"),
            "no storage credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in "
            "dbkeeper's environment",
        ),
    ]
    for needles, hint in hints:
        if any(needle in lowered for needle in needles):
            return f"{hint} (litestream: {problem[:300]})"
    return problem
