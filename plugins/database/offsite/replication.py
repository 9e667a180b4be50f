"""Continuous replication of the SQLite database: Litestream, a child process dbkeeper runs.

The database plugin calls these, in this order:

``prepare``  at startup, before migrations: find Litestream (a missing or too old binary stops
             startup, naming what was found), write its configuration (0600, in a 0700
             directory beside the database) and have Litestream validate it.
``follow``   after migrations, and on every leadership change: the leader replicates, a standby
             does not (one Litestream per database and replica).
``paused``   around a restore in the running bot: a final sync, the swap, then Litestream
             starts over from the replica (``litestream.forget_position``: a new snapshot).
``stop``     last at shutdown, after the database closed: SIGTERM, Litestream's final sync
             (bounded by the shutdown budget), exit; a failed final sync is alerted.

While it runs Litestream is watched: an unexpected exit is logged with its last words, alerted
once, and restarted with backoff (1 s, 2 s, 5 s ... 60 s; the episode ends after a minute of
running). It dies with dbkeeper: its own process group, and exactly one SIGTERM from the kernel
when dbkeeper dies (through a one-thread parent, ``guardian.py``; a second signal would make
Litestream skip its final sync), so even a killed bot gets its last commits uploaded.

Checkpoints: Litestream holds a read transaction and checkpoints the WAL itself. A TRUNCATE
checkpoint of dbkeeper's (``Operations.flush``) would wait for that reader while blocking every
writer, and fail anyway; with replication on, dbkeeper leaves the WAL to Litestream
(``Operations.wal_owner``). Backups need no change: their PASSIVE checkpoint never waits and
stops at Litestream's read mark, and the snapshot then copies through SQLite's backup API under
a pinned read transaction, so Litestream misses no WAL frame and takes no new full snapshot.

Lag: ``last_sync_at`` from the control socket (``GET /list``) advances while the replica is
caught up (every sync interval, every two when idle) and stands still while uploads fail: the
lag is its age. An idle database whose storage is down is not behind: it has nothing to upload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbkeeper.config import Settings
from dbkeeper.logs import redact
from dbkeeper.plugin import Deadline, PluginContext

from ..backup.engines.base import BackupEngine, Interrupted, Limits
from ..children import dies_with
from ..errors import DatabaseError
from ..settings import OffsiteSettings, ReplicationSettings
from .drill import DrillResult, last_drill, run_drill
from .litestream import (
    CREDENTIAL_VARIABLES,
    Litestream,
    ReplicationError,
    Target,
    ask,
    ask_async,
    child_environment,
    ensure_private_dir,
    parse_time,
    protect_credentials,
    remove_leftovers,
    render_config,
    runtime_dir,
    socket_path,
    write_private,
)
from .replica import Replica, when

if TYPE_CHECKING:  # the command line imports this module: PTB and metrics only when running
    from asyncio.subprocess import Process

    from dbkeeper.health import Outcome

log = logging.getLogger("dbkeeper.replication")
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STABLE_SECONDS = 60.0  # running this long ends an episode of crashes
READY_SECONDS = 10.0  # for the control socket to answer after a start
PAUSE_STOP_SECONDS = 10.0  # a restore or a step-down waits this long for the final sync
SHUTDOWN_RESERVE_SECONDS = 0.5  # of the shutdown budget, left for alerts after Litestream
DRILL_JOB = "database-replication-drill"
FIRST_DRILL_SECONDS = 300.0  # a database never drilled: this long after the start
TAIL_LINES = 40
LAG_POINTS = 2880  # the lag of the last 2880 checks (10 days at the default 5 minutes)
GUARDIAN = Path(__file__).with_name("guardian.py")
ALERT_KEY = "database.replication"
INFO_EVENTS = ('msg="snapshot complete"', 'msg="detected database behind replica"')
_LEVEL = re.compile(r"\blevel=(\w+)")
_MESSAGE = re.compile(r'\bmsg=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass(frozen=True)
class ReplicationState:
    """What Litestream says now."""

    running: bool
    pid: int | None = None
    last_sync: datetime | None = None
    lag_seconds: float | None = None
    restarts: int = 0
    exited: str | None = None  # why it is not running (an unexpected exit)
    problem: str | None = None  # the control socket did not answer


def state_from(
    answer: Mapping[str, Any], database: Path, *, started: float | None
) -> tuple[datetime | None, float | None]:
    """(last sync, lag in seconds) from the socket's ``/list`` answer."""
    target = str(database.resolve())
    entry = next((d for d in answer.get("databases") or [] if str(d.get("path")) == target), None)
    last = parse_time(str(entry["last_sync_at"])) if entry and entry.get("last_sync_at") else None
    if last is not None:
        return last, max(0.0, (datetime.now(UTC) - last).total_seconds())
    return None, (time.monotonic() - started) if started is not None else None


def guarded(*argv: str) -> list[str]:
    """The command line that runs ``argv`` under the guardian (``guardian.py``); start it with
    ``preexec_fn=dies_with(os.getpid())`` from a thread that lives as long as it should."""
    return [sys.executable, "-I", "-S", str(GUARDIAN), *argv]


def _duration(seconds: float) -> str:
    from dbkeeper.texts import duration  # PTB's constants: only when there is one to say

    return duration(seconds)


def _level(line: str) -> int:
    """Litestream's errors and warnings as ours; of its routine lines, only those an operator
    would miss at INFO (a full snapshot, a database found behind the replica)."""
    found = _LEVEL.search(line)
    name = found.group(1).upper() if found else ""
    if name.startswith("ERR"):
        return logging.ERROR
    if name.startswith("WARN"):
        return logging.WARNING
    if any(event in line for event in INFO_EVENTS):
        return logging.INFO
    return logging.DEBUG


class Replicator:
    """One Litestream child for the live database: started, watched, restarted, stopped."""

    def __init__(
        self,
        litestream: Litestream,
        database: Path,
        target: Target,
        settings: ReplicationSettings,
        *,
        shutdown_sync_seconds: float,
        on_failure: Callable[[str], Awaitable[None]],
    ) -> None:
        self.litestream = litestream
        self.database = database.resolve()
        self.target = target
        self.settings = settings
        self.shutdown_sync_seconds = shutdown_sync_seconds
        self.on_failure = on_failure
        self.directory = runtime_dir(self.database)
        self.config = self.directory / "litestream.yml"
        self.socket = socket_path(self.database)
        self.restarts = 0
        self._process: Process | None = None  # the guardian (guardian.py), Litestream's parent
        self._litestream_pid: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._wanted = False
        self._started_at: float | None = None
        self._alerted = False
        self._exited: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    # -- configuration (blocking) -------------------------------------------------------------

    def _config_text(self) -> str:
        return render_config(
            self.database,
            self.target,
            self.settings,
            socket=self.socket,
            shutdown_sync_seconds=self.shutdown_sync_seconds,
        )

    def validate(self) -> None:
        """Litestream reads the configuration it will get (a wrong value fails here, before
        migrations; the database's directory may not exist yet, so this copy is temporary)."""
        with tempfile.NamedTemporaryFile("w", prefix="dbkeeper-litestream-", suffix=".yml") as f:
            f.write(self._config_text())
            f.flush()
            result = self.litestream.run(
                ["databases", "-no-expand-env", "-config", f.name],
                timeout=30,
                environment=child_environment(self.target),
            )
        if result.returncode != 0:
            raise ReplicationError(
                f"Litestream {self.litestream.version} rejects the configuration dbkeeper made "
                f"from [replication] and [offsite] ({result.problem()}); check those keys"
            )

    def write_config(self) -> None:
        """The configuration, beside the database (0600, in a 0700 directory)."""
        ensure_private_dir(self.directory)
        if self.socket.parent != self.directory:
            ensure_private_dir(self.socket.parent)
        write_private(self.config, self._config_text())

    # -- the process --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Started and not stopped (it may be between a crash and its restart)."""
        return self._wanted

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """Litestream's (its guardian is the child dbkeeper watches)."""
        return self._litestream_pid if self.running else None

    async def start(self) -> None:
        """Start Litestream and watch it; returns once its control socket answers."""
        if self._wanted:
            return
        self._wanted = True
        self._wake = asyncio.Event()
        self._alerted = False
        try:
            await asyncio.to_thread(remove_leftovers, self.database)
            await self._spawn()
        except (OSError, DatabaseError) as error:  # the supervisor tries again
            self._exited = f"could not be started: {error}"
            log.error("replication: cannot start Litestream: %s", error)
        self._supervisor = asyncio.create_task(self._supervise(), name="dbkeeper-litestream")

    async def _spawn(self) -> None:
        await asyncio.to_thread(self.write_config)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._tail.clear()
        # Its log comes through a pipe whose read end Litestream holds as well (pass_fds):
        # when dbkeeper dies, the pipe keeps a reader, so Litestream's next log line does not
        # kill it with SIGPIPE (Go exits on a broken stderr) before its final sync.
        read_end, write_end = os.pipe()
        try:
            # Through the guardian (guardian.py): Litestream gets one SIGTERM when dbkeeper
            # dies, however many threads dbkeeper has; the guardian dies with dbkeeper.
            process = await asyncio.create_subprocess_exec(
                *guarded(
                    self.litestream.path, "replicate", "-no-expand-env", "-config", str(self.config)
                ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=write_end,
                pass_fds=(read_end,),
                env=child_environment(self.target),
                process_group=0,
                preexec_fn=dies_with(os.getpid()),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        assert process.stdout is not None
        try:
            self._litestream_pid = int(await asyncio.wait_for(process.stdout.readline(), 10))
        except (ValueError, TimeoutError):
            self._litestream_pid = None
        stream = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(read_end, "rb", 0)
        )
        self._process = process
        self._started_at = time.monotonic()
        self._exited = None
        self._reader = asyncio.create_task(
            self._read(stream, transport), name="dbkeeper-litestream-log"
        )
        log.info(
            "replication: Litestream %s (pid %s) streams %s to %s every %gs",
            self.litestream.version,
            self._litestream_pid,
            self.database.name,
            self.target,
            self.settings.sync_interval_seconds,
        )
        await self._wait_ready(process)

    async def _wait_ready(self, process: Process) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while process.returncode is None and time.monotonic() < deadline:
            try:
                await ask_async(self.socket, "/info", timeout=1.0)
                return
            except (OSError, ReplicationError, TimeoutError):
                await asyncio.sleep(0.05)
        if process.returncode is None:
            log.warning("replication: Litestream's control socket %s does not answer", self.socket)

    async def _read(self, stream: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        """Litestream's log lines: kept (its last words) and logged (errors as errors)."""
        try:
            await self._read_lines(stream)
        finally:
            transport.close()

    async def _read_lines(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the reader's limit: skip it
                continue
            if not raw:
                return
            line = redact(raw.decode(errors="replace").rstrip())
            self._tail.append(line)
            level = _level(line)
            message = _MESSAGE.search(line)
            shown = line if level > logging.INFO or message is None else message.group(1)
            log.log(level, "litestream: %s", shown)

    def last_words(self) -> str:
        important = [line for line in self._tail if _level(line) >= logging.WARNING]
        lines = important[-2:] or list(self._tail)[-2:]
        return "; ".join(line[:300] for line in lines) or "it wrote nothing"

    def _stopped(self) -> bool:
        return not self._wanted

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopped():
            process = self._process
            if process is not None:
                code = await process.wait()
                if self._reader is not None:
                    await asyncio.wait({self._reader}, timeout=2)
                if self._stopped():  # stopped meanwhile: not a crash
                    return
                ran = time.monotonic() - (self._started_at or time.monotonic())
                if ran >= STABLE_SECONDS:
                    failures, self._alerted = 0, False
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                self._exited = f"exited ({how}) after {_duration(ran)}: {self.last_words()}"
                self._process = None
            delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
            failures += 1
            self.restarts += 1
            text = (
                f"replication stopped: Litestream {self._exited}. Restarting it in "
                f"{delay:.0f}s; it resumes where it stopped (nothing committed is lost), but "
                "until it runs the replica falls behind."
            )
            log.error("%s", text)
            if not self._alerted:
                self._alerted = True
                await self.on_failure(text)
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._stopped():
                return
            try:
                await self._spawn()
                log.info("replication: Litestream restarted (restart %d)", self.restarts)
            except (OSError, DatabaseError) as error:
                self._exited = f"could not be started again: {error}"

    async def stop(self, timeout: float) -> str | None:
        """SIGTERM, and wait (at most ``timeout``) while Litestream does its final sync.
        Returns what went wrong with that sync, if anything."""
        self._wanted = False
        if self._wake is not None:
            self._wake.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        process, self._process = self._process, None
        problem = None
        if process is not None and process.returncode is None:
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), max(0.1, timeout))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
                problem = (
                    f"Litestream's final sync did not finish within {timeout:.1f}s and it was "
                    "killed: the newest changes reach the replica when replication runs again"
                )
            if self._reader is not None:
                await asyncio.wait({self._reader}, timeout=2)
            if problem is None and any("shutdown sync failed" in line for line in self._tail):
                problem = (
                    "Litestream's final sync failed (is the storage reachable?): the newest "
                    "changes reach the replica when replication runs again"
                )
            log.info(
                "replication: Litestream stopped in %.2fs%s",
                time.monotonic() - started,
                "" if problem else " after its final sync",
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        return problem

    async def state(self) -> ReplicationState:
        if not self.running:
            return ReplicationState(False, restarts=self.restarts, exited=self._exited)
        try:
            answer = await ask_async(self.socket, "/list", timeout=2.0)
        except (OSError, ReplicationError, TimeoutError) as error:
            return ReplicationState(
                True, self.pid, restarts=self.restarts, problem=f"no answer ({error})"
            )
        last, lag = state_from(answer, self.database, started=self._started_at)
        return ReplicationState(True, self.pid, last, lag, self.restarts)

    def sync(self, timeout: float, limits: Limits | None = None) -> None:
        """Upload everything committed so far, waiting for it (blocking; for the drill)."""
        result = self.litestream.run(
            [
                "sync",
                "-wait",
                "-timeout",
                str(max(1, round(timeout))),
                "-socket",
                str(self.socket),
                str(self.database),
            ],
            timeout=timeout + 5,
            environment=child_environment(self.target),
            limits=limits,
        )
        if result.returncode != 0:
            raise ReplicationError(
                f"Litestream could not upload the newest changes within {timeout:.0f}s "
                f"({result.problem()}): is the storage reachable?"
            )


def read_socket(database: Path) -> ReplicationState:
    """What a running Litestream says about ``database``, from any process (blocking)."""
    socket = socket_path(database)
    try:
        info = ask(socket, "/info", timeout=2.0)
        answer = ask(socket, "/list", timeout=2.0)
    except (OSError, ReplicationError) as error:
        return ReplicationState(False, problem=str(error))
    last, lag = state_from(answer, database, started=None)
    pid = info.get("pid")
    return ReplicationState(True, int(pid) if pid else None, last, lag)


# -- the part the database plugin holds ---------------------------------------------------------


class Replication:
    """``[replication]`` for the database plugin: prepare, follow the leader, check, drill,
    pause for restores, stop last."""

    def __init__(
        self,
        settings: Settings,
        *,
        database: Path | None,
        dialect: str,
        engine: BackupEngine,
        busy_timeout: float,
    ) -> None:
        self.settings = settings.section(ReplicationSettings)
        self.offsite = settings.section(OffsiteSettings)
        self.shutdown_seconds = settings.shutdown.timeout_seconds
        self.database = database
        self.dialect = dialect
        self.engine = engine
        self.busy_timeout = busy_timeout
        self.replicator: Replicator | None = None
        self.replica: Replica | None = None
        self.context: PluginContext | None = None
        self.one_shot = False
        self._leading = False
        self._drill_stop = threading.Event()  # set at shutdown: a drill gives up
        self._drill_task: asyncio.Task[DrillResult | None] | None = None
        # (unix time, lag) of each check while leading: the status page's chart
        self.lag_history: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=LAG_POINTS
        )

    @property
    def applies(self) -> bool:
        """Replication is on, for a SQLite file."""
        return self.settings.enabled and self.dialect == "sqlite" and self.database is not None

    def register(self, context: PluginContext) -> None:
        """The ``replication`` check and its metrics (setup: no I/O)."""
        if not self.applies:
            return
        self.context = context
        self.one_shot = context.one_shot
        context.add_secret(*(os.environ.get(name) for name in CREDENTIAL_VARIABLES))
        context.add_check("replication", self.check, failing_as="cannot read the replication state")
        from .metrics import replication_metrics

        context.add_metrics(replication_metrics(lambda: context.last_health_report))
        if not context.one_shot:
            from .replication_status import replication_section

            context.add_status_section("Replication", lambda: replication_section(self))

    # -- startup and shutdown -------------------------------------------------------------------

    def prepare(self) -> None:
        """Before migrations (blocking): the binary, the target, a configuration Litestream
        accepts. Raises ``ReplicationError`` (a startup error) when any is wrong."""
        if not self.settings.enabled:
            return
        if not self.applies:
            log.warning(
                "[replication] enabled applies to SQLite only; this database is %s, so nothing "
                "is replicated (PostgreSQL has its own tools for this: pgBackRest, WAL-G)",
                self.dialect,
            )
            return
        assert self.database is not None
        protect_credentials()
        litestream = Litestream.find(self.settings.litestream_bin)
        target = Target.of(self.offsite)
        budget = self.shutdown_seconds
        replicator = Replicator(
            litestream,
            self.database,
            target,
            self.settings,
            shutdown_sync_seconds=max(1.0, min(5.0, budget / 3)),
            on_failure=self._alert,
        )
        replicator.validate()
        self.replicator = replicator
        self.replica = Replica(litestream, self.database, target, self.settings)
        log.info(
            "replication: Litestream %s at %s, replica %s",
            litestream.version,
            litestream.path,
            target,
        )

    async def follow(self, leading: bool) -> None:
        """The leader replicates; a standby does not (leadership changes call this)."""
        self._leading = leading
        replicator = self.replicator
        if replicator is None:
            return
        if leading and not replicator.active:
            await replicator.start()
        elif not leading and replicator.active:
            problem = await replicator.stop(PAUSE_STOP_SECONDS)
            log.info("replication: stopped here, this instance no longer leads")
            if problem:
                await self._alert(problem)

    def schedule(self, context: PluginContext) -> None:
        """The restore drill, every ``drill_interval_seconds`` (the leader runs it)."""
        if self.replicator is None:
            return
        interval = self.settings.drill_interval_seconds
        first = self._first_drill_in(interval)
        context.add_job(self.scheduled_drill, name=DRILL_JOB, interval=interval, first=first)
        log.info(
            "replication: restore drill every %s; the next in %s",
            _duration(interval),
            _duration(first),
        )

    def _first_drill_in(self, interval: float) -> float:
        assert self.database is not None
        last = last_drill(self.database)
        if last is None:
            return min(interval, FIRST_DRILL_SECONDS)
        age = (datetime.now(UTC) - last.at).total_seconds()
        return min(interval, max(1.0, interval - age))

    async def stop(self, deadline: Deadline) -> None:
        """Last at shutdown, after the database closed: a running drill gives up, then
        Litestream's final sync."""
        self._drill_stop.set()
        if self.context is not None:
            self.context.remove_jobs(DRILL_JOB)
        if self._drill_task is not None:
            await asyncio.wait({self._drill_task}, timeout=max(0.1, deadline.remaining() / 2))
        if self.replicator is None or not self.replicator.active:
            return
        timeout = max(0.1, deadline.remaining() - SHUTDOWN_RESERVE_SECONDS)
        problem = await self.replicator.stop(timeout)
        if problem:
            await self._alert(problem)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Litestream stopped (after a final sync) for the block, started again after it: a
        restore swaps the file under it."""
        replicator = self.replicator
        if replicator is None or not replicator.active:
            yield
            return
        problem = await replicator.stop(PAUSE_STOP_SECONDS)
        if problem:
            log.warning("replication: %s", problem)
        try:
            yield
        finally:
            if self._leading or self.context is None:
                await replicator.start()

    async def _alert(self, text: str) -> None:
        if self.context is not None:
            await self.context.alert(text, key=ALERT_KEY)

    # -- health ---------------------------------------------------------------------------------

    async def state(self) -> ReplicationState:
        if self.replicator is not None and self.replicator.active:
            return await self.replicator.state()
        assert self.database is not None
        database = self.database
        return await asyncio.to_thread(read_socket, database)

    async def check(self) -> Outcome:
        """The ``replication`` check: ``lag 0.8 s | last sync 2026-12-01 10:00:01 UTC``;
        unhealthy past max_lag_seconds or while Litestream is not running; degraded when the
        last restore drill failed."""
        from dbkeeper.health import degraded, healthy, unhealthy

        assert self.database is not None
        if not self.one_shot and not self._leading:
            leader = self.context.leadership.leader if self.context else None
            return healthy(f"standing by: {leader or 'the leader'} replicates")
        state = await self.state()
        drill = await asyncio.to_thread(last_drill, self.database)
        values: dict[str, float] = {
            "up": 1.0 if state.running else 0.0,
            "max_lag_seconds": self.settings.max_lag_seconds,
        }
        if state.last_sync is not None:
            values["last_sync_timestamp_seconds"] = state.last_sync.timestamp()
        if state.lag_seconds is not None:
            values["lag_seconds"] = round(state.lag_seconds, 3)
            self.lag_history.append((time.time(), state.lag_seconds))
        if drill is not None and drill.ok:
            values["drill_last_success_timestamp_seconds"] = drill.at.timestamp()
        limit = self.settings.max_lag_seconds
        if not state.running:
            why = (
                f"Litestream {state.exited}; restarting it"
                if state.exited
                else "Litestream is not running (the leading bot runs it)"
            )
            return unhealthy(f"not replicating: {why}", values=values)
        if state.problem is not None:
            return unhealthy(f"Litestream does not answer: {state.problem}", values=values)
        lag = state.lag_seconds or 0.0
        last = when(state.last_sync) if state.last_sync else "none yet"
        message = f"lag {lag:.1f} s | last sync {last}"
        if lag > limit:
            return unhealthy(
                f"{message}: the replica is {_duration(lag)} behind (more than [replication] "
                f"max_lag_seconds = {limit:g}); is the storage reachable with these "
                "credentials?",
                values=values,
            )
        if drill is not None and not drill.ok:
            return degraded(f"{message} | {drill.describe()}", values=values)
        if state.restarts:
            message += f" | {state.restarts} restart{'s' if state.restarts > 1 else ''}"
        return healthy(message, values=values)

    async def summary(self) -> str:
        """One line for ``/dbstats``: the check's verdict, and the last drill."""
        from dbkeeper.health import Status

        assert self.database is not None
        outcome = await self.check()
        icon = {Status.HEALTHY: "✅", Status.DEGRADED: "⚠️", Status.UNHEALTHY: "🔴"}
        text = f"{icon[outcome.status]} {outcome.message}"
        drill = await asyncio.to_thread(last_drill, self.database)
        if drill is not None and drill.ok:  # a failed one is in the message already
            text += f" | {drill.describe()}"
        return text

    # -- the restore drill --------------------------------------------------------------------

    async def scheduled_drill(self) -> None:
        """The job: starts the drill beside the job queue, which a shutdown waits for (a
        drill of a large replica takes a while; ``stop`` interrupts it instead)."""
        if not self._leading:
            log.debug("restore drill left to the leader")
            return
        if self._drill_task is not None and not self._drill_task.done():
            return
        self._drill_task = asyncio.create_task(self.drill(), name="dbkeeper-restore-drill")

    def _sync_for_drill(self, replicator: Replicator) -> Callable[[Limits], None]:
        timeout = min(60.0, self.settings.restore_timeout_seconds)
        return lambda limits: replicator.sync(timeout, limits)

    async def drill(self) -> DrillResult | None:
        """Restore the replica into a scratch file and prove it (``drill.run_drill``). A
        failure degrades the ``replication`` check: alerted as a health transition, and
        resolved when a drill passes again."""
        replica, replicator, database = self.replica, self.replicator, self.database
        if replica is None or replicator is None or database is None:
            return None
        self._drill_stop.clear()
        try:
            result = await asyncio.to_thread(
                run_drill,
                replica,
                self.engine,
                database,
                busy_timeout=self.busy_timeout,
                limits=Limits(events=(self._drill_stop,)),
                sync=self._sync_for_drill(replicator) if replicator.running else None,
            )
        except Interrupted:
            log.info("restore drill stopped: shutting down")
            return None
        return result


__all__ = [
    "Replication",
    "ReplicationState",
    "Replicator",
    "read_socket",
]
