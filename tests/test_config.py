"""Configuration: defaults, the file, environment overrides, one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbkeeper.config import ConfigError, describe_keys, load_settings, settings_from_mapping
from tests.support.process import run_cli


def test_no_file_means_built_in_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "config.toml", environ={})
    assert settings.source == "built-in defaults"
    assert settings.database.url == "sqlite:///data/bot.db"
    assert settings.database.retry_backoff_seconds == (1, 2, 3)
    assert settings.health.interval_seconds == 300
    assert (settings.health.http_host, settings.health.http_port) == ("127.0.0.1", 3001)
    assert (settings.backup.keep, settings.backup.compression) == (7, "gzip")
    assert settings.backup.compress_min_bytes == 1048576
    assert settings.migrations.auto_upgrade is True
    assert settings.local_mode


def test_values_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "bot.toml"
    path.write_text(
        '[telegram]\nadmin_ids = [11, 22]\n[backup]\nkeep = 3\ncompression = "zstd"\n'
        "[health]\ninterval_seconds = 1.5\n"
    )
    settings = load_settings(
        path,
        environ={"TELEGRAM_BOT_TOKEN": "42:secret", "DATABASE_URL": "postgres://u:pw@h/db"},
    )
    assert settings.telegram.admin_ids == (11, 22)
    assert settings.backup.keep == 3 and settings.backup.compression == "zstd"
    assert settings.health.interval_seconds == 1.5
    assert settings.telegram.token == "42:secret" and not settings.local_mode
    assert settings.database.url == "postgres://u:pw@h/db"
    assert set(settings.secrets()) == {"42:secret", "pw"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"databse": {}}, "unknown section [databse]"),
        ({"database": {"urll": "x"}}, "unknown key [database] urll"),
        ({"backup": {"keep": "7"}}, '[backup] keep: expected an integer, got "7"'),
        ({"backup": {"keep": True}}, "[backup] keep: expected an integer, got true"),
        ({"backup": {"on_shutdown": 1}}, "[backup] on_shutdown: expected true or false, got 1"),
        ({"telegram": {"admin_ids": 5}}, "[telegram] admin_ids: expected a list of an integer"),
        ({"telegram": {"admin_ids": [1, "x"]}}, "[telegram] admin_ids: expected an integer"),
        ({"backup": {"keep": 0}}, "[backup] keep = 0: must be at least 1"),
        ({"backup": {"interval_seconds": -5}}, "[backup] interval_seconds = -5: must be greater"),
        ({"health": {"interval_seconds": 0}}, "[health] interval_seconds = 0: must be greater"),
        ({"health": {"http_port": 70000}}, "[health] http_port = 70000: must be a TCP port"),
        ({"backup": {"compression": "xz"}}, '[backup] compression = "xz": must be one of'),
        ({"database": {"retry_backoff_seconds": []}}, "retry_backoff_seconds = []: must list"),
        ({"database": {"connect_retries": 0}}, "[database] connect_retries = 0: must be at least"),
        ({"database": {"url": "mysql://u@h/d"}}, '[database] url = "mysql://u@h/d": uses'),
        ({"telegram": {"api_base_url": "ftp://x"}}, "[telegram] api_base_url"),
        ({"logging": {"level": "LOUD"}}, "[logging] level"),
        ({"telegram": "token"}, "[telegram] must be a table"),
        # Values that used to validate, then crash or misbehave (issue 10).
        ({"health": {"interval_seconds": 1e308}}, "interval_seconds = 1e+308: must be at most"),
        ({"backup": {"interval_seconds": 0.5}}, "interval_seconds = 0.5: must be at least"),
        ({"instance": {"leader_poll_seconds": 1e-9}}, "leader_poll_seconds = 1e-09: must be at"),
        ({"database": {"url": "postgresql://u@h:port/d"}}, "is not a database URL"),
        ({"database": {"url": "sqlite://"}}, "is an in-memory SQLite database"),
        ({"database": {"url": "sqlite:///:memory:"}}, "is an in-memory SQLite database"),
        ({"database": {"url": "postgresql://u@h"}}, "names no database"),
        ({"database": {"retry_backoff_seconds": [1e9]}}, "delays must be at most 3600"),
        ({"backup": {"dir": ""}}, '[backup] dir = "": must name a directory'),
        ({"backup": {"dir": "   "}}, "must name a directory"),
        ({"migrations": {"script_location": "no/such/dir"}}, "is not a directory"),
        ({"migrations": {"metadata": "models"}}, "must be 'package.module:attribute'"),
        ({"shutdown": {"timeout_seconds": 1e12}}, "[shutdown] timeout_seconds = 1000000000000.0"),
        ({"bot": {"plugins": ["not a module"]}}, "is not an import string"),
        # [retention]: one small table per table name (database care, issue 12).
        ({"retention": {"events": 30}}, "[retention] events: expected a table of column, keep"),
        ({"retention": {"events": {"colum": "x"}}}, "unknown key [retention] events.colum"),
        ({"retention": {"events": {"keep_days": 0}}}, "[retention] events.keep_days = 0: must be"),
        ({"retention": {"events": {"keep_days": "30"}}}, "events.keep_days: expected a number"),
        ({"retention": {"events": {"column": ""}}}, '[retention] events.column = "": must name'),
        ({"queries": {"slow_ms": 0}}, "[queries] slow_ms = 0: must be greater than 0"),
        ({"maintenance": {"vacuum_free_ratio": 1.5}}, "vacuum_free_ratio = 1.5: must be between"),
    ],
)
def test_bad_values_name_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw, environ={})
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_retention_names_tables_of_their_own() -> None:
    settings = settings_from_mapping(
        {"retention": {"events": {"column": "created_at", "keep_days": 30}, "logs": {}}},
        environ={},
    )
    rules = settings.retention.tables
    assert (rules["events"].column, rules["events"].keep_days) == ("created_at", 30)
    assert (rules["logs"].column, rules["logs"].keep_days) == ("created_at", 30)
    assert settings.with_section("retention").retention == settings.retention
    assert settings_from_mapping({}, environ={}).retention.tables == {}


def test_errors_never_show_secrets() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"database": {"url": "mysql://bot:hunter2@db/x"}}, environ={})
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"telegram": {"token": 123456789}}, environ={})
    assert "123456789" not in str(caught.value)


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment: DATABASE_URL"):
        settings_from_mapping({}, environ={"DATABASE_URL": "oracle://x"})
    with pytest.raises(
        ConfigError, match=r'environment: DBKEEPER_HTTP_PORT .*expected an integer, got "web"'
    ):
        settings_from_mapping({}, environ={"DBKEEPER_HTTP_PORT": "web"})


def test_the_health_server_is_placed_by_the_environment_in_a_container() -> None:
    settings = settings_from_mapping(
        {},
        environ={
            "DBKEEPER_HTTP_HOST": "0.0.0.0",
            "DBKEEPER_HTTP_PORT": "8080",
            "DBKEEPER_HTTP_TOKEN": "a-token-for-the-network-0123",
        },
    )
    assert (settings.health.http_host, settings.health.http_port) == ("0.0.0.0", 8080)


def test_invalid_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[backup\nkeep = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "missing.toml", environ={}, required=True)


def test_example_config_lists_every_key_with_its_default() -> None:
    example = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    import tomllib

    parsed = tomllib.loads(example)
    for section, key, default, _, unset in describe_keys():
        if unset:  # leaving it out means something: shown commented out
            assert f"\n# {key} = " in example, f"config.example.toml lacks [{section}] # {key}"
            continue
        assert key in parsed[section], f"config.example.toml lacks [{section}] {key}"
        value = parsed[section][key]
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected, f"[{section}] {key}: example says {value!r}, default {default!r}"
    settings_from_mapping(parsed, environ={})  # and the example itself loads


def test_cli_stops_with_one_line_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[backup]\nkeep = 0\n")
    code, output = run_cli(["run"], cwd=tmp_path)
    assert code == 2
    assert output.strip() == "dbkeeper: config.toml: [backup] keep = 0: must be at least 1"
    assert not (tmp_path / "data").exists()  # nothing was started


def test_paths_that_are_files_or_not_alembic_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ({"backup": {"dir": str(tmp_path / "afile")}}, "is a file, not a directory"),
        ({"migrations": {"script_location": str(tmp_path / "afile")}}, "is not a directory"),
        ({"migrations": {"script_location": str(tmp_path / "empty")}}, "has no env.py"),
    ]
    for raw, expected in cases:
        with pytest.raises(ConfigError) as caught:
            settings_from_mapping(raw, environ={})
        assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_value_on_the_command_line_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    for text in (
        "[health]\ninterval_seconds = 1e308\n",
        '[database]\nurl = "postgresql://bot@db:port/bot"\n',
        '[migrations]\nscript_location = "missing"\n',
    ):
        (tmp_path / "config.toml").write_text(text)
        code, output = run_cli(["run"], cwd=tmp_path)
        assert code == 2 and len(output.strip().splitlines()) == 1, output
        assert "Traceback" not in output
