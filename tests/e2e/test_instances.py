"""Several bot instances on one PostgreSQL database: real processes, the real service, the Bot
API stand-in. One leads (backups, alerts, polling); a standby takes over when it dies, is cut
off from the database or is paused, never while it still leads."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.support.hosts import free_port
from tests.support.process import BotProcess, run_cli, write_config
from tests.support.tcp_proxy import TCPProxy
from tests.support.telegram_api import DEFAULT_TOKEN, TelegramAPIStandIn

pytestmark = pytest.mark.timeout(150)
ADMIN = 4201
POLL = 0.5  # [instance] leader_poll_seconds of these tests (P)
SLACK = 0.7  # process scheduling on a shared machine
Start = Callable[..., BotProcess]


@pytest.fixture
def api() -> Iterator[TelegramAPIStandIn]:
    with TelegramAPIStandIn() as standin:
        yield standin


@pytest.fixture
def start(tmp_path: Path, postgres_url: str, api: TelegramAPIStandIn) -> Iterator[Start]:
    """Start an instance named ``name`` on the shared database and backup directory."""
    running: list[BotProcess] = []

    def launch(name: str, url: str | None = None, **sections: dict[str, Any]) -> BotProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        values: dict[str, dict[str, Any]] = {
            "telegram": {
                "token": DEFAULT_TOKEN,
                "api_base_url": api.base_url,
                "admin_ids": [ADMIN],
            },
            "database": {"url": url or postgres_url, "retry_backoff_seconds": [0.2]},
            "backup": {"dir": str(tmp_path / "backups"), "interval_seconds": 2},
            "health": {"http_port": free_port(), "interval_seconds": 3600},
            "instance": {"name": name, "leader_poll_seconds": POLL},
        }
        for section, extra in sections.items():
            values.setdefault(section, {}).update(extra)
        config = write_config(workdir / "config.toml", values)
        process = BotProcess(["--config", str(config), "run"], cwd=workdir)
        process.http_port = values["health"]["http_port"]  # type: ignore[attr-defined]
        running.append(process)
        return process

    yield launch
    for process in running:
        process.kill()


def _manifests(tmp_path: Path) -> list[dict[str, Any]]:
    directory = tmp_path / "backups"
    return (
        [
            json.loads((directory / name).read_text())
            for name in sorted(os.listdir(directory))
            if name.endswith(".manifest.json")
        ]
        if directory.is_dir()
        else []
    )


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def _wait(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Roles:
    """Asks every instance whether it leads (``/livez``), over and over, from a thread."""

    def __init__(self, processes: dict[str, BotProcess], every: float = 0.02) -> None:
        self.processes = processes
        self.every = every
        self.samples: list[tuple[float, dict[str, bool | None]]] = []  # None: no answer
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Roles:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            answers = {name: _leading(p.http_port) for name, p in self.processes.items()}  # type: ignore[attr-defined]
            self.samples.append((time.monotonic(), answers))

    def two_leaders(self) -> list[tuple[float, dict[str, bool | None]]]:
        return [(t, a) for t, a in self.samples if sum(v is True for v in a.values()) > 1]

    def leading(self, name: str) -> list[float]:
        return [t for t, answers in self.samples if answers[name] is True]


def _leading(port: int) -> bool | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=0.2) as answer:
            return bool(json.loads(answer.read())["leading"])
    except (OSError, ValueError):
        return None  # a paused process does not answer


def _sources(texts: list[str]) -> set[str]:
    """The instances that sent these alerts ("dbkeeper on alpha is unhealthy")."""
    return {m.group(1) for t in texts if (m := re.search(r"dbkeeper on (\w+)", t))}


def test_one_leader_backs_up_and_polls_and_a_standby_takes_over_when_it_is_killed(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn
) -> None:
    alpha = start("alpha")
    alpha.wait_for_line("taking updates from Telegram (polling)")
    beta, gamma = start("beta"), start("gamma")
    for standby in (beta, gamma):
        standby.wait_for_line("standing by: alpha leads and polls Telegram")
    alpha.wait_for_line("(scheduled): ")
    _wait(lambda: len(_manifests(tmp_path)) >= 2, "two scheduled backups")

    # Each instance reports its own view over HTTP, and names the leader.
    view = _health(gamma.http_port)
    assert view["instance"] == "gamma" and view["leader"] == "alpha"
    api.push_command("/health", user_id=ADMIN)
    assert "answered by alpha (the leader)" in api.wait_for_message("answered by", ADMIN)["text"]

    # A standby that stops takes no shutdown backup: the leader does that.
    assert gamma.stop() == 0
    assert "no final backup here (alpha leads and takes it)" in gamma.output

    alpha.send(signal.SIGKILL)
    alpha.wait()
    killed_at = time.monotonic()
    beta.wait_for_line("beta is now the leader", timeout=10)
    assert time.monotonic() - killed_at < 4 * POLL + SLACK  # the documented takeover time
    beta.wait_for_line("taking updates from Telegram (polling)")
    api.reset_calls()
    api.push_command("/health", user_id=ADMIN)
    assert "answered by beta (the leader)" in api.wait_for_message("answered by", ADMIN)["text"]
    beta.wait_for_line("(scheduled): ")  # the new leader takes the scheduled backups
    assert beta.stop() == 0
    assert "(shutdown): " in beta.output

    reasons = [m["reason"] for m in _manifests(tmp_path)]
    assert "shutdown" in reasons and set(reasons) <= {"scheduled", "shutdown"}
    assert ") started" not in gamma.output  # a standby never backed anything up
    assert api.conflicts == 0  # never two getUpdates pollers at once


def test_webhook_mode_every_instance_answers_the_same(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn
) -> None:
    secret = "hook-secret-123"
    ports = {name: free_port() for name in ("alpha", "beta")}
    processes = {}
    for name, port in ports.items():  # alpha first, so that alpha leads
        processes[name] = start(
            name,
            telegram={
                "webhook_url": f"http://127.0.0.1:{port}/hook",
                "webhook_port": port,
                "webhook_listen": "127.0.0.1",
                "webhook_secret": secret,
            },
        )
        processes[name].wait_for_line("taking updates from Telegram through the webhook")
    assert api.calls("getUpdates") == []  # nobody polls in webhook mode
    answers = {}
    for name, port in ports.items():
        api.push_command("/health", user_id=ADMIN)
        update = api.pending_updates()[-1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/hook",
            data=json.dumps(update).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": secret,
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        answers[name] = api.wait_for_message(
            lambda m, n=name: f"answered by {n}" in m["text"], ADMIN
        )["text"]
    forged = urllib.request.Request(
        f"http://127.0.0.1:{ports['beta']}/hook",
        data=json.dumps(api.pending_updates()[-1]).encode(),
        headers={"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": "wrong"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403  # only Telegram (who knows the secret) is listened to
    assert "answered by alpha (the leader)" in answers["alpha"]
    assert "answered by beta; alpha leads" in answers["beta"]
    same = [line for line in answers["alpha"].splitlines() if "database_migrations" in line]
    assert same and same[0] in answers["beta"]
    for process in processes.values():
        assert process.stop() == 0
        assert secret not in process.output and DEFAULT_TOKEN not in process.output


def test_a_postgresql_restart_is_survived_with_one_alert_and_one_resolved_message(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn, postgres_url: str
) -> None:
    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        url = proxy.url(postgres_url)
        fast = {"interval_seconds": 0.5, "check_timeout_seconds": 1}
        backup = {"interval_seconds": 3600}
        alpha = start("alpha", url, health=fast, backup=backup)
        alpha.wait_for_line("taking updates from Telegram (polling)")
        beta = start("beta", url, health=fast, backup=backup)
        beta.wait_for_line("standing by: alpha leads")
        # the first backup (10 s after start) makes both healthy; then the server goes away
        alpha.wait_for_line("(scheduled): ", timeout=30)
        _wait(lambda: _health(alpha.http_port)["status"] == "healthy", "alpha healthy")
        _wait(lambda: _health(beta.http_port)["status"] == "healthy", "beta healthy")
        api.reset_calls()

        proxy.refuse()  # the server is down: connections dropped, new ones refused
        _wait(lambda: _health(alpha.http_port)["status"] == "unhealthy", "alpha unhealthy")
        _wait(lambda: _health(beta.http_port)["status"] == "unhealthy", "beta unhealthy")
        api.wait_for_message("unhealthy", ADMIN, timeout=30)
        proxy.forward()  # and back
        _wait(lambda: _health(alpha.http_port)["status"] == "healthy", "alpha healthy again")
        _wait(lambda: _health(beta.http_port)["status"] == "healthy", "beta healthy again")
        api.wait_for_message("healthy again", ADMIN, timeout=30)
        beta.wait_for_line("not alerting (standby")  # beta saw it too and left it to alpha
        assert "beta is now the leader" not in beta.output  # alpha kept its role throughout

        texts = [m["text"] for m in api.sent_messages(ADMIN)]
        assert sum("unhealthy" in t and "healthy again" not in t for t in texts) == 1, texts
        assert sum("healthy again" in t for t in texts) == 1, texts
        # The bot itself works on after the restart.
        api.push_command("/dbstats", user_id=ADMIN)
        api.wait_for_message("Schema v3 (0 pending)", ADMIN)
        for process in (beta, alpha):
            assert process.stop() == 0


def test_a_leader_cut_off_from_postgresql_steps_down_before_a_standby_takes_over(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn, postgres_url: str
) -> None:
    """Only the leader loses the server (its connections cut, through a proxy). It steps down
    within 2P of its last heartbeat; the standby takes over within 4P, never earlier than the
    leader stopped; Telegram sees one poller; alerts come from one instance."""
    with TCPProxy(("127.0.0.1", 5432)) as proxy:
        fast = {"interval_seconds": 0.5, "check_timeout_seconds": 1}
        alpha = start("alpha", proxy.url(postgres_url), health=fast)
        alpha.wait_for_line("taking updates from Telegram (polling)")
        beta = start("beta", health=fast)
        beta.wait_for_line("standing by: alpha leads")
        alpha.wait_for_line("(scheduled): ")
        for process in (alpha, beta):
            _wait(lambda p=process: _health(p.http_port)["status"] == "healthy", "healthy")
        before = len(api.sent_messages(ADMIN))

        with Roles({"alpha": alpha, "beta": beta}) as roles:
            proxy.refuse()
            cut = time.monotonic()
            beta.wait_for_line("beta is now the leader", timeout=10)
            beta.wait_for_line("taking updates from Telegram (polling)")
            beta.wait_for_line("(scheduled): ", timeout=10)  # the new leader backs up
            api.wait_for_message("is unhealthy", ADMIN, timeout=10)  # alpha's own view
            proxy.forward()
            alpha.wait_for_line("alpha lost the lead: beta took over", timeout=10)
            api.wait_for_message("healthy again", ADMIN, timeout=10)
            time.sleep(3 * POLL)  # alpha stays a standby

        assert roles.two_leaders() == []
        alpha_led, beta_led = roles.leading("alpha"), roles.leading("beta")
        assert max(t for t in alpha_led if t < cut + 5) - cut <= 2 * POLL + SLACK
        assert min(beta_led) - cut <= 4 * POLL + SLACK
        assert min(beta_led) > max(t for t in alpha_led if t < cut + 5)
        assert all(t < cut + 5 for t in alpha_led)  # alpha never led again
        assert "stepped down: its leader lease was not renewed" in alpha.output
        assert api.conflicts == 0  # never two getUpdates pollers
        texts = [m["text"] for m in api.sent_messages(ADMIN)[before:]]
        assert _sources(texts) == {"alpha"}, texts  # one instance alerts: the cut-off one
        assert sum("is unhealthy" in t for t in texts) == 1, texts
        assert sum("healthy again" in t for t in texts) == 1, texts  # resolved by alpha too
        assert "postponed" not in beta.output  # alpha's backups never held beta's up
        for process in (beta, alpha):
            assert process.stop() == 0


def test_a_paused_leader_loses_its_lease_and_stands_by_when_it_resumes(
    tmp_path: Path, start: Start, api: TelegramAPIStandIn
) -> None:
    """SIGSTOP leaves the leader's session and lock in place: a standby takes over once the
    heartbeat has been still for 4P, ending that session; the resumed leader stands by."""
    alpha = start("alpha")
    alpha.wait_for_line("taking updates from Telegram (polling)")
    beta = start("beta")
    beta.wait_for_line("standing by: alpha leads")
    with Roles({"alpha": alpha, "beta": beta}) as roles:
        alpha.send(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            beta.wait_for_line("beta is now the leader", timeout=10)
            took_over = time.monotonic()
            beta.wait_for_line("taking updates from Telegram (polling)")
            api.push_command("/health", user_id=ADMIN)
            answer = api.wait_for_message("answered by", ADMIN, timeout=10)["text"]
            assert "answered by beta (the leader)" in answer
        finally:
            alpha.send(signal.SIGCONT)
        resumed = time.monotonic()
        alpha.wait_for_line("alpha lost the lead: beta took over", timeout=10)
        alpha.wait_for_line("stopped polling")
        time.sleep(3 * POLL)
    assert took_over - paused <= 6 * POLL + SLACK  # 4P of silence, a poll to see it, claim
    assert roles.two_leaders() == []
    assert not [t for t in roles.leading("alpha") if t > paused]  # never again, resumed or not
    assert [t for t in roles.leading("beta") if t > resumed]
    assert api.conflicts == 0  # the resumed leader sent no getUpdates
    beta.wait_for_line("(scheduled): ")
    # The standby first: stopping the leader first would hand alpha the lease again.
    for process in (alpha, beta):
        assert process.stop() == 0
    assert ") started" not in alpha.output.split("alpha lost the lead")[1]  # no backup after


def test_an_instance_with_older_code_refuses_a_newer_schema(
    tmp_path: Path, postgres_url: str
) -> None:
    write_config(
        tmp_path / "config.toml",
        {"database": {"url": postgres_url}, "health": {"http_port": free_port()}},
    )
    assert run_cli(["db", "migrate"], cwd=tmp_path)[0] == 0
    engine = create_engine(postgres_url)
    with engine.begin() as connection:  # what newer code's revision 0004 leaves behind
        connection.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    engine.dispose()
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 1
    assert "schema v4 (0004), newer than this code knows (its head is v3 (0003))" in output
    assert "Refusing to run" in output
