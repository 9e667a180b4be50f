"""The TCP proxy the health tests put in front of PostgreSQL: forward, refuse, hang, recover."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.support.tcp_proxy import TCPProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[TCPProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with TCPProxy(server.server_address) as running:  # type: ignore[arg-type]
            yield running
    finally:
        server.shutdown()
        server.server_close()


def _connect(proxy: TCPProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def _echo(connection: socket.socket, data: bytes = b"ping") -> bytes:
    connection.sendall(data)
    return connection.recv(1024)


def test_forwards_both_ways(proxy: TCPProxy) -> None:
    with _connect(proxy) as connection:
        assert _echo(connection) == b"ping"
    assert proxy.url("postgresql+psycopg://u:pw@db.example:5432/x") == (
        f"postgresql+psycopg://u:pw@127.0.0.1:{proxy.port}/x"
    )


def test_refuse_drops_open_connections_and_refuses_new_ones_until_forward(
    proxy: TCPProxy,
) -> None:
    connection = _connect(proxy)
    assert _echo(connection) == b"ping"
    proxy.refuse()
    with pytest.raises(OSError):  # reset by peer, or a closed connection
        if _echo(connection) == b"":
            raise ConnectionResetError("closed")
    connection.close()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.forward()  # the server is back, on the same port
    with _connect(proxy) as again:
        assert _echo(again) == b"ping"


def test_hang_accepts_and_answers_nothing_then_resumes(proxy: TCPProxy) -> None:
    established = _connect(proxy)
    assert _echo(established) == b"ping"
    proxy.hang()
    fresh = _connect(proxy)  # accepted...
    fresh.settimeout(0.3)
    established.settimeout(0.3)
    for connection in (fresh, established):
        connection.sendall(b"anyone?")
        with pytest.raises(TimeoutError):  # ...but never answered
            connection.recv(1024)
    proxy.forward()
    for connection in (fresh, established):
        connection.settimeout(2)
        assert connection.recv(1024) == b"anyone?"  # what was held is delivered
        connection.close()
