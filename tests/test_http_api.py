"""The health HTTP API over real HTTP: statuses, the JSON contract, probes, secrets, ports."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest

from dbkeeper.health import Outcome, degraded
from dbkeeper.plugin import Deadline, StartupError
from tests.conftest import SettingsFactory
from tests.support.hosts import build_host, free_port, get, running_host
from tests.support.revisions import GATED, add_revision
from tests.support.tcp_proxy import TCPProxy, postgres_proxy_fixture  # noqa: F401 (proxy)
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn
from tests.test_health import corrupt_sqlite

CONTRACT_KEYS = {"status", "timestamp", "uptime", "checks"}
INSTANCE_KEYS = {"instance", "leader"}  # beyond the contract: which instance, which leads


async def test_health_answers_the_contract_json_200_then_503_when_unhealthy(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "http_cache_seconds": 0.01, "size_warning_mb": 0.01},
    )
    async with running_host(settings) as (host, plugin):
        for path in ("/health", "/api/health"):
            status, body, _ = await get(host, path)
            assert status == 200  # degraded (above the size warning) still answers 200
            assert set(body) == CONTRACT_KEYS | INSTANCE_KEYS
            assert body["instance"] == body["leader"] == host.instance
            assert body["status"] == "degraded"
            assert abs(body["timestamp"] - time.time()) < 60
            assert 0 <= body["uptime"] < 60
            assert body["checks"]["database"]["message"] == "Schema v3 | 4 tables | 0 records"
            assert body["checks"]["database"]["latencyMs"] >= 0
            assert body["checks"]["database_migrations"] == {
                "status": "healthy",
                "message": "v3 (0 pending)",
            }
            assert body["checks"]["database_size"]["status"] == "degraded"
            assert body["checks"]["database_backups"]["status"] == "healthy"  # a fresh install

        await asyncio.to_thread(plugin.operations.flush)
        assert plugin.database.file is not None
        corrupt_sqlite(plugin.database.file)
        await asyncio.sleep(0.02)
        status, body, _ = await get(host, "/api/health")
        assert (status, body["status"]) == (503, "unhealthy")
        integrity = body["checks"]["database_integrity"]
        assert integrity["status"] == "unhealthy"
        assert integrity["message"].startswith("quick_check found corruption: ")


async def test_many_clients_at_once_cost_one_check(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        sqlite_url, health={"http_port": free_port(), "http_cache_seconds": 0.3}
    )
    async with running_host(settings) as (host, _):
        last = host.monitor.last
        assert last is not None
        await asyncio.sleep(max(0.0, 0.35 - last.age()))  # the startup check is now stale
        runs = host.monitor.runs
        answers = await asyncio.gather(*(get(host, "/health") for _ in range(30)))
        assert host.monitor.runs == runs + 1
        assert len({body["timestamp"] for _, body, _ in answers}) == 1
        await asyncio.gather(*(get(host, "/metrics") for _ in range(10)))  # fresh: reused
        assert host.monitor.runs == runs + 1


async def test_liveness_never_waits_for_a_hung_database(
    postgres_url: str, make_settings: SettingsFactory, proxy: TCPProxy
) -> None:
    settings = make_settings(
        proxy.url(postgres_url),
        health={
            "http_port": free_port(),
            "check_timeout_seconds": 1,
            "http_cache_seconds": 0.01,
        },
    )
    async with running_host(settings) as (host, _):
        proxy.hang()
        health = asyncio.ensure_future(get(host, "/health"))
        await asyncio.sleep(0.1)  # the check is now waiting for the database
        started = time.monotonic()
        status, body, _ = await get(host, "/livez")
        assert (status, body["status"]) == (200, "alive")
        assert time.monotonic() - started < 0.5
        assert not health.done()
        status, body, _ = await asyncio.wait_for(health, timeout=5)  # within the check timeout
        assert status == 503
        assert body["checks"]["database"]["message"] == "no answer within 1s (timed out)"
        status, body, _ = await get(host, "/readyz")
        assert status == 503 and body["status"] == "not ready"
        assert set(body["checks"]) == {"database", "database_migrations"}
        proxy.forward()  # (the final backup would wait for the hung server)


async def test_readiness_waits_for_the_database_plugin(
    sqlite_url: str,
    make_settings: SettingsFactory,
    scripts_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_revision(scripts_dir, GATED, doc="gated")  # 0004 waits for a "release" file
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("DBKEEPER_GATE_DIR", str(gate))
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port()},
        migrations={"script_location": str(scripts_dir)},
    )
    host, _ = build_host(settings)
    starting = asyncio.ensure_future(host.start())
    try:
        deadline = time.monotonic() + 20
        while not list(gate.glob("entered-*")):  # migrating now
            assert time.monotonic() < deadline and not starting.done()
            await asyncio.sleep(0.02)
        assert await get(host, "/readyz") == (503, {"status": "starting"}, '{"status": "starting"}')
        status, body, _ = await get(host, "/health")
        assert (status, body["status"], body["checks"]) == (503, "unhealthy", {})
        assert (await get(host, "/livez"))[0] == 200
        (gate / "release").touch()
        await asyncio.wait_for(starting, timeout=20)
        status, body, _ = await get(host, "/readyz")
        assert (status, body) == (200, {"status": "ready"})
    finally:
        (gate / "release").touch()
        await asyncio.gather(starting, return_exceptions=True)
        await host.stop(Deadline.after(10))


async def test_a_port_in_use_stops_startup_naming_the_port(
    sqlite_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host, _ = build_host(make_settings(sqlite_url, health={"http_port": port}))
        with pytest.raises(StartupError) as caught:
            await host.start()
    assert str(caught.value) == (
        f"the health HTTP API cannot listen on 127.0.0.1:{port}: port {port} is already in use "
        "(another dbkeeper, or another program). Stop it, or set [health] http_port to a free "
        "port"
    )
    assert not (tmp_path / "data").exists()  # no migration ran


async def test_no_secret_in_any_answer(
    postgres_url: str, make_settings: SettingsFactory, proxy: TCPProxy
) -> None:
    password = "pw-never-shown-8c1f"
    url = proxy.url(postgres_url).replace("postgres@", f"postgres:{password}@")  # trust auth
    with TelegramAPIStandIn() as api:
        settings = make_settings(
            url,
            health={"http_port": free_port(), "http_cache_seconds": 0.01},
            telegram={"token": DEFAULT_TOKEN, "api_base_url": api.base_url},
        )
        async with running_host(settings) as (host, _):

            async def leaky() -> Outcome:  # a careless plugin
                return degraded(f"using {url} and bot {DEFAULT_TOKEN}")

            host.health.add("careless_plugin", leaky)
            answers = []
            for mode in ("forward", "refuse"):
                getattr(proxy, mode)()
                await asyncio.sleep(0.02)
                for path in ("/health", "/api/health", "/livez", "/readyz", "/metrics"):
                    answers.append(await get(host, path))
            proxy.forward()
    texts = [text for _, _, text in answers]
    assert any(password[:2] + "***" in text or "postgres:***@" in text for text in texts)
    assert any("cannot reach the database" in text for text in texts)  # errors were served
    assert "telegram_api" in texts[0]
    for text in texts:
        assert password not in text
        assert DEFAULT_TOKEN not in text and DEFAULT_TOKEN.split(":")[1] not in text


def _connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port))
    connection.settimeout(10)
    return connection


def _closed_within(connection: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``connection`` (reading end-of-file)."""
    started = time.monotonic()
    connection.settimeout(seconds)
    while connection.recv(4096):
        pass
    return time.monotonic() - started


async def test_slow_and_idle_connections_are_closed_while_others_are_answered(
    sqlite_url: str, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dbkeeper.http_guard as guard_module

    monkeypatch.setattr(guard_module, "IDLE_SECONDS", 1.0)
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, _):
        port = host.http.port
        assert port is not None
        silent = _connect(port)  # connects, sends nothing
        dripping = _connect(port)  # sends half a request, then nothing more
        dripping.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        status, _, _ = await get(host, "/livez")  # others are answered meanwhile
        assert status == 200
        loop = asyncio.get_running_loop()
        took = await asyncio.gather(
            loop.run_in_executor(None, _closed_within, silent, 5),
            loop.run_in_executor(None, _closed_within, dripping, 5),
        )
        assert all(seconds < 4 for seconds in took), took


async def test_a_malformed_request_gets_400_and_one_quiet_log_line(
    sqlite_url: str, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # even at DEBUG: no traceback, none of the client's bytes
    settings = make_settings(sqlite_url, health={"http_port": free_port()})
    async with running_host(settings) as (host, _):
        assert host.http.port is not None

        def send_garbage() -> bytes:
            connection = _connect(host.http.port or 0)
            connection.sendall(b"G\x00T /health?token=s3cr3t-bytes HTTP/1.1\r\n\r\n")
            answer = connection.recv(4096)
            connection.close()
            return answer

        answer = await asyncio.get_running_loop().run_in_executor(None, send_garbage)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
        status, _, _ = await get(host, "/livez")
        assert status == 200
    protocol = [r for r in caplog.records if r.name.startswith("dbkeeper.http")]
    assert any("Error handling request" in r.getMessage() for r in protocol)
    assert "Traceback" not in caplog.text and "s3cr3t" not in caplog.text


async def test_beyond_loopback_the_operators_routes_need_the_token(
    sqlite_url: str, make_settings: SettingsFactory
) -> None:
    import base64

    import aiohttp

    token = "operators-only-0123456789abcdef"
    settings = make_settings(
        sqlite_url,
        health={"http_port": free_port(), "http_host": "0.0.0.0", "http_token": token},
    )
    async with running_host(settings) as (host, _):
        base = f"http://127.0.0.1:{host.http.port}"
        basic = base64.b64encode(f"admin:{token}".encode()).decode()
        async with aiohttp.ClientSession() as session:

            async def status(path: str, authorization: str | None = None) -> tuple[int, str]:
                headers = {"Authorization": authorization} if authorization else {}
                async with session.get(base + path, headers=headers) as answer:
                    return answer.status, await answer.text()

            for path in ("/health", "/api/health", "/metrics"):
                for wrong in (None, "Bearer nope", f"Bearer {token}x", "Basic !!!", "Token x"):
                    code, text = await status(path, wrong)
                    assert code == 401 and "dbkeeper_" not in text and "checks" not in text
                assert (await status(path, f"Bearer {token}"))[0] == 200
                assert (await status(path, f"Basic {basic}"))[0] == 200
            for probe in ("/livez", "/readyz"):  # probes stay open
                assert (await status(probe))[0] == 200


def test_beyond_loopback_without_a_token_startup_refuses_with_one_line() -> None:
    from dbkeeper.config import ConfigError, settings_from_mapping

    for host in ("0.0.0.0", "10.0.0.5", "::"):
        with pytest.raises(ConfigError, match="http_token: is required when http_host"):
            settings_from_mapping({"health": {"http_host": host}}, environ={})
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        settings_from_mapping({"health": {"http_host": host}}, environ={})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        settings_from_mapping({"health": {"http_token": "short"}}, environ={})
