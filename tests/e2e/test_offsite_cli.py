"""Off-site copies as an operator meets them: real processes, a real S3 server (SeaweedFS on
127.0.0.1), a machine that lost everything but its configuration and its key."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyrage
import pytest

from dbkeeper.config import settings_from_mapping
from tests.support.backups import SkippingClock, add_users, listing, open_plugin, user_ids
from tests.support.hosts import free_port
from tests.support.process import REPO, BotProcess, run_cli, write_config
from tests.support.s3 import S3Server, running_s3

pytestmark = pytest.mark.timeout(180)
# Distinctive values: found anywhere they must not be, the test says where.
ACCESS_KEY = "AKIAOFFSITE0TEST0KEY"
SECRET_KEY = "offsite-secret/0123456789+abcdefghijklmnopqrst"
KEPT = "The local backups are kept; the upload is tried again"
ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def _workdir(
    tmp_path: Path,
    s3: S3Server,
    bucket: str,
    *,
    backup: dict[str, Any] | None = None,
    **offsite: Any,
) -> tuple[Path, str, dict[str, dict[str, Any]]]:
    """config.toml copying to ``bucket``, and a migrated database holding 10 users."""
    s3.create_bucket(bucket)
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": url, "retry_backoff_seconds": [0.1]},
        "backup": {"dir": str(tmp_path / "backups"), **(backup or {})},
        "health": {"http_port": free_port(), "interval_seconds": 1},
        "offsite": {"url": f"s3://{bucket}/bot", "endpoint": s3.endpoint, **offsite},
    }
    write_config(tmp_path / "config.toml", sections)
    ops = open_plugin(settings_from_mapping({"database": sections["database"]}, environ={}))
    add_users(ops, 10)
    ops.close()
    return tmp_path, url, sections


def _age_key(path: Path) -> str:
    identity = pyrage.x25519.Identity.generate()
    path.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    return str(identity.to_public())


def _offsite_names(workdir: Path) -> list[str]:
    code, output = run_cli(["backup", "list", "--offsite"], cwd=workdir, env=ENV)
    assert code == 0, output
    return [line.split()[0] for line in output.splitlines() if line.startswith("bot-db-")]


def _local_names(tmp_path: Path) -> list[str]:
    names = listing(tmp_path / "backups")
    return [n for n in names if n.startswith("bot-db-") and "manifest" not in n]


def _wait(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with opener.open(request, timeout=10) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as error:  # 503 still has a body
        return str(error.read().decode())


def test_a_new_machine_restores_the_encrypted_copy_with_its_key(
    tmp_path: Path, s3: S3Server
) -> None:
    key = tmp_path / "keys" / "bot.key"
    key.parent.mkdir()
    recipient = _age_key(key)
    wrong = tmp_path / "keys" / "other.key"
    _age_key(wrong)
    workdir, url, _ = _workdir(tmp_path, s3, "lost-machine", encrypt_to=[recipient])
    code, output = run_cli(["backup", "create"], cwd=workdir, env=ENV)
    assert code == 0, output
    [name] = _local_names(tmp_path)
    assert f"copied off-site: {name}.age (" in output and "age-encrypted), read back" in output
    code, output = run_cli(["backup", "list", "--offsite"], cwd=workdir, env=ENV)
    assert code == 0 and f"\n{name} " in "\n" + output and ", age" in output, output
    assert "1 copy, " in output and "in s3://lost-machine/bot/backups" in output

    # The machine dies: only config.toml, the key (kept elsewhere) and the credentials remain.
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / "backups")

    code, output = run_cli(["backup", "restore", name, "--yes"], cwd=workdir, env=ENV)
    assert code == 1 and "is encrypted with age" in output and "--identity FILE" in output
    code, output = run_cli(
        ["backup", "restore", name, "--yes", "--identity", str(wrong)], cwd=workdir, env=ENV
    )
    assert code == 1 and f"no key in {wrong} can decrypt" in output, output
    assert "Nothing was changed" in output
    assert not (tmp_path / "data" / "bot.db").exists()
    assert [n for n in listing(tmp_path / "backups") if not n.startswith(".dbkeeper-")] == []
    assert not any(n.startswith(".dbkeeper-tmp") for n in listing(tmp_path / "backups"))

    with BotProcess(["backup", "restore", name], cwd=workdir, env=ENV) as asking:
        assert asking.wait() == 1  # no answer to the question: nothing happens
    assert "its off-site copy in s3://lost-machine/bot/backups, encrypted" in asking.output

    code, output = run_cli(
        ["backup", "restore", name, "--yes", "--identity", str(key)], cwd=workdir, env=ENV
    )
    assert code == 0, output
    assert f"restored {name} (schema v3)" in output
    assert user_ids(url) == list(range(1, 11))
    assert _local_names(tmp_path) == [name]  # back as a verified local backup
    assert SECRET_KEY not in output and key.read_text().splitlines()[-1] not in output


def test_an_s3_outage_keeps_the_backups_alerts_once_and_catches_up(
    tmp_path: Path, s3: S3Server
) -> None:
    workdir, _, sections = _workdir(
        tmp_path, s3, "outage", backup={"interval_seconds": 2, "keep": 10}
    )
    port = sections["health"]["http_port"]
    with BotProcess(["run"], cwd=workdir, env=ENV) as bot:
        bot.wait_for_line("dbkeeper is running")
        bot.wait_for_line(lambda line: "off-site: 1 uploaded" in line)
        s3.stop_gateway()
        try:
            bot.wait_for_line("off-site copy failed")
            failures = bot.output.count("off-site copy failed")
            _wait(lambda: bot.output.count("off-site copy failed") > failures, "a second failure")
            assert len(_local_names(tmp_path)) >= 3  # every local backup was taken and kept
            _wait(lambda: _check(port, "offsite")["status"] == "degraded", "offsite degraded")
            assert "the last upload failed" in _check(port, "offsite")["message"]
            uploads = bot.output.count(" uploaded, ")
        finally:
            s3.start_gateway()
        _wait(lambda: bot.output.count(" uploaded, ") > uploads, "an upload after the outage")
        _wait(lambda: _check(port, "offsite")["status"] == "healthy", "offsite healthy again")
        code = bot.stop(signal.SIGTERM)
    output = bot.output
    assert code == 0, output
    alerts = [line for line in output.splitlines() if "ALERT" in line and KEPT in line]
    assert len(alerts) == 1, "\n".join(alerts)  # one alert for the whole outage
    assert "cannot reach http://127.0.0.1:" in alerts[0]
    offsite = _offsite_names(workdir)
    local = _local_names(tmp_path)
    assert set(local) <= set(offsite), (local, offsite)  # the failed ones were caught up


def _check(port: int, name: str) -> dict[str, Any]:
    checks: dict[str, Any] = json.loads(_get(port, "/health"))["checks"]
    return dict(checks[name])


def test_credentials_reach_no_log_answer_file_or_argument_list(
    tmp_path: Path, s3: S3Server
) -> None:
    workdir, _, sections = _workdir(
        tmp_path, s3, "secrets", backup={"interval_seconds": 3}, timeout_seconds=5
    )
    port = sections["health"]["http_port"]
    write_config(tmp_path / "config.toml", {**sections, "logging": {"level": "DEBUG"}})
    answers = []
    with BotProcess(["run"], cwd=workdir, env=ENV) as bot:
        bot.wait_for_line("dbkeeper is running")
        bot.wait_for_line(lambda line: "off-site: 1 uploaded" in line)  # the first backup
        _wait(
            lambda: "last upload" in _check(port, "offsite")["message"], "a check after the upload"
        )
        for path in ("/health", "/api/health", "/metrics", "/"):
            answers.append(_get(port, path))
        arguments = Path(f"/proc/{bot.pid}/cmdline").read_bytes().decode(errors="replace")
        started = time.monotonic()
        code = bot.stop(signal.SIGTERM)
        stopping = time.monotonic() - started
    output = bot.output
    assert code == 0 and stopping < 9, output
    assert "shutdown: taking the final backup" in output
    assert "uploaded bot-db-" in output.split("shutdown: taking the final backup", 1)[1]
    metrics = answers[2]
    for metric in (
        "dbkeeper_offsite_last_upload_timestamp_seconds",
        "dbkeeper_offsite_copies 1.0",
        "dbkeeper_offsite_size_bytes",
        "dbkeeper_offsite_upload_failures_total 0.0",
    ):
        assert metric in metrics, metric
    offsite = json.loads(answers[0])["checks"]["offsite"]
    assert offsite["status"] == "healthy" and offsite["message"].startswith("last upload 20")
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in output, "log"
        assert secret not in arguments, "argument list"
        for answer in answers:
            assert secret not in answer, "HTTP answer"
        for path in [*tmp_path.rglob("*"), *s3.directory.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), f"file {path}"
    assert _offsite_names(workdir) == sorted(_local_names(tmp_path), reverse=True)


def test_offsite_mistakes_stop_startup_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[offsite]\nurl = "s3://x"\n')
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 2, output
    [line] = output.strip().splitlines()
    assert line.startswith('dbkeeper: config.toml: [offsite] url = "s3://x": names the bucket')

    write_config(
        tmp_path / "config.toml",
        {
            "database": {"url": f"sqlite:///{tmp_path / 'bot.db'}"},
            "backup": {"dir": str(tmp_path / "backups")},
            "health": {"http_port": free_port()},
            "offsite": {"url": "s3://bot-backups/one", "endpoint": "http://127.0.0.1:9"},
        },
    )
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 1, output
    assert "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in output
    assert not (tmp_path / "bot.db").exists()  # refused before anything was changed


def test_the_readme_listing_has_the_real_header(tmp_path: Path, s3: S3Server) -> None:
    from tests.support.readme import block

    shown = block("illustration", "offsite-list").text.splitlines()
    workdir, _, _ = _workdir(tmp_path, s3, "readme-listing")
    assert run_cli(["backup", "create"], cwd=workdir, env=ENV)[0] == 0
    code, output = run_cli(["backup", "list", "--offsite"], cwd=workdir, env=ENV)
    assert code == 0 and shown[2] in output.splitlines(), output
    assert output.splitlines()[-1].startswith("1 copy, ")
    # The key pair shown is one (the same public key is in the configuration example).
    public = block("illustration", "age-keygen").text.split("Public key: ")[1].strip()
    pyrage.x25519.Recipient.from_str(public)
    assert f'encrypt_to = ["{public}"]' in (REPO / "README.md").read_text()


def test_a_hung_server_never_holds_the_shutdown_and_the_next_start_uploads(
    tmp_path: Path, s3: S3Server
) -> None:
    import os

    workdir, _, _ = _workdir(tmp_path, s3, "hung-at-shutdown", backup={"interval_seconds": 3600})
    assert s3.gateway is not None
    with BotProcess(["run"], cwd=workdir, env=ENV) as bot:
        bot.wait_for_line("dbkeeper is running")
        os.kill(s3.gateway.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            started = time.monotonic()
            code = bot.stop(signal.SIGTERM)
            stopping = time.monotonic() - started
        finally:
            os.kill(s3.gateway.pid, signal.SIGCONT)
    assert code == 0 and stopping < 9, (stopping, bot.output)
    [name] = _local_names(tmp_path)  # the shutdown backup, kept
    assert "(shutdown): " in bot.output
    with BotProcess(["run"], cwd=workdir, env=ENV) as bot:
        bot.wait_for_line(f"uploaded {name} to s3://hung-at-shutdown/bot/backups")
        assert bot.stop(signal.SIGTERM) == 0
    assert name in _offsite_names(workdir)


# -- a new machine and the old machine's copies ---------------------------------------------------

FOREIGN = "not uploaded from here are kept (never rotated): restore one"  # after "N copies "


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def _old_machine(directory: Path, s3: S3Server, bucket: str, backups: int) -> list[str]:
    """The machine that died: 10 users, ``backups`` backups copied to ``bucket`` an hour ago
    (taken in-process: the machines under test are the new one's processes). Its copies'
    names, newest first."""
    s3.create_bucket(bucket)
    settings = settings_from_mapping(
        {
            "database": {"url": f"sqlite:///{directory / 'data' / 'bot.db'}"},
            "backup": {"dir": str(directory / "backups"), "keep": 3},
            "offsite": {"url": f"s3://{bucket}/bot", "endpoint": s3.endpoint},
        },
        environ={},
    )
    clock = SkippingClock()
    clock.offset = timedelta(hours=-1)
    ops = open_plugin(settings, clock)
    add_users(ops, 10)
    for _ in range(backups):
        upload = ops.backup("scheduled").upload
        assert upload is not None and upload.ok, upload
    assert ops.offsite is not None
    names = [copy.name for copy in ops.offsite.listing().copies]
    ops.close()
    return names


def _new_machine(directory: Path, s3: S3Server, bucket: str, **backup: Any) -> dict[str, Any]:
    """config.toml of the new machine, copying to ``bucket`` too; no database yet."""
    directory.mkdir()
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{directory / 'data' / 'bot.db'}"},
        "backup": {"dir": str(directory / "backups"), "keep": 3, **backup},
        "health": {"http_port": free_port(), "interval_seconds": 1},
        "offsite": {"url": f"s3://{bucket}/bot", "endpoint": s3.endpoint},
    }
    write_config(directory / "config.toml", sections)
    return sections


def _origins(workdir: Path) -> tuple[dict[str, str], str]:
    """``backup list --offsite``: the origin of each copy, and the whole output."""
    code, output = run_cli(["backup", "list", "--offsite"], cwd=workdir, env=ENV)
    assert code == 0, output
    rows = [line.split() for line in output.splitlines() if line.startswith("bot-db-")]
    return {row[0]: row[7] for row in rows}, output


def test_a_new_machine_started_before_its_restore_keeps_the_old_copies(
    tmp_path: Path, s3: S3Server, credentials: None
) -> None:
    """The old machine died; the new one is started before anything is restored (an empty
    database, the same [offsite] url) and takes more than `keep` backups: every copy of the
    old machine stays, its own rotate among themselves, and it says so."""
    old_copies = _old_machine(tmp_path / "old", s3, "new-machine", backups=4)
    assert len(old_copies) == 3  # the old machine rotated its own: keep = 3
    new = tmp_path / "new"
    port = _new_machine(new, s3, "new-machine", interval_seconds=1)["health"]["http_port"]
    with BotProcess(["run"], cwd=new, env=ENV) as bot:
        bot.wait_for_line("dbkeeper is running")
        _wait(lambda: "rotated out the off-site copy" in bot.output, "its own rotation")
        _wait(lambda: FOREIGN in _check(port, "offsite")["message"], "the check to say it")
        check = _check(port, "offsite")
        assert bot.stop(signal.SIGTERM) == 0
    assert check["status"] == "healthy", check
    assert check["message"].endswith(
        "| 3 copies not uploaded from here are kept (never rotated): restore one "
        "(`dbkeeper backup restore NAME`) or delete them by hand"
    )
    warnings = [line for line in bot.output.splitlines() if FOREIGN in line]
    assert len(warnings) == 1 and " WARNING dbkeeper.offsite: " in warnings[0], warnings

    origins, output = _origins(new)
    assert {name: origins[name] for name in old_copies} == dict.fromkeys(old_copies, "unknown")
    own = [name for name, origin in origins.items() if origin == "here"]
    # Its newest 3 (keep = 3), and beyond them the newest fully checked one when the newest
    # three's full checks had not ended at the last rotation (rotation keeps it, here and there).
    newest = sorted(own, reverse=True)[:3]
    assert len(own) in (3, 4) and min(newest) > max(old_copies), origins
    assert output.splitlines()[-1] == (
        "origin unknown: 3 copies not uploaded from here are kept (never rotated): restore one "
        "(`dbkeeper backup restore NAME`) or delete them by hand"
    )


def test_restoring_an_old_copy_on_the_new_machine_adopts_the_copies_off_site(
    tmp_path: Path, s3: S3Server, credentials: None
) -> None:
    """The operator restores one of the old machine's copies on the new one: the copies off
    site are this machine's from then on, and its next backup rotates them with its own."""
    old_copies = _old_machine(tmp_path / "old", s3, "adoption", backups=3)
    new = tmp_path / "new"
    url = _new_machine(new, s3, "adoption")["database"]["url"]
    assert run_cli(["db", "migrate"], cwd=new, env=ENV)[0] == 0  # a fresh, empty database
    code, output = run_cli(["backup", "create"], cwd=new, env=ENV)
    assert code == 0, output
    assert "off-site: 4 copies in s3://adoption/bot/backups (3 not uploaded from here" in output
    code, output = run_cli(["backup", "list"], cwd=new, env=ENV)
    assert code == 0 and f"\noff-site: 3 copies {FOREIGN}" in output, output

    code, output = run_cli(["backup", "restore", old_copies[0], "--yes"], cwd=new, env=ENV)
    assert code == 0, output
    assert f"restored {old_copies[0]} (schema v3)" in output
    assert (
        "adopted the 3 copies in s3://adoption/bot/backups not uploaded from here: rotated "
        "with this machine's from now on"
    ) in output
    assert user_ids(url) == list(range(1, 11))
    origins, output = _origins(new)
    assert set(origins.values()) == {"here"} and "origin unknown" not in output, output

    code, output = run_cli(["backup", "create"], cwd=new, env=ENV)
    assert code == 0, output
    assert output.count("rotated out the off-site copy") == 2, output  # keep = 3, all its own
    remaining = _offsite_names(new)
    assert set(remaining) & set(old_copies) == {old_copies[0]}, remaining
    assert len(remaining) == 4  # 3 routine backups and the copy taken before the restore
