"""Which of several bot instances on one database leads: a lease that a stuck leader loses.

The leader does what must happen once per database, not once per instance: scheduled backups,
the shutdown backup, alerts, and (in polling mode) taking Telegram updates, since Telegram
serves one ``getUpdates`` poller per token. Every instance keeps answering health requests and,
in webhook mode, updates.

PostgreSQL: a lease with a heartbeat
------------------------------------
The one row of ``dbkeeper_leader`` (in the bot's database, so every answer names the leader of
its own database) says who leads and carries its heartbeat, ``beat``. Every
``[instance] leader_poll_seconds`` (P) the leader renews it (``beat + 1``, only while the row
still carries its claim's token) and each standby reads it. A claim is a compare-and-set on the
row exactly as the standby last saw it: one standby wins, and a leader that comes back after a
claim learns that it lost before it acts again. Durations are measured by each instance's own
monotonic clock; no two clocks are ever compared.

- A leader acts for at most 2P after the start of its last successful renewal. Past that it
  steps down (no polling, no backups, no alerts) until a renewal succeeds again. ``is_leader``
  answers from the clock, so a process that resumes after a pause knows its time is up before
  anything else runs.
- A standby takes over no sooner than 3P after it first saw the last heartbeat (so the old
  leader has stopped, with P to spare for stopping):
  - the leader's session is gone (its advisory lock is free: the process died or its connection
    was cut): after 2P of silence it claims, and leads from 3P;
  - the leader's session is there but silent (a paused or hung process, a connection that
    hangs): after 4P it claims and ends that session, which frees the lock;
  - the lease was released (by a leader that stopped) or never taken: at once.
- A leader whose renewals fail keeps its claim. When the database answers again and nobody has
  claimed meanwhile it leads again at once, so a whole server restart keeps the leader (a
  standby needs 2P of contact before it claims); during the outage the cut-off leader is the
  one that alerts (``sends_alerts``), so it is reported once, not by nobody and not by all.

The advisory lock (key 2, on a connection named after the instance) only tells standbys early
that the leader's session is gone; the row decides.

SQLite: a file lock
-------------------
The instances of a SQLite bot share one machine: ``flock`` on ``bot.db.leader.lock``, which the
kernel drops when its holder exits; a standby takes a free lock at its next poll. A paused
(``SIGSTOP``, ``docker pause``) SQLite leader keeps leading until it resumes or exits: the
kernel keeps a stopped process's locks, SQLite's included (a leader paused inside a write blocks
every writer, so a standby could not do the database work either). A paused process no longer
answers ``/livez``, which is how its supervisor (Docker, Kubernetes, systemd) learns to restart
it; its lock goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import Connection, Engine, exc, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import func

from dbkeeper.leadership import ChangeCallback

from .engines import create_database_engine, database_url, sqlite_file
from .locks import LEADER_LOCK_ID, AdvisoryLock, FileLock, leader_lock
from .migrate.bookkeeping import dbkeeper_leader
from .retry import describe_error
from .settings import DatabaseSettings
from .timeouts import in_daemon_thread

log = logging.getLogger("dbkeeper.leader")


@dataclass(frozen=True)
class LeaseTimes:
    """The lease's durations, all from ``[instance] leader_poll_seconds`` (P)."""

    poll: float

    @property
    def step_down(self) -> float:
        """A leader acts this long after the start of its last successful renewal."""
        return 2 * self.poll

    @property
    def takeover(self) -> float:
        """A new leader acts no sooner than this after the last heartbeat it saw."""
        return 3 * self.poll

    @property
    def claim_free(self) -> float:
        """A lease whose holder's session is gone is claimed after this much silence."""
        return 2 * self.poll

    @property
    def break_stuck(self) -> float:
        """A lease whose holder's session is still there is claimed after this much silence."""
        return 4 * self.poll


@dataclass(frozen=True)
class _Lease:
    """The lease row as read."""

    holder: str
    token: str
    term: int
    beat: int


@dataclass(frozen=True)
class _Claim:
    """This instance's claim: leads from ``act_from`` (monotonic) while renewed."""

    act_from: float


@dataclass(frozen=True)
class _Outcome:
    """What one round found; applied on the event loop."""

    started: float  # monotonic, before the round talked to the database
    kind: Literal["renewed", "claimed", "lost", "standby"]
    leader: str | None = None
    claim: _Claim | None = None


class _PostgresLease:
    """The lease row and the advisory lock. Blocking; one round at a time (``_busy``)."""

    def __init__(self, engine: Engine, instance: str, times: LeaseTimes) -> None:
        self.engine = engine
        self.instance = instance
        self.times = times
        self.lock = AdvisoryLock(engine, LEADER_LOCK_ID)
        self.margin = times.takeover - times.step_down
        self._token = ""  # our claim's token while we hold (or held, unconfirmed) the lease
        self._ready = False  # the table and its row exist
        self._seen: _Lease | None = None  # the row as we last saw it, while in contact
        self._seen_at = 0.0  # when we first saw it that way
        self._busy = threading.Lock()

    def round(self, started: float) -> _Outcome:
        with self._busy:
            try:
                with self._connection() as connection:
                    if self._token:
                        return self._renew(connection, started)
                    return self._observe(connection, started)
            except BaseException:
                self._ready = False  # check the table again (a restore may have replaced it)
                self._seen = None  # out of contact: watch the heartbeat afresh
                if not self._token:
                    self._release_lock()  # a lock taken to look (or for a claim lost in transit)
                raise

    def release(self) -> None:
        """Hand the lease back (the next standby leads at once), then the lock."""
        with self._busy:
            try:
                if self._token:
                    table = dbkeeper_leader
                    with self._connection() as connection:
                        connection.execute(
                            update(table)
                            .where(table.c.id == 1, table.c.token == self._token)
                            .values(holder="", token="", beat=table.c.beat + 1)
                        )
            finally:
                self._token = ""
                self._release_lock()

    # -- the leader ----------------------------------------------------------------------------

    def _renew(self, connection: Connection, started: float) -> _Outcome:
        renewed = connection.execute(
            update(dbkeeper_leader)
            .where(dbkeeper_leader.c.id == 1, dbkeeper_leader.c.token == self._token)
            .values(beat=dbkeeper_leader.c.beat + 1, renewed_at=func.now())
        ).rowcount
        if renewed:
            self._hold_lock()
            return _Outcome(started, "renewed", leader=self.instance)
        lease = self._read(connection)  # someone claimed it while we could not renew
        self._token = ""
        self._release_lock()
        self._watch(lease)
        return _Outcome(started, "lost", leader=lease.holder or None)

    def _hold_lock(self) -> None:
        """Best effort: the lock only tells standbys early that our session is gone."""
        try:
            if not self.lock.alive():
                self.lock.try_acquire()
        except Exception as error:
            log.debug("leader lock not taken: %s", describe_error(error))

    # -- a standby -----------------------------------------------------------------------------

    def _observe(self, connection: Connection, started: float) -> _Outcome:
        lease = self._read(connection)
        silent = self._watch(lease)
        if not lease.token:  # released, or never taken: nobody can be acting
            return self._claim(connection, lease, started, act_from=time.monotonic())
        free = self.lock.try_acquire()  # kept if we claim; a free lock: its holder is gone
        act_from = self._seen_at + self.times.takeover
        if free and silent >= self.times.claim_free:
            return self._claim(connection, lease, started, act_from=act_from)
        if not free and silent >= self.times.break_stuck:
            outcome = self._claim(connection, lease, started, act_from=act_from)
            if outcome.kind == "claimed":
                self._end_stuck(connection, lease, silent)
            return outcome
        if free:
            self._release_lock()
        return _Outcome(started, "standby", leader=lease.holder)

    def _watch(self, lease: _Lease) -> float:
        """Note the row as seen now; how long it has stood still in our sight."""
        now = time.monotonic()
        if lease != self._seen:
            self._seen, self._seen_at = lease, now
        return now - self._seen_at

    def _claim(
        self, connection: Connection, seen: _Lease, started: float, *, act_from: float
    ) -> _Outcome:
        token = uuid.uuid4().hex
        table = dbkeeper_leader
        term = connection.execute(
            update(table)
            .where(
                table.c.id == 1,
                table.c.token == seen.token,
                table.c.term == seen.term,
                table.c.beat == seen.beat,
            )
            .values(
                holder=self.instance,
                token=token,
                term=table.c.term + 1,
                beat=0,
                renewed_at=func.now(),
            )
            .returning(table.c.term)
        ).scalar()
        if term is None:  # the row moved since we read it: its holder is alive, or another won
            self._release_lock()
            return _Outcome(started, "standby", leader=seen.holder or None)
        self._token = token
        if seen.token:
            log.info(
                "%s claimed the lease of %s (no heartbeat for %.1fs); it leads in %.1fs",
                self.instance,
                seen.holder,
                time.monotonic() - self._seen_at,
                max(0.0, act_from - time.monotonic()),
            )
        self._hold_lock()
        return _Outcome(started, "claimed", leader=self.instance, claim=_Claim(act_from))

    def _end_stuck(self, connection: Connection, stuck: _Lease, silent: float) -> None:
        """The old leader's session still holds the lock: end it, so the lock follows the lease
        (and a resumed leader finds its session gone)."""
        try:
            ended = self.lock.end_holding_session(connection)
        except Exception as error:
            log.warning(
                "cannot end the session of %s, which stopped renewing its lease %.0fs ago (%s); "
                "leading without the leader lock. Instances should share one database role "
                "(or have pg_signal_backend).",
                stuck.holder,
                silent,
                describe_error(error),
            )
            return
        if ended:
            log.info("ended the database session of %s (stuck for %.0fs)", stuck.holder, silent)
        self._hold_lock()

    # -- the row and the lock ------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            if not self._ready:
                self._ensure(connection)
            yield connection

    def _ensure(self, connection: Connection) -> None:
        """Create the table and its row when missing (instances starting together may race)."""
        try:
            dbkeeper_leader.create(connection, checkfirst=True)
        except (exc.IntegrityError, exc.ProgrammingError) as error:
            if connection.dialect.has_table(connection, dbkeeper_leader.name):
                pass  # another instance created it meanwhile
            elif getattr(error.orig, "sqlstate", None) == "42501":
                raise PermissionError(
                    f"cannot create the table {dbkeeper_leader.name}, which holds the leader's "
                    "lease (permission denied): until it exists no instance leads. Grant this "
                    "role CREATE on the schema, or start one instance once with a role that can"
                ) from None
            else:
                raise
        connection.execute(
            pg_insert(dbkeeper_leader)
            .values(id=1, holder="", token="", term=0, beat=0)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        self._ready = True

    def _read(self, connection: Connection) -> _Lease:
        table = dbkeeper_leader
        row = connection.execute(
            select(table.c.holder, table.c.token, table.c.term, table.c.beat).where(table.c.id == 1)
        ).one()
        return _Lease(row.holder, row.token, int(row.term), int(row.beat))

    def _release_lock(self) -> None:
        try:
            self.lock.release()
        except Exception:  # closing the session released it anyway
            log.debug("releasing the leader lock failed", exc_info=True)


class _FileLease:
    """``flock`` on a file beside the SQLite database, naming the holder. Blocking."""

    margin = math.inf  # a held file lock is never taken over: nothing to hurry for

    def __init__(self, path: Path, instance: str) -> None:
        self.instance = instance
        self.lock: FileLock = leader_lock(path, instance)
        self._busy = threading.Lock()

    def round(self, started: float) -> _Outcome:
        with self._busy:
            if self.lock.held:  # the kernel keeps it for as long as we live
                return _Outcome(started, "renewed", leader=self.instance)
            if self.lock.try_acquire():
                claim = _Claim(act_from=time.monotonic())
                return _Outcome(started, "claimed", leader=self.instance, claim=claim)
            holder = self.lock.holder()
            leader = None if holder == "another process" else holder
            return _Outcome(started, "standby", leader=leader)

    def release(self) -> None:
        with self._busy:
            self.lock.release()


class Leadership:
    """Campaigns for the lease, renews or watches it, and reports changes (see the module doc).

    Rounds run one at a time on a daemon thread: a database that stopped answering never
    blocks the event loop, and the lease's deadline is kept by the clock, not by the round.
    """

    def __init__(
        self,
        database: DatabaseSettings,
        *,
        instance: str,
        poll_seconds: float = 5.0,
    ) -> None:
        self.database = database
        self.instance = instance
        self.times = LeaseTimes(poll_seconds)
        self._store: _PostgresLease | _FileLease | None = None
        self._engine: Engine | None = None
        self._claim: _Claim | None = None
        self._confirmed_at = -math.inf  # start of the last successful renewal (monotonic)
        self._seen_leader: str | None = None  # the leader's name as a standby last saw it
        self._failing_since: float | None = None  # rounds fail (or hang) since then
        self._published = False  # what the listeners were last told
        self._listeners: list[ChangeCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: asyncio.Future[_Outcome] | None = None
        self._pending_since = 0.0
        self._next_round_at = 0.0
        self._stopped = False
        self._timeout = max(1.0, database.connect_timeout_seconds)
        self._hung_after = min(self._timeout, self.times.poll)  # a round this slow is failing

    # -- what the host asks (dbkeeper.leadership.LeaderElection) --------------------------------

    @property
    def is_leader(self) -> bool:
        claim = self._claim
        if claim is None or self._stopped:
            return False
        now = time.monotonic()
        return claim.act_from <= now < self._confirmed_at + self.times.step_down

    @property
    def leader(self) -> str | None:
        if self.is_leader:
            return self.instance
        if self._claim is not None:
            return None  # our own claim, not in force yet or not confirmed: unknown
        return self._seen_leader

    @property
    def sends_alerts(self) -> bool:
        return self.is_leader or (self._claim is not None and self._failing_since is not None)

    @property
    def margin_seconds(self) -> float:
        return self._store.margin if self._store is not None else self.times.poll

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(is_leader)`` whenever this instance gains or loses leadership."""
        self._listeners.append(callback)

    # -- start, stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """One round now (a lone instance leads from the start), then keep going."""
        self._store = self._make_store()  # no I/O: engines connect lazily
        self._stopped = False
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="dbkeeper-leadership")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop campaigning and hand the lease back, so that a standby takes over at once.

        Handing back waits at most ``timeout`` seconds (a hung server): the lock goes with the
        session anyway, and the lease runs out.
        """
        was_leader = self.is_leader
        self._stopped = True  # is_leader is false from here on
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        store = self._store
        if store is not None:  # waits for a round still under way, so it keeps nothing
            limit = self._timeout if timeout is None else min(self._timeout, timeout)
            try:
                await asyncio.wait_for(in_daemon_thread(store.release), max(0.1, limit))
            except TimeoutError:
                log.warning("handing back the leader lease timed out; it runs out on its own")
            except Exception as error:
                log.warning("handing back the leader lease failed: %s", describe_error(error))
        if was_leader:
            log.info("%s stepped down as leader", self.instance)
        self._claim = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- rounds --------------------------------------------------------------------------------

    async def poll(self) -> None:
        """One round now (or the one under way), then report a change."""
        pending = self._pending or self._begin_round()
        await asyncio.wait({pending}, timeout=self._timeout)
        self._settle()
        await self._publish()

    async def _run(self) -> None:
        while not self._stopped:
            await self._wait_until(self._next_wake())
            await self._step()

    async def _step(self) -> None:
        if self._stopped:
            return
        self._settle()
        if self._pending is None and time.monotonic() >= self._next_round_at:
            pending = self._begin_round()
            # After a pause the lease may have run out while nothing ran: learn where we
            # stand before telling anyone (is_leader already says no meanwhile).
            await asyncio.wait({pending}, timeout=min(self._timeout, self.times.poll / 4))
            self._settle()
        await self._publish()

    def _begin_round(self) -> asyncio.Future[_Outcome]:
        store = self._store
        assert store is not None
        started = time.monotonic()
        pending = in_daemon_thread(lambda: store.round(started), name="dbkeeper-leadership")
        self._pending, self._pending_since = pending, started
        self._next_round_at = started + self.times.poll
        return pending

    def _next_wake(self) -> float:
        now = time.monotonic()
        if self._pending is None:
            wake = self._next_round_at
        elif self._pending.done():
            return now  # settle it
        else:  # when it finishes (``_wait_until``), or when it counts as hanging
            noted = self._pending_since + self._hung_after
            wake = noted if noted > now else math.inf
        claim = self._claim
        if claim is not None:
            for moment in (claim.act_from, self._confirmed_at + self.times.step_down):
                if moment > now:
                    wake = min(wake, moment)
        return wake

    async def _wait_until(self, moment: float) -> None:
        """Until ``moment`` (monotonic), or until the round under way finishes."""
        delay = None if moment == math.inf else max(0.0, moment - time.monotonic())
        if self._pending is not None and not self._pending.done():
            await asyncio.wait({self._pending}, timeout=delay)
        else:
            await asyncio.sleep(self.times.poll if delay is None else delay)

    def _settle(self) -> None:
        """Apply the round that finished; note one that hangs."""
        pending = self._pending
        if pending is None:
            return
        if not pending.done():
            if time.monotonic() - self._pending_since >= self._hung_after:
                self._failing(f"the database did not answer within {self._hung_after:.1f}s")
            return
        self._pending = None
        try:
            outcome = pending.result()
        except Exception as error:
            self._failing(describe_error(error))
            self._next_round_at = self._pending_since + self.times.poll / 4  # probe fast
            return
        self._apply(outcome)

    def _failing(self, why: str) -> None:
        if self._failing_since is not None:
            return
        self._failing_since = time.monotonic()
        if self._claim is None:
            log.warning("leader election failed (%s); trying again", why)
            return
        left = self._confirmed_at + self.times.step_down - time.monotonic()
        then = f"it stops leading in {left:.1f}s unless it can" if left > 0 else "not leading"
        log.warning("%s cannot renew its leader lease (%s); %s", self.instance, why, then)

    def _apply(self, outcome: _Outcome) -> None:
        if self._stopped:
            return  # stop() hands back whatever this round took
        if self._failing_since is not None:
            log.info("leader election: the database answers again")
            self._failing_since = None
        if outcome.kind == "renewed":
            self._confirmed_at = outcome.started
        elif outcome.kind == "claimed":
            self._claim = outcome.claim
            self._confirmed_at = outcome.started
        elif outcome.kind == "lost":
            self._claim = None
            self._seen_leader = outcome.leader
            log.info(
                "%s lost the lead: %s took over while it could not renew its lease",
                self.instance,
                outcome.leader or "another instance",
            )
        else:
            self._seen_leader = outcome.leader

    async def _publish(self) -> None:
        leading = self.is_leader
        if leading == self._published or self._stopped:
            return
        self._published = leading
        if leading:
            log.info("%s is now the leader", self.instance)
        elif self._claim is not None:
            log.warning(
                "%s stepped down: its leader lease was not renewed for %.1fs (polling, backups "
                "and alerts stop); it leads again once it renews, unless a standby took over",
                self.instance,
                time.monotonic() - self._confirmed_at,
            )
        else:
            log.info(
                "%s is no longer the leader; %s leads",
                self.instance,
                self._seen_leader or "another instance",
            )
        for callback in self._listeners:
            try:
                await callback(leading)
            except Exception:
                log.exception("a leadership listener failed")

    def _make_store(self) -> _PostgresLease | _FileLease:
        file = sqlite_file(database_url(self.database))
        if file is None:
            # Its own connections, named so that the server's activity view shows who leads.
            self._engine = create_database_engine(self.database, "leader", name=self.instance)
            return _PostgresLease(self._engine, self.instance, self.times)
        return _FileLease(file, self.instance)
