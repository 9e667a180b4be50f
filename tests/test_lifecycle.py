"""The lifecycle's answer to a stop requested while the host starts, with plugins that record
what the host asks of them (the real processes: tests/test_migration_processes.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from dbkeeper import lifecycle
from dbkeeper.app import build_application
from dbkeeper.host import Host
from dbkeeper.plugin import Deadline, Plugin, StartupInterrupted
from tests.conftest import SettingsFactory
from tests.support.hosts import free_port


class Recorder(Plugin):
    """Starts when ``release`` is set, or gives up when interrupted (if ``interruptible``)."""

    def __init__(self, name: str, calls: list[str], *, interruptible: bool) -> None:
        self.name = name  # type: ignore[misc]
        self.calls = calls
        self.interruptible = interruptible
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.stop_asked = asyncio.Event()

    async def start(self) -> None:
        self.calls.append(f"start {self.name}")
        self.started.set()
        waits = [asyncio.ensure_future(self.release.wait())]
        if self.interruptible:
            waits.append(asyncio.ensure_future(self.stop_asked.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if not self.release.is_set():
            self.calls.append(f"gave up {self.name}")
            raise StartupInterrupted(f"{self.name} was interrupted")
        self.calls.append(f"started {self.name}")

    async def interrupt(self, why: str) -> None:
        self.calls.append(f"interrupt {self.name}: {why}")
        self.stop_asked.set()

    async def stop(self, deadline: Deadline) -> None:
        self.calls.append(f"stop {self.name}")


def _host(make_settings: SettingsFactory, tmp_path, plugins: list[Plugin]) -> Host:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'bot.db'}", health={"http_port": free_port()}
    )
    return Host(settings, build_application(settings), plugins=plugins)


async def _run_and_signal(host: Host, first: Recorder) -> tuple[int, float]:
    """``lifecycle.run`` (its signal handlers on this loop), SIGTERM to this very process once
    ``first`` is starting; the exit status and the seconds from the signal to the return."""
    running = asyncio.ensure_future(lifecycle.run(host))
    await asyncio.wait_for(first.started.wait(), 10)
    signalled = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    code = await asyncio.wait_for(running, 10)
    return code, time.monotonic() - signalled


async def test_a_signal_while_a_plugin_starts_interrupts_it_and_exits_0(
    make_settings: SettingsFactory, tmp_path
) -> None:
    calls: list[str] = []
    busy = Recorder("busy", calls, interruptible=True)
    later = Recorder("later", calls, interruptible=True)
    later.release.set()
    code, took = await _run_and_signal(_host(make_settings, tmp_path, [busy, later]), busy)
    assert code == 0 and took < 2
    assert calls == [
        "start busy",
        "interrupt busy: received SIGTERM",
        "interrupt later: received SIGTERM",  # generic: the host asks every plugin
        "gave up busy",
    ]


async def test_a_start_that_finishes_despite_the_signal_starts_nothing_more(
    make_settings: SettingsFactory, tmp_path
) -> None:
    """A plugin that cannot give up finishes its start; the next one is not started, and the
    one that started is stopped again."""
    calls: list[str] = []
    stubborn = Recorder("stubborn", calls, interruptible=False)
    later = Recorder("later", calls, interruptible=True)
    later.release.set()
    host = _host(make_settings, tmp_path, [stubborn, later])

    async def finish_soon() -> None:
        await stubborn.stop_asked.wait()
        stubborn.release.set()

    finishing = asyncio.ensure_future(finish_soon())
    code, _ = await _run_and_signal(host, stubborn)
    await finishing
    assert code == 0
    assert calls == [
        "start stubborn",
        "interrupt stubborn: received SIGTERM",
        "interrupt later: received SIGTERM",
        "started stubborn",
        "stop stubborn",
    ]
