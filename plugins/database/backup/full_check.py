"""The full ``integrity_check`` of listed SQLite backups: after the backup, at low priority.

A SQLite backup is listed once ``quick_check`` passed on its raw copy (every page and B-tree);
``integrity_check`` (indexes against their tables, constraints) costs ten times as much, so it
runs here, after the backup is listed, and its result goes into the manifest (``full_check``).

- **On what**: the raw copy the backup was compressed from, kept until its check is done (no
  decompression: the disk holds the raw copy and the compressed file, as during the backup); an
  uncompressed backup is its own raw copy; otherwise (the check was interrupted, or runs at the
  next start) the backup is decompressed into a scratch file, against its manifest's sha256.
- **When**: one check at a time, newest backup first, on one thread started by the running bot
  (``start``) or for ``dbkeeper backup create`` (which waits for it). A backup, a restore or a
  verification wanting the backup directory interrupts a running check at its next progress
  callback (``Backups.exclusive``): the backup stays pending and the check runs again once the
  directory is free. ``stop`` (shutdown) interrupts it too; a pending check is run at the next
  start.
- **Priority**: a thread whose nice value is raised to ``NICE`` with ``setpriority`` on its own
  thread id (Linux: the nice value is per thread; ``os.nice`` would lower the whole bot). Not a
  subprocess: the check is SQLite's C code, which releases the GIL, and a thread is interrupted
  through SQLite's progress handler at once, needs no second interpreter, and leaves no process
  to reap at shutdown.
- **Failure**: the manifest says ``failed`` and what SQLite found; the listing then shows the
  backup as damaged (never counted, restored or rotated, never deleted), and ``on_failure`` is
  told (the bot alerts the admins).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackupError, InvalidBackup
from ..locks import UnsafePath
from .compression import codec_for_suffix
from .engines.base import DeferredCheck, Interrupted, Limits, no_progress
from .manifest import Backup, BadManifest, read_manifest
from .store import remove

if TYPE_CHECKING:
    from .pipeline import Backups

log = logging.getLogger("dbkeeper.backup")
NICE = 19  # the lowest priority: the check waits for whatever else wants the CPU
STOP_SECONDS = 5.0  # how long ``stop`` waits for a running check to give up
FINISHED_KEPT = 100  # results remembered for ``wait_for``


def lower_priority() -> bool:
    """Lower the calling thread's CPU priority (Linux); False where it cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError as error:
        log.debug("could not lower the full check's priority: %s", error)
        return False
    return True


class FullChecks:
    """Runs the full check of the backups whose manifest says ``pending``, one at a time."""

    def __init__(self, backups: Backups) -> None:
        self._backups = backups
        self._cond = threading.Condition()
        self._requested = False
        self._idle = False  # the thread waits for a request, nothing left to check
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._yield = threading.Event()  # set by whoever wants the directory the check holds
        self._scratch: dict[str, Path] = {}  # backup name -> its raw copy, kept for its check
        self.checking: str | None = None  # the backup being checked right now
        self.finished: dict[str, Backup] = {}  # the last results, by name (``wait_for``)
        self.on_failure: Callable[[Backup], None] | None = None
        # Whether this process checks now: on a shared backup directory only the leader does
        # (a standby's check would hold the directory the leader's backups need).
        self.may_run: Callable[[], bool] = lambda: True

    # -- for the pipeline ---------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether a check runs after each backup (else backups stay pending)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    def supported(self) -> bool:
        return isinstance(self._backups.engine, DeferredCheck)

    def keep(self, backup: Backup, raw: Path) -> bool:
        """Keep ``raw`` (the copy ``backup`` was compressed from) for its check; False when no
        check will run soon (the caller removes it)."""
        if not self.accepting:
            return False
        with self._cond:
            self._scratch[backup.name] = raw
        return True

    def in_use(self) -> list[Path]:
        """The raw copies kept for a check: not leftovers."""
        with self._cond:
            return list(self._scratch.values())

    def request(self) -> None:
        """Look for pending checks soon (a backup was listed, the directory is free again)."""
        with self._cond:
            self._requested = True
            self._cond.notify_all()

    # -- running --------------------------------------------------------------------------------

    def start(self) -> None:
        """Check what is pending now, then each backup after it is listed (a thread)."""
        if self.accepting or not self.supported():
            return
        self._stop.clear()
        self._requested = True
        self._thread = threading.Thread(target=self._run, name="dbkeeper-full-check", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Interrupt a running check (its backup stays pending) and end the thread."""
        self._stop.set()
        self._yield.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the full check did not stop within %.0fs", timeout)
        self._drop_scratch()

    def wait_for(self, name: str, timeout: float | None = None) -> Backup | None:
        """Block until backup ``name``'s check has a result (None: stopped, timed out, or
        done with everything without checking it: gone, or left pending)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while name not in self.finished:
                if not self.accepting or (self._idle and not self._requested):
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(0.2 if left is None else min(0.2, left))
            return self.finished[name]

    def _run(self) -> None:
        lower_priority()
        try:
            while not self._stop.is_set():
                with self._cond:
                    while not self._requested and not self._stop.is_set():
                        self._idle = True
                        self._cond.notify_all()
                        self._cond.wait()
                    self._idle = False
                    self._requested = False
                if self._stop.is_set():
                    break
                try:
                    self._pass()
                except UnsafePath as error:  # the backups say it too (and alert): no traceback
                    log.warning("full checks not run: %s; tried again after the next backup", error)
                except Exception:  # a bug: said, and the next backup's check is tried again
                    log.exception("a pass of full checks failed")
        finally:
            self._drop_scratch()
            with self._cond:
                self._cond.notify_all()

    def _pass(self) -> None:
        """Check every pending backup, newest first, until none is left or one yields."""
        done: set[str] = set()
        while not self._stop.is_set() and self.may_run():
            pending = [
                b for b in self._backups.list() if b.full_check == "pending" and b.name not in done
            ]
            if not pending:
                return
            backup = pending[0]
            done.add(backup.name)
            if not self._check_holding_the_directory(backup):
                return  # it yielded: whoever took the directory asks again when done

    def _check_holding_the_directory(self, backup: Backup) -> bool:
        """Check ``backup`` while holding the backup directory; False when interrupted."""
        limits = Limits(None, (self._stop, self._yield))
        backups = self._backups
        what = f"full check of {backup.name}"
        self._yield.clear()  # before: a request to yield may come the moment it holds the lock
        try:
            with backups.exclusive(
                what, wait=True, limits=limits, preempt=False, yields=self._yield
            ):
                current = self._current(backup)
                if current is None:
                    return True
                result = self.check(current, limits)
        except Interrupted as why:
            log.info("full check of %s %s: it stays pending", backup.name, why)
            self._drop_scratch(backup.name)
            return False
        except BackupError as error:  # stopped while waiting for the directory
            log.info("full check of %s not run: %s", backup.name, error)
            return False
        except OSError as error:  # no room to decompress it, say: tried again later
            log.warning("full check of %s not run: %s; it stays pending", backup.name, error)
            self._drop_scratch(backup.name)
            return False
        with self._cond:
            self.finished[backup.name] = result
            while len(self.finished) > FINISHED_KEPT:
                del self.finished[next(iter(self.finished))]
            self._cond.notify_all()
        if result.full_check == "failed" and self.on_failure is not None:
            try:
                self.on_failure(result)
            except Exception:
                log.exception("could not report the failed full check of %s", backup.name)
        return True

    def _current(self, backup: Backup) -> Backup | None:
        """The backup as its manifest says now (None: gone, or no longer pending)."""
        try:
            current = read_manifest(backup.path)
        except (BadManifest, OSError):
            return None
        if current is None or current.full_check != "pending" or not backup.path.is_file():
            self._drop_scratch(backup.name)
            return None
        return current

    def check(self, backup: Backup, limits: Limits) -> Backup:
        """Run the full check of ``backup`` (the caller holds the directory) and record it.

        ``Interrupted`` leaves it pending; anything found wrong marks it failed.
        """
        backups = self._backups
        engine = backups.engine
        assert isinstance(engine, DeferredCheck)
        with self._cond:
            kept = self._scratch.pop(backup.name, None)
        scratch: Path | None = None
        self.checking = backup.name
        started = time.monotonic()
        try:
            if codec_for_suffix(backup.name) == "none":
                raw = backup.path
            elif kept is not None and kept.is_file():
                raw = kept
            else:  # decompressed against the manifest's checksums
                scratch = backups.store.temp("full-check-" + backup.name)
                raw = backups.inspector.unpack(backup.path, backup, scratch, no_progress, limits)
            engine.full_check(raw, no_progress, limits)
            problem = None
        except InvalidBackup as error:
            problem = str(error)
        finally:
            self.checking = None
            for path in (kept, scratch):
                if path is not None:
                    remove(path)
        seconds = time.monotonic() - started
        result = replace(
            backup,
            full_check="failed" if problem else "passed",
            full_check_at=datetime.now(UTC).isoformat(timespec="seconds"),
            full_check_problem=problem,
            phases={**backup.phases, "full check": round(seconds, 3)},
        )
        backups.store.update(result)
        if problem:
            log.error(
                "backup %s FAILED its full integrity check (%.1fs): %s; it is marked damaged "
                "and kept",
                backup.name,
                seconds,
                problem,
            )
        else:
            log.info("backup %s passed its full integrity check in %.2fs", backup.name, seconds)
        return result

    def drop_kept(self) -> None:
        """Remove the raw copies kept for checks not running yet (a new backup starts)."""
        self._drop_scratch()

    def _drop_scratch(self, name: str | None = None) -> None:
        with self._cond:
            names = [name] if name is not None else list(self._scratch)
            paths = [self._scratch.pop(n) for n in names if n in self._scratch]
        for path in paths:
            with contextlib.suppress(OSError):
                remove(path)
