"""Blocking database work that may hang, run so that it never hangs the bot.

A statement on a server that stopped answering can block its thread for as long as the TCP
connection lives. Such work (health probes, the leader lock) runs here on a daemon thread of
its own, never on a shared pool and never on the event loop; the caller bounds how long it
waits (the health registry's check timeout, the leader's poll). When the caller gives up:

* the running statement is interrupted where the driver allows it (SQLite's ``interrupt``;
  PostgreSQL work is bounded by its connection's timeouts instead, see ``engines``);
* the awaiting coroutine still waits for the thread to end, so whoever tracks it (the health
  registry) sees the work as running until it really stopped, and never starts a second copy;
* as a daemon, a thread stuck for good can hold neither a pool nor the process exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """The work was given up on before its statement started."""


class Interrupter:
    """Lets the event loop abort a statement running on a worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abort: Callable[[], None] | None = None
        self.fired = False

    def arm(self, abort: Callable[[], None] | None) -> None:
        with self._lock:
            if self.fired:
                raise Interrupted("given up before it started")
            self._abort = abort

    def disarm(self) -> None:
        with self._lock:
            self._abort = None

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            abort = self._abort
        if abort is not None:
            abort()


def in_daemon_thread(work: Callable[[], T], name: str = "dbkeeper-check") -> asyncio.Future[T]:
    """Run blocking ``work()`` on a new daemon thread; await the returned future for its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as caught:
            error = caught
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def offload(
    work: Callable[[], T], interrupter: Interrupter | None = None, *, name: str = "dbkeeper-check"
) -> T:
    """Await ``work()`` on a daemon thread. Cancelled, it interrupts the work, waits for the
    thread to end, then lets the cancellation through (see the module docstring)."""
    future = in_daemon_thread(work, name)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if interrupter is not None:
            interrupter.fire()
        with contextlib.suppress(BaseException):
            await asyncio.shield(future)
        raise
