"""PostgreSQL dumps compressed with zstd (``[backup] compression = "zstd"``), on the real
service with the real pg_dump and pg_restore: this machine's pg_dump 15 has no zstd of its own,
so the archive is written uncompressed and dbkeeper compresses it (a ``.dump.zst``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from dbkeeper.plugins.database.errors import BackupError, InvalidBackup
from dbkeeper.plugins.database.operations import Operations
from tests.conftest import SettingsFactory
from tests.support.backups import SkippingClock, add_users, open_plugin, user_ids

pytestmark = [pytest.mark.timeout(90), pytest.mark.postgres]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture
def plugin_factory(
    postgres_url: str, make_settings: SettingsFactory
) -> Iterator[Callable[..., Operations]]:
    made: list[Operations] = []

    def make(**backup: object) -> Operations:
        backup = {"compression": "zstd", "compress_min_bytes": 0, **backup}
        plugin = open_plugin(make_settings(postgres_url, backup=backup), SkippingClock())
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        plugin.close()


def _files(plugin: Operations) -> list[str]:
    return sorted(os.listdir(plugin.backups.store.directory))


def test_a_zstd_dump_is_compressed_verified_and_restorable(
    plugin_factory, postgres_url: str
) -> None:
    plugin = plugin_factory()
    add_users(plugin, 2000, text_size=60)
    info = plugin.backups.create("manual")

    assert info.name.endswith(".dump.zst") and info.compression == "zstd"
    assert info.path.read_bytes()[:4] == ZSTD_MAGIC
    with zstandard.ZstdDecompressor().stream_reader(info.path.read_bytes()) as reader:
        content = reader.read()  # streamed as pg_dump wrote it: no content size in the frame
    assert content[:5] == b"PGDMP" and len(content) == info.content_bytes
    assert info.size_bytes < info.content_bytes / 3  # the repeated names compress
    assert info.tables["users"] == 2000 and info.schema_version == 3
    assert [b.name for b in plugin.backups.list()] == [info.name]
    assert plugin.backups.verify(info.name)[0].ok

    add_users(plugin, 5, start=9000)
    report = plugin.restore(info.name)
    assert user_ids(postgres_url) == list(range(1, 2001))
    safety = report.safety
    assert safety is not None and safety.name.endswith(".dump.zst")
    assert safety.compression == "zstd" and safety.tables["users"] == 2005
    assert plugin.backups.verify(safety.name)[0].ok
    # the decompressed copy pg_restore read is gone: the backups, their manifests, no more
    assert [n for n in _files(plugin) if not n.startswith(".dbkeeper-")] == sorted(
        n for b in (info, safety) for n in (b.name, b.name + ".manifest.json")
    )
    assert not [n for n in _files(plugin) if n.startswith(".dbkeeper-restore-")]

    plugin.restore(safety.name)  # and back
    assert user_ids(postgres_url)[-5:] == list(range(9000, 9005))


def test_an_old_style_dump_still_restores(plugin_factory, postgres_url: str) -> None:
    old = plugin_factory(compression="gzip")  # before: pg_dump's own zlib, a plain .dump
    add_users(old, 3)
    dump = old.backups.create("manual")
    assert dump.name.endswith(".dump") and dump.compression == "custom"
    old.close()

    plugin = plugin_factory()  # compression = "zstd" now
    add_users(plugin, 2, start=10)
    report = plugin.restore(dump.name)
    assert user_ids(postgres_url) == [1, 2, 3]
    assert report.safety is not None and report.safety.name.endswith(".dump.zst")
    assert not [n for n in _files(plugin) if n.startswith(".dbkeeper-restore-")]
    assert (plugin.backups.store.directory / dump.name).exists()  # the backup itself stays


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _alone(path: Path) -> Path:
    path.with_name(path.name + ".manifest.json").unlink()
    return path


DAMAGE = {
    "flipped bytes, with manifest": (_flip, "does not match its manifest"),
    "flipped bytes": (lambda p: _flip(_alone(p)), "is damaged"),
    # The frame was written as pg_dump streamed it, without its content size: the decompressor
    # cannot tell a cut frame from a short one, so pg_restore refuses the archive that is left.
    "truncated": (
        lambda p: _alone(p).write_bytes(p.read_bytes()[: p.stat().st_size * 9 // 10]),
        "is damaged: pg_restore cannot read it all",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_zstd_dump_is_refused_and_leaves_nothing_behind(
    plugin_factory, postgres_url: str, case: str
) -> None:
    damage, expected = DAMAGE[case]
    plugin = plugin_factory()
    add_users(plugin, 3000, text_size=60)
    info = plugin.backups.create("manual")
    damage(info.path)
    add_users(plugin, 1, start=9000)
    before = user_ids(postgres_url)

    with pytest.raises(InvalidBackup) as caught:
        plugin.restore(info.name)
    assert expected in str(caught.value) and "The live database was not touched" in str(
        caught.value
    )
    assert user_ids(postgres_url) == before
    assert not [n for n in _files(plugin) if n.startswith((".dbkeeper-restore-", ".dbkeeper-tmp"))]
    [result] = plugin.backups.verify(info.name)
    assert not result.ok and expected in (result.problem or "")


def test_a_decompressed_copy_left_by_a_killed_restore_is_cleaned_up(plugin_factory) -> None:
    plugin = plugin_factory()
    plugin.backups.create("manual")
    left = plugin.backups.store.directory / ".dbkeeper-restore-4242-0badcafe.dump"
    left.write_bytes(b"PGDMP" + b"\0" * 100)
    assert left in plugin.backups.cleanup()
    assert not left.exists() and len(plugin.backups.list()) == 1


def test_a_dump_below_compress_min_bytes_stays_an_uncompressed_archive(
    plugin_factory, postgres_url: str
) -> None:
    plugin = plugin_factory(compress_min_bytes=1 << 30)
    add_users(plugin, 3)
    info = plugin.backups.create("manual")
    assert info.name.endswith(".dump") and info.compression == "none"
    assert info.path.read_bytes()[:5] == b"PGDMP" and info.size_bytes == info.content_bytes
    assert not [n for n in _files(plugin) if n.endswith(".zst") or ".dbkeeper-tmp" in n]
    assert plugin.backups.verify(info.name)[0].ok
    add_users(plugin, 2, start=10)
    plugin.restore(info.name)
    assert user_ids(postgres_url) == [1, 2, 3]


def test_a_dump_that_pg_restore_cannot_read_as_it_streams_is_no_backup(
    plugin_factory, tmp_path: Path
) -> None:
    """The check runs on the stream: when pg_restore refuses it, nothing is listed or left."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "pg_dump").symlink_to(shutil.which("pg_dump") or "pg_dump")
    refuses = tools / "pg_restore"  # reads all it is given, then says it is damaged
    refuses.write_text(
        '#!/bin/sh\ncat > /dev/null\necho "pg_restore: error: invalid block type 9" >&2\nexit 1\n'
    )
    refuses.chmod(0o755)
    plugin = plugin_factory(pg_bin_dir=str(tools))
    add_users(plugin, 500, text_size=60)
    with pytest.raises(BackupError) as caught:
        plugin.backups.create("manual")
    message = str(caught.value)
    assert "failed verification" in message and "invalid block type 9" in message
    assert plugin.backups.list() == []
    assert [n for n in _files(plugin) if not n.startswith(".dbkeeper-last-failure")] in (
        [],
        [".dbkeeper-backup.lock"],
    )
