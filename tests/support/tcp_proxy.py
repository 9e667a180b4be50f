"""A real TCP forwarder on 127.0.0.1 that plays a database server going down, hanging, coming back.

Point the bot's database URL at the proxy instead of the server (never stop the real
PostgreSQL service: other tests use it at the same time)::

    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        url = proxy.url(postgres_url)   # same URL, the proxy's port
        ...
        proxy.refuse()    # server stopped: new connections refused, open ones dropped
        proxy.hang()      # server hung: connections accepted, nothing ever answered
        proxy.forward()   # back to normal (hung connections resume where they stopped)

It runs its own event loop in a background thread, so a bot in the test process (async
tests) or in a subprocess can use it; the switching methods are thread-safe and return once
the new mode is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import pytest
from sqlalchemy.engine import make_url

Mode = Literal["forward", "refuse", "hang"]
_CHUNK = 64 * 1024
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@pytest.fixture(name="proxy")
def postgres_proxy_fixture() -> Iterator[TCPProxy]:
    """A proxy in front of the PostgreSQL service (import this to use the ``proxy`` fixture)."""
    with TCPProxy(("127.0.0.1", 5432)) as running:
        yield running


class TCPProxy:
    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432), port: int = 0) -> None:
        self.target = target
        self._port = port
        self.mode: Mode = "forward"
        self.accepted = 0  # connections accepted since start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # set while forwarding
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy has not been started")
        return self._port

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def start(self) -> TCPProxy:
        loop = asyncio.new_event_loop()
        ready: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup())
            except BaseException as error:
                ready.set_exception(error)
                loop.close()
                return
            ready.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> TCPProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- switching modes ----------------------------------------------------------------------

    def forward(self) -> None:
        """Normal operation: accept and forward both ways; hung connections resume."""
        self._call(self._set_mode("forward"))

    def refuse(self) -> None:
        """A stopped server: new connections are refused, existing ones are dropped."""
        self._call(self._set_mode("refuse"))

    def hang(self) -> None:
        """A hung server: connections are accepted, but nothing is forwarded either way."""
        self._call(self._set_mode("hang"))

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def _call(self, coroutine: object) -> None:
        if self._loop is None:
            raise RuntimeError("the proxy has not been started")
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _set_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "refuse":
            await self._stop_listening()
            await self._close_all()
            return
        if self._server is None:
            await self._listen()
        if mode == "forward":
            self._flowing.set()
        else:
            self._flowing.clear()

    # -- plumbing (on the proxy's loop) ----------------------------------------------------------

    async def _setup(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._port or 0, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _shutdown(self) -> None:
        await self._stop_listening()
        await self._close_all()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.accepted += 1
        connection = _Connection(writer)
        self._connections.add(connection)
        try:
            await self._flowing.wait()  # a hung server accepts, then says nothing
            if writer.is_closing():
                return
            try:
                up_reader, connection.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                return
            await asyncio.gather(
                self._pump(reader, connection.upstream),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # the proxy is stopping; asyncio's stream callback must not see the cancel
        finally:
            self._connections.discard(connection)
            connection.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(_CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    async def _close_all(self) -> None:
        """Drop every connection at once (RST, like a server process that died)."""
        for connection in list(self._connections):
            connection.reset()
        self._connections.clear()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None

    def sides(self) -> list[asyncio.StreamWriter]:
        return [self.client] + ([self.upstream] if self.upstream is not None else [])

    def close(self) -> None:
        for side in self.sides():
            side.close()

    def reset(self) -> None:
        for side in self.sides():
            sock = side.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            side.transport.abort()
