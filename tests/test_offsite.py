"""Off-site copies of the verified backups: on another directory (file://) and on a real
S3-compatible server (SeaweedFS on 127.0.0.1), uploaded, proven, rotated, fetched back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyrage
import pytest

from dbkeeper.config import ConfigError, settings_from_mapping
from dbkeeper.plugins.database.commands import format_upload
from dbkeeper.plugins.database.errors import InvalidBackup
from dbkeeper.plugins.database.offsite.checks import OffsiteHealth, problems, summary
from dbkeeper.plugins.database.offsite.uploads import OffsiteCopies, OffsiteCopy, OffsiteStatus
from dbkeeper.plugins.database.operations import Operations
from dbkeeper.plugins.database.settings import OffsiteSettings
from tests.support.backups import SkippingClock, add_users, listing, open_plugin, user_ids
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server, running_s3

pytestmark = pytest.mark.timeout(120)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS for the module; each test uses a bucket of its own."""
    with running_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3_client(server: S3Server) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )


def bucket_objects(server: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3_client(server)
    answer = client.list_objects_v2(Bucket=bucket)
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in answer.get("Contents", [])
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ops_for(
    tmp_path: Path, database: str, clock: SkippingClock | None = None, **offsite: Any
) -> Operations:
    settings = settings_from_mapping(
        {
            "database": {"url": database, "retry_backoff_seconds": [0.05]},
            "backup": {"dir": str(tmp_path / "backups"), "keep": 2, "compress_min_bytes": 0},
            "offsite": offsite,
        },
        environ={},
    )
    return open_plugin(settings, clock)


def local_names(tmp_path: Path) -> list[str]:
    return [
        n for n in listing(tmp_path / "backups") if n.startswith("bot-db-") and "manifest" not in n
    ]


def age_key(tmp_path: Path, name: str = "key.txt") -> tuple[Path, str]:
    identity = pyrage.x25519.Identity.generate()
    path = tmp_path / name
    path.write_text(f"# created by the test\n# public key: {identity.to_public()}\n{identity}\n")
    return path, str(identity.to_public())


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offsite", "message"),
    [
        ({"url": "ftp://host/x"}, 'must be "s3://bucket/prefix" or "file:///absolute/path"'),
        ({"url": "s3://AKIAX:hunter2hunter2@bucket/p"}, "must not hold credentials"),
        ({"url": "s3://b/p"}, "bucket names are 3 to 63 characters"),
        ({"url": "file://relative/dir"}, "file:///path"),
        ({"url": "s3://bucket", "encrypt_to": ["age1nope"]}, "'age1nope' is not an age recipient"),
        ({"encrypt_to": ["age1nope"]}, "is not an age recipient"),
        ({"url": "file:///tmp/x", "endpoint": "http://127.0.0.1:1"}, "applies to s3:// URLs only"),
        ({"url": "s3://bucket", "sse_customer_key_path": "/nonexistent"}, "no such file"),
    ],
)
def test_bad_offsite_settings_name_the_key(offsite: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({"offsite": offsite}, environ={})
    text = str(raised.value)
    assert "[offsite]" in text and message in text, text
    assert "hunter2" not in text and "\n" not in text


def test_a_secret_key_pasted_as_recipient_is_never_echoed() -> None:
    secret = str(pyrage.x25519.Identity.generate())
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(
            {"offsite": {"url": "s3://bucket", "encrypt_to": [secret]}}, environ={}
        )
    assert secret not in str(raised.value) and "that is a secret key" in str(raised.value)


def test_the_replica_place_is_beside_the_backups() -> None:
    from dbkeeper.plugins.database.settings import OffsiteSettings

    settings = settings_from_mapping({"offsite": {"url": "s3://my-bucket/bots/one/"}}, environ={})
    location = settings.section(OffsiteSettings).location
    assert location is not None
    assert location.url_for("backups") == "s3://my-bucket/bots/one/backups"
    assert location.url_for("replica") == "s3://my-bucket/bots/one/replica"
    assert location.key("backups", "x") == "bots/one/backups/x"


# -- uploads ---------------------------------------------------------------------------------------


def test_every_backup_is_uploaded_verified_and_rotated_off_site(tmp_path: Path) -> None:
    remote = tmp_path / "other-disk"
    remote.mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, SkippingClock(), url=f"file://{remote}")
    add_users(ops, 10)
    taken = [ops.backup("manual") for _ in range(3)]
    ops.close()
    names = [t.backup.name for t in taken]
    assert all(t.upload is not None and t.upload.ok for t in taken)
    stored = sorted(os.listdir(remote / "backups"))
    # keep = 2: the oldest copy was rotated out off-site as it was here.
    assert stored == sorted([*names[1:], *(n + ".manifest.json" for n in names[1:])])
    assert sorted(local_names(tmp_path)) == sorted(names[1:])
    for name in names[1:]:
        data = (remote / "backups" / name).read_bytes()
        assert data == (tmp_path / "backups" / name).read_bytes()
        manifest = json.loads((remote / "backups" / (name + ".manifest.json")).read_text())
        assert manifest["sha256"] == manifest["offsite"]["sha256"] == sha256(data)
        assert manifest["offsite"]["encryption"] == "none" and manifest["tables"]["users"] == 10
    assert oct((remote / "backups").stat().st_mode & 0o777) == "0o700"
    status = ops.offsite.status() if ops.offsite else None
    assert status is not None and status.copies == 2 and status.last_upload_name == names[-1]
    assert not status.failing and status.failures_total == 0


def test_off_site_rotation_keeps_the_copy_whose_full_check_passed_after_its_upload(
    tmp_path: Path,
) -> None:
    """A copy is uploaded before its backup's full check ends; the check's outcome reaches the
    local manifest only. Rotation off-site follows it: the newest fully checked backup stays
    there as it stays here."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, SkippingClock(), url=f"file://{remote}")
    add_users(ops, 10)
    first = ops.backup("manual").backup
    uploaded = json.loads((remote / "backups" / f"{first.name}.manifest.json").read_text())
    assert uploaded["full_check"] == "pending"
    assert ops.backups.verify(first.name)[0].ok  # the full check passes, here, after the upload
    later = [ops.backup("manual").backup.name for _ in range(2)]
    ops.close()
    # keep = 2, plus the newest fully checked backup: here and off-site alike.
    assert sorted(local_names(tmp_path)) == sorted([first.name, *later])
    stored = [n for n in os.listdir(remote / "backups") if not n.endswith(".manifest.json")]
    assert sorted(stored) == sorted([first.name, *later])


def test_an_unmounted_disk_is_not_written_to(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, url=f"file://{tmp_path / 'not-mounted'}")
    taken = ops.backup("manual")
    ops.close()
    assert taken.upload is not None and taken.upload.failure is not None
    assert "does not exist (is its disk mounted?)" in taken.upload.failure
    assert not (tmp_path / "not-mounted").exists()
    assert local_names(tmp_path) == [taken.backup.name]  # the local backup is kept
    assert ops.offsite is not None and ops.offsite.status().failing


def test_s3_upload_is_read_back_and_rotated(
    tmp_path: Path, s3: S3Server, credentials: None
) -> None:
    s3.create_bucket("rotation")
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(
        tmp_path, url, SkippingClock(), url="s3://rotation/bots/one", endpoint=s3.endpoint
    )
    add_users(ops, 25)
    taken = [ops.backup("scheduled") for _ in range(3)]
    safety = ops.backup("pre-migration")  # the safety pool is rotated apart
    ops.close()
    assert safety.upload is not None and safety.upload.ok, safety.upload
    objects = bucket_objects(s3, "rotation")
    kept = [t.backup.name for t in taken[1:]] + [safety.backup.name]
    assert sorted(objects) == sorted(
        key
        for name in kept
        for key in (f"bots/one/backups/{name}", f"bots/one/backups/{name}.manifest.json")
    )
    for name in kept:
        local = (tmp_path / "backups" / name).read_bytes()
        assert objects[f"bots/one/backups/{name}"] == local
        manifest = json.loads(objects[f"bots/one/backups/{name}.manifest.json"])
        assert manifest["offsite"]["size_bytes"] == len(local)
    assert ops.offsite is not None
    listed = ops.offsite.listing()
    assert [copy.name for copy in listed.copies] == [safety.backup.name, *reversed(kept[:2])]
    assert listed.damaged == [] and listed.orphans == []


def test_a_later_upload_catches_up_what_failed(tmp_path: Path) -> None:
    remote = tmp_path / "other-disk"
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, SkippingClock(), url=f"file://{remote}")
    first = ops.backup("manual")  # the disk is not there yet
    assert first.upload is not None and not first.upload.ok
    remote.mkdir()
    second = ops.backup("manual")
    ops.close()
    assert second.upload is not None and second.upload.ok
    assert [copy.name for copy in second.upload.uploaded] == [
        second.backup.name,
        first.backup.name,
    ]  # newest first, then the one that failed
    assert ops.offsite is not None
    status = ops.offsite.status()
    assert not status.failing and status.failures_total == 1 and status.copies == 2


def test_postgresql_backups_are_uploaded_and_come_back(tmp_path: Path, postgres_url: str) -> None:
    remote = tmp_path / "other-disk"
    remote.mkdir()
    ops = ops_for(tmp_path, postgres_url, url=f"file://{remote}")
    add_users(ops, 7)
    taken = ops.backup("manual")
    assert taken.backup.name.endswith(".dump")
    assert taken.upload is not None and taken.upload.ok
    assert (remote / "backups" / taken.backup.name).read_bytes() == taken.backup.path.read_bytes()
    add_users(ops, 5, start=100)
    for name in listing(tmp_path / "backups"):
        if name.startswith(taken.backup.name):
            (tmp_path / "backups" / name).unlink()
    report = ops.restore(taken.backup.name)
    ops.close()
    assert report.name == taken.backup.name
    assert user_ids(postgres_url) == list(range(1, 8))


# -- restoring from an off-site copy ------------------------------------------------------------


def test_encrypted_copy_restores_only_with_the_right_identity(tmp_path: Path) -> None:
    remote = tmp_path / "other-disk"
    remote.mkdir()
    key, recipient = age_key(tmp_path)
    wrong, _ = age_key(tmp_path, "wrong.txt")
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, url=f"file://{remote}", encrypt_to=[recipient])
    add_users(ops, 12)
    taken = ops.backup("manual")
    add_users(ops, 3, start=50)
    ops.close()
    name = taken.backup.name
    stored = (remote / "backups" / (name + ".age")).read_bytes()
    assert stored.startswith(b"age-encryption.org/v1\n")
    assert b"SQLite format 3" not in stored and not (remote / "backups" / name).exists()
    for path in (tmp_path / "backups").glob(name + "*"):
        path.unlink()

    ops = Operations(ops.settings)
    with pytest.raises(InvalidBackup, match=r"is encrypted with age .* --identity FILE"):
        ops.restore(name)
    with pytest.raises(InvalidBackup, match=f"no key in {wrong} can decrypt"):
        ops.restore(name, identity=wrong)
    leftovers = [
        n for n in listing(tmp_path / "backups") if n.startswith(("bot-db-", ".dbkeeper-tmp"))
    ]
    assert leftovers == []  # no plaintext, no ciphertext, no half backup
    assert user_ids(url) == [*range(1, 13), *range(50, 53)]  # untouched

    report = ops.restore(name, identity=key)
    ops.close()
    assert report.name == name and report.safety is not None
    assert user_ids(url) == list(range(1, 13))
    assert name in local_names(tmp_path)  # back as a local backup, verified


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_a_damaged_copy_is_refused_and_nothing_is_kept(tmp_path: Path, damage: str) -> None:
    remote = tmp_path / "other-disk"
    remote.mkdir()
    key, recipient = age_key(tmp_path)
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, url=f"file://{remote}", encrypt_to=[recipient])
    add_users(ops, 30, text_size=2000)
    name = ops.backup("manual").backup.name
    ops.close()
    for path in (tmp_path / "backups").glob(name + "*"):
        path.unlink()
    stored = remote / "backups" / (name + ".age")
    data = bytearray(stored.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    elif damage == "truncated":
        stored.write_bytes(bytes(data[: len(data) - 1000]))
    else:
        stored.unlink()
    before = (tmp_path / "data" / "bot.db").read_bytes()

    ops = Operations(ops.settings)
    expected = {
        "flipped": "the off-site copy is damaged \\(its sha256",
        "truncated": "the off-site copy is damaged \\(.*truncated",
        "missing": "is missing from",
    }[damage]
    with pytest.raises(InvalidBackup, match=expected) as raised:
        ops.restore(name, identity=key)
    ops.close()
    assert "Nothing was changed" in str(raised.value)
    assert [n for n in listing(tmp_path / "backups") if not n.startswith(".dbkeeper-")] == []
    assert not any(n.startswith(".dbkeeper-tmp") for n in listing(tmp_path / "backups"))
    assert (tmp_path / "data" / "bot.db").read_bytes() == before


def test_a_copy_that_decrypts_wrong_leaves_no_plaintext(tmp_path: Path) -> None:
    """pyrage writes plaintext before it notices damage: a manifest rewritten to match a
    damaged object gets past the checksums, and still nothing of it stays on disk."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    key, recipient = age_key(tmp_path)
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, url=f"file://{remote}", encrypt_to=[recipient])
    add_users(ops, 30, text_size=2000)
    name = ops.backup("manual").backup.name
    ops.close()
    for path in (tmp_path / "backups").glob(name + "*"):
        path.unlink()
    stored = remote / "backups" / (name + ".age")
    data = stored.read_bytes()[:-5000]
    stored.write_bytes(data)
    manifest_path = remote / "backups" / (name + ".manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["offsite"].update(size_bytes=len(data), sha256=sha256(data))
    manifest_path.write_text(json.dumps(manifest))

    ops = Operations(ops.settings)
    with pytest.raises(InvalidBackup, match=r"does not decrypt .* nothing of it was kept"):
        ops.restore(name, identity=key)
    ops.close()
    assert [
        n for n in listing(tmp_path / "backups") if n.startswith(("bot-db-", ".dbkeeper-tmp"))
    ] == []


def test_encrypted_s3_copy_with_server_side_encryption(
    tmp_path: Path, s3: S3Server, credentials: None
) -> None:
    """SSE-C passes through: the server refuses reads without the key; dbkeeper has it."""
    import base64

    s3.create_bucket("sse-c-copies")
    sse_key = tmp_path / "sse-c.key"
    sse_key.write_text(base64.b64encode(os.urandom(32)).decode())
    key, recipient = age_key(tmp_path)
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(
        tmp_path,
        url,
        url="s3://sse-c-copies",
        endpoint=s3.endpoint,
        encrypt_to=[recipient],
        sse_customer_key_path=str(sse_key),
    )
    add_users(ops, 9)
    taken = ops.backup("manual")
    assert taken.upload is not None and taken.upload.ok, taken.upload
    name = taken.backup.name
    client = s3_client(s3)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="customer key"):
        client.get_object(Bucket="sse-c-copies", Key=f"backups/{name}.age")
    add_users(ops, 2, start=90)
    ops.close()
    for path in (tmp_path / "backups").glob(name + "*"):
        path.unlink()
    ops = Operations(ops.settings)
    ops.restore(name, identity=key)
    ops.close()
    assert user_ids(url) == list(range(1, 10))


# -- whose copies are rotated -------------------------------------------------------------------


def machine(
    base: Path, remote: Path, hours: float = 0, clock: SkippingClock | None = None
) -> Operations:
    """A machine of its own (data and backup directory under ``base``) copying to ``remote``;
    its clock ``hours`` off (the old machine's backups are older)."""
    clock = clock or SkippingClock()
    clock.offset = timedelta(hours=hours)
    ops = ops_for(base, f"sqlite:///{base / 'data' / 'bot.db'}", clock, url=f"file://{remote}")
    ops.offsite = OffsiteCopies(ops.settings.section(OffsiteSettings), ops.backups, clock=clock.now)
    return ops


def stored_names(remote: Path) -> list[str]:
    return sorted(n for n in os.listdir(remote / "backups") if not n.endswith(".manifest.json"))


def state_of(ops: Operations) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (ops.backups.store.directory / ".dbkeeper-offsite.json").read_text()
    )
    return data


NOTE = (
    "copies not uploaded from here are kept (never rotated): restore one (`dbkeeper backup "
    "restore NAME`) or delete them by hand"
)


async def test_a_new_machine_never_rotates_the_old_machines_copies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old machine died; the new one started before its restore: an empty database whose
    backups go to the same place. Its rotation counts its own copies only."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    old = machine(tmp_path / "old", remote, hours=-1)
    add_users(old, 10)
    kept = [old.backup("scheduled").backup.name for _ in range(3)][1:]  # keep = 2
    old.close()
    assert stored_names(remote) == sorted(kept)

    new = machine(tmp_path / "new", remote)
    assert new.offsite is not None
    taken = [new.backup("scheduled") for _ in range(4)]
    mine = [t.backup.name for t in taken]
    assert all(t.upload is not None and t.upload.ok for t in taken)
    assert stored_names(remote) == sorted([*kept, *mine[2:]])  # its own rotate: keep = 2
    assert taken[-1].upload is not None and taken[-1].upload.foreign == 2
    status = new.offsite.status()
    assert status.own_copies == frozenset(mine[2:]) and status.foreign_copies == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{new.offsite.where}: 2 {NOTE} (a new machine started "
        "before its restore, or a lost .dbkeeper-offsite.json)"
    ]  # once, not at every sync

    health = await OffsiteHealth(new.offsite, interval_seconds=3600).check()
    assert health.status.value == "healthy", health.message
    assert health.message.endswith(
        f"| 4 copies | {health.values['size_bytes'] / 1e6:.2f} MB | 2 {NOTE}"
    )
    new.close()
    report = Operations(old.settings).restore(kept[-1])  # the old copies still restore
    assert report.name == kept[-1] and user_ids(str(old.settings.database.url)) == list(
        range(1, 11)
    )


def test_restoring_an_old_copy_adopts_the_copies_off_site(tmp_path: Path) -> None:
    """The operator restores one of the old machine's copies on the new one: that lineage is
    this machine's now. The restored copy stays off-site until a newer backup is there."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    old = machine(tmp_path / "old", remote, hours=-1)
    add_users(old, 10)
    old_copies = [old.backup("scheduled").backup.name for _ in range(3)][1:]
    old.close()
    new = machine(tmp_path / "new", remote)
    empty = [new.backup("scheduled").backup.name for _ in range(2)]
    assert stored_names(remote) == sorted([*old_copies, *empty])

    restored = old_copies[-1]
    report = new.restore(restored)
    assert report.adopted == 2 and report.safety is not None
    assert user_ids(str(new.settings.database.url)) == list(range(1, 11))
    assert new.offsite is not None and new.offsite.status().foreign_copies == 0
    # The sync after the restore (the running bot's, for the pre-restore copy) rotates the
    # adopted copies too; the restored one stays: the newest routine copies are the empty ones.
    after = new.upload()
    assert after is not None and after.ok and after.foreign == 0, after
    assert stored_names(remote) == sorted([restored, *empty, report.safety.name])
    newer = new.backup("scheduled").backup.name  # the restored data, off-site: it may go
    new.close()
    assert stored_names(remote) == sorted([empty[-1], newer, report.safety.name])
    state = state_of(new)
    assert state["adopted_from"] == "" and state["foreign_copies"] == 0
    assert sorted(state["own_copies"]) == sorted([empty[-1], newer, report.safety.name])


def test_a_lost_state_file_keeps_every_copy_already_there(tmp_path: Path) -> None:
    """A backup directory without its state file (deleted, a restored disk image) cannot tell
    its copies from another machine's: it keeps them all and rotates only what it uploads."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    ops = machine(tmp_path, remote)
    add_users(ops, 5)
    before = [ops.backup("scheduled").backup.name for _ in range(3)][1:]
    (tmp_path / "backups" / ".dbkeeper-offsite.json").unlink()
    after = [ops.backup("scheduled").backup.name for _ in range(3)]
    ops.close()
    assert stored_names(remote) == sorted([*before, *after[1:]])
    state = state_of(ops)
    assert sorted(state["own_copies"]) == sorted(after[1:]) and state["foreign_copies"] == 2


def test_a_state_file_from_before_adopts_only_what_this_machine_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading: a state file without ``own_copies`` (this machine has been uploading). The
    copies whose backups are here, and its last upload, are its own; another machine's copy
    (older than all of them, first in line for a rotation) is kept."""
    remote = tmp_path / "other-disk"
    remote.mkdir()
    other = machine(tmp_path / "other", remote, hours=-2)
    [foreign] = [other.backup("scheduled").backup.name]
    other.close()
    clock = SkippingClock()
    ops = machine(tmp_path / "this", remote, hours=-1, clock=clock)
    add_users(ops, 5)
    mine = [ops.backup("scheduled").backup.name for _ in range(3)][1:]
    state_path = tmp_path / "this" / "backups" / ".dbkeeper-offsite.json"
    legacy = json.loads(state_path.read_text())
    for key in ("own_copies", "foreign_copies", "adopted_from", "adopted_at"):
        legacy.pop(key, None)  # as an earlier version wrote it
    state_path.write_text(json.dumps(legacy))
    for path in (tmp_path / "this" / "backups").glob(mine[-1] + "*"):
        path.unlink()  # the last upload is known from the state file alone
    assert legacy["last_upload_name"] == mine[-1]
    assert stored_names(remote) == sorted([foreign, *mine])

    caplog.set_level("INFO", "dbkeeper.offsite")
    clock.sleep(60)  # not the second of the backup removed here
    newest = ops.backup("scheduled")
    ops.close()
    assert newest.upload is not None and newest.upload.ok
    assert newest.upload.rotated == [mine[0]]  # keep = 2 of its own: the foreign one stays
    assert stored_names(remote) == sorted([foreign, mine[-1], newest.backup.name])
    assert "adopted 2 of the 3 copies in " in caplog.text
    state = state_of(ops)
    assert sorted(state["own_copies"]) == sorted([mine[-1], newest.backup.name])
    assert state["foreign_copies"] == 1


# -- health -------------------------------------------------------------------------------------


async def test_the_offsite_check_says_when_and_how_much(tmp_path: Path) -> None:
    remote = tmp_path / "other-disk"
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url, SkippingClock(), url=f"file://{remote}")
    assert ops.offsite is not None
    health = OffsiteHealth(ops.offsite, interval_seconds=3600)
    outcome = await health.check()
    assert outcome.status.value == "degraded" and "no upload yet | 0 copies" in outcome.message
    remote.mkdir()
    ops.backup("manual")
    ops.backup("manual")
    outcome = await health.check()
    assert outcome.status.value == "healthy", outcome.message
    assert outcome.message.startswith("last upload 20") and " UTC (" in outcome.message
    megabytes = outcome.values["size_bytes"] / 1e6
    assert outcome.message.endswith(f" | 2 copies | {megabytes:.2f} MB")
    assert outcome.values["copies"] == 2 and outcome.values["upload_failures_total"] == 0
    remote.joinpath("backups").rename(tmp_path / "moved")
    remote.rmdir()  # the disk goes away
    ops.backup("manual")
    ops.close()
    outcome = await health.check()
    assert outcome.status.value == "degraded"
    assert "the last upload failed 0s ago: " in outcome.message
    assert outcome.values["upload_failures_total"] == 1


def test_an_old_last_upload_degrades() -> None:
    now = datetime.now(UTC)
    recent = OffsiteStatus(last_upload_at=now - timedelta(hours=1), last_success_at=now, copies=7)
    assert problems(recent, 86400, now) == []
    old = replace(recent, last_upload_at=now - timedelta(days=2, hours=1))
    assert problems(old, 86400, now) == [
        "the last upload is 2d 1h old (a backup is due every 1d 0h)"
    ]
    summary_text = summary(replace(recent, total_bytes=45_230_000), now)
    assert summary_text.endswith("UTC (1h 0m ago) | 7 copies | 45.23 MB")


def test_a_manifest_object_round_trips() -> None:
    text = (
        '{"format": 1, "name": "bot-db-2026-01-31_03-00-00.db", "created_at": '
        '"2026-01-31T03:00:00+00:00", "reason": "manual", "compression": "none", '
        '"size_bytes": 5, "sha256": "' + "a" * 64 + '", "schema_version": 3, "tables": {}, '
        '"duration_seconds": 0.1, "offsite": {"object": "bot-db-2026-01-31_03-00-00.db.age", '
        '"size_bytes": 9, "sha256": "' + "b" * 64 + '", "encryption": "age", '
        '"recipients": ["age1x"], "uploaded_at": "2026-01-31T03:00:01+00:00"}}'
    )
    copy = OffsiteCopy.from_manifest(text, "bot-db-2026-01-31_03-00-00.db")
    assert copy.encrypted and copy.size_bytes == 9
    assert OffsiteCopy.from_manifest(copy.manifest_json(), copy.name) == copy
    with pytest.raises(ValueError, match="another backup"):
        OffsiteCopy.from_manifest(text, "bot-db-2026-01-31_03-00-01.db")
    with pytest.raises(ValueError, match="object name"):
        OffsiteCopy.from_manifest(text.replace(".db.age", "/../x"), "bot-db-2026-01-31_03-00-00.db")


def test_a_restore_creates_the_missing_database_directory(tmp_path: Path) -> None:
    """A new machine has the backups (copied back, or fetched) but no data directory yet: the
    restore stages beside the database, so the directory is created first."""
    url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
    ops = ops_for(tmp_path, url)
    add_users(ops, 4)
    name = ops.backup("manual").backup.name
    ops.close()
    import shutil

    shutil.rmtree(tmp_path / "data")
    ops = Operations(ops.settings)
    report = ops.restore(name)
    ops.close()
    assert report.safety is None and user_ids(url) == [1, 2, 3, 4]


# -- the running bot, chat ----------------------------------------------------------------------


async def test_the_running_bot_uploads_in_the_background_and_at_shutdown(
    tmp_path: Path, make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support.hosts import free_port, running_host

    remote = tmp_path / "other-disk"
    remote.mkdir()
    settings = make_settings(
        f"sqlite:///{tmp_path / 'data' / 'bot.db'}",
        health={"http_port": free_port()},
        offsite={"url": f"file://{remote}"},
    )
    async with running_host(settings) as (host, plugin):
        assert plugin.uploads is not None
        started = await host.monitor.check()  # a fresh bot: nothing off-site yet, and no alarm
        assert started.checks["offsite"].status.value == "healthy"
        assert "no upload yet | 0 copies" in started.checks["offsite"].message
        backup = await plugin.backup_now("manual")  # returns once the backup is listed
        report = await plugin.uploads.wait()
        assert report is not None and report.ok and report.uploaded_name(backup.name)
        answer = format_upload(report, backup.name)
        assert f"☁️ Copied off-site: <code>{backup.name}</code>" in answer
        assert "read back and verified · 1 copy off-site" in answer
        health = await host.monitor.check()
        assert health.checks["offsite"].status.value == "healthy"
        message = health.checks["offsite"].message
        assert message.endswith(f"| 1 copy | {backup.size_bytes / 1e6:.2f} MB")
    stored = sorted(n for n in os.listdir(remote / "backups") if not n.endswith(".json"))
    assert len(stored) == 2 and stored[0] == backup.name  # and the shutdown backup's copy
    assert stored == sorted(local_names(tmp_path))
    assert not [r for r in caplog.records if r.name == "dbkeeper.alerts"], "a fresh bot alerted"


def test_dbstats_and_the_backup_answer_tell_about_the_offsite_copies() -> None:
    from dbkeeper.plugins.database.backup.pipeline import BackupStats
    from dbkeeper.plugins.database.commands import format_dbstats
    from dbkeeper.plugins.database.health.checks import DatabaseStatistics
    from dbkeeper.plugins.database.health.probes import Overview
    from dbkeeper.plugins.database.migrate.history import MigrationStats
    from dbkeeper.plugins.database.migrate.migrator import MigrationStatus
    from dbkeeper.plugins.database.offsite.uploads import UploadReport

    now = datetime.now(UTC)
    statistics = DatabaseStatistics(
        MigrationStatus("0003", 3, "0003", 3, ()), MigrationStats(3, 0, now, 4), Overview({}), 1
    )
    status = OffsiteStatus(
        last_upload_at=now - timedelta(minutes=5),
        last_success_at=now - timedelta(minutes=5),
        last_failure_at=now,
        last_failure="cannot reach <the endpoint>",
        copies=7,
        total_bytes=45_230_000,
    )
    empty = BackupStats(0, 0, None, None, None, None, None)
    text = format_dbstats(statistics, empty, "sqlite:///x.db", offsite=status)
    assert "<b>Off-site</b> last upload " in text and "(5m 0s ago) | 7 copies | 45.23 MB" in text
    assert "⚠️ Last upload failed 0s ago: cannot reach &lt;the endpoint&gt;" in text
    failed = UploadReport(failure="the off-site copy to s3://b/backups failed: <x>")
    assert format_upload(failed, "bot-db-x.db").startswith("⚠️ Not copied off-site: ")
    assert "&lt;x&gt;" in format_upload(failed, "bot-db-x.db")


def test_dbstats_and_the_backup_answer_name_the_copies_not_uploaded_from_here() -> None:
    from dbkeeper.plugins.database.backup.pipeline import BackupStats
    from dbkeeper.plugins.database.commands import format_dbstats
    from dbkeeper.plugins.database.health.checks import DatabaseStatistics
    from dbkeeper.plugins.database.health.probes import Overview
    from dbkeeper.plugins.database.migrate.history import MigrationStats
    from dbkeeper.plugins.database.migrate.migrator import MigrationStatus
    from dbkeeper.plugins.database.offsite.uploads import UploadReport

    now = datetime.now(UTC)
    statistics = DatabaseStatistics(
        MigrationStatus("0003", 3, "0003", 3, ()), MigrationStats(3, 0, now, 4), Overview({}), 1
    )
    status = OffsiteStatus(
        last_upload_at=now, last_success_at=now, copies=10, total_bytes=45_230_000, foreign_copies=7
    )
    empty = BackupStats(0, 0, None, None, None, None, None)
    text = format_dbstats(statistics, empty, "sqlite:///x.db", offsite=status)
    assert (
        "| 10 copies | 45.23 MB | 7 copies not uploaded from here are kept (never rotated): "
        "restore one (`dbkeeper backup restore NAME`) or delete them by hand"
    ) in text
    answer = format_upload(UploadReport(copies=10, foreign=7), "bot-db-x.db")
    assert answer == "☁️ 10 copies off-site (7 not uploaded from here, kept)"


def test_the_state_file_tells_an_earlier_version_from_a_new_machine() -> None:
    """No ``own_copies`` at all: written by an earlier version (adopted at the next sync);
    an empty list, or none readable: nothing is this machine's (nothing is rotated)."""
    earlier = OffsiteStatus.from_json('{"copies": 3, "last_upload_name": "bot-db-x.db"}')
    assert earlier.own_copies is None and earlier.copies == 3
    assert "own_copies" not in json.loads(earlier.to_json())  # still to be adopted
    assert OffsiteStatus.from_json(earlier.to_json()) == earlier
    assert OffsiteStatus().own_copies == frozenset()  # no state file: a new machine
    assert OffsiteStatus.from_json('{"own_copies": "x"}').own_copies == frozenset()
    now = datetime.now(UTC)
    adopted = OffsiteStatus(own_copies=frozenset({"b", "a"}), adopted_from="a", adopted_at=now)
    assert OffsiteStatus.from_json(adopted.to_json()) == adopted


def test_wrong_credentials_are_refused_by_the_server_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that checks signatures (SeaweedFS takes its admin identity from the
    environment it starts with): a wrong secret is a clear failure that never quotes it."""
    import time

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with running_s3(tmp_path / "seaweedfs", credentials=CREDENTIALS) as server:
        client = s3_client(server)
        client.create_bucket(Bucket="checked")
        deadline = time.monotonic() + 60
        while True:  # volumes grow on demand: wait until a write succeeds
            try:
                client.put_object(Bucket="checked", Key="probe", Body=b"x")
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        wrong_secret = "not-the-secret-0123456789abcdef"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        url = f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
        ops = ops_for(tmp_path, url, url="s3://checked", endpoint=server.endpoint)
        taken = ops.backup("manual")
        assert taken.upload is not None and taken.upload.failure is not None
        assert "SignatureDoesNotMatch" in taken.upload.failure
        assert "check AWS_SECRET_ACCESS_KEY" in taken.upload.failure
        assert wrong_secret not in taken.upload.failure
        assert local_names(tmp_path) == [taken.backup.name]

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        ops = Operations(ops.settings)
        report = ops.upload()
        ops.close()
        assert report is not None and report.ok, report
        assert [copy.name for copy in report.uploaded] == [taken.backup.name]
