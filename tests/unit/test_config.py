"""Settings: the course's settings file, conversions, validation and command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pbkv import config
from pbkv.config import Settings, SettingsError, load_file, parse_mapping, settings_from_args

COURSE = {"primary": "127.0.0.1", "backup": "127.0.0.2", "port": "8080"}
REPO_SETTINGS = Path(__file__).resolve().parents[2] / "conf" / "settings.conf"


def write(tmp_path: Path, data: Any, name: str = "settings.conf") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def from_file(tmp_path: Path, data: Any) -> Settings:
    return Settings(**load_file(write(tmp_path, data)))


def parse_flags(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


# -- the course file -----------------------------------------------------------------------
def test_course_file(tmp_path: Path) -> None:
    values = load_file(write(tmp_path, COURSE))
    assert values == {"primary": "127.0.0.1", "backup": "127.0.0.2", "port": 8080}
    assert type(values["port"]) is int
    settings = Settings(**values)
    assert settings.address_of("primary") == ("127.0.0.1", 8080)
    assert settings.address_of("backup") == ("127.0.0.2", 8080)
    assert settings.effective_backup_port == 8080
    assert settings == Settings()  # the defaults are the course file


def test_shipped_settings_file_is_the_course_file() -> None:
    if not REPO_SETTINGS.exists():
        pytest.skip("no conf/settings.conf in this checkout")
    assert load_file(REPO_SETTINGS) == parse_mapping(COURSE)


def test_same_address_puts_the_backup_on_the_next_port(tmp_path: Path) -> None:
    settings = from_file(tmp_path, {"primary": "127.0.0.1", "backup": "127.0.0.1", "port": "9000"})
    assert settings.address_of("primary") == ("127.0.0.1", 9000)
    assert settings.address_of("backup") == ("127.0.0.1", 9001)


@pytest.mark.parametrize("backup", ["127.0.0.1", "127.0.0.2"])
def test_backup_port_overrides(tmp_path: Path, backup: str) -> None:
    data = {"primary": "127.0.0.1", "backup": backup, "port": "9000", "backup_port": "9500"}
    settings = from_file(tmp_path, data)
    assert settings.backup_port == 9500
    assert settings.address_of("backup") == (backup, 9500)
    assert settings.address_of("primary") == ("127.0.0.1", 9000)


def test_unknown_role() -> None:
    with pytest.raises(SettingsError, match="witness"):
        Settings().address_of("witness")


# -- conversions ---------------------------------------------------------------------------
def test_string_values_are_converted(tmp_path: Path) -> None:
    settings = from_file(
        tmp_path,
        {
            "ack_timeout": "2.5",
            "heartbeat_interval": "0.1",
            "shards": "4",
            "standalone": "true",
            "store": "hash",
            "backup_port": "9001",
            "transfer_chunk": " 16 ",
        },
    )
    assert settings.ack_timeout == 2.5
    assert type(settings.ack_timeout) is float
    assert settings.heartbeat_interval == 0.1
    assert settings.shards == 4
    assert settings.standalone is True
    assert settings.store == "hash"
    assert settings.backup_port == 9001
    assert settings.transfer_chunk == 16


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
        ("0", False),
        (True, True),
        (False, False),
    ],
)
def test_booleans(raw: Any, expected: bool) -> None:
    assert parse_mapping({"standalone": raw}) == {"standalone": expected}


def test_json_native_values_are_accepted(tmp_path: Path) -> None:
    settings = from_file(tmp_path, {"port": 9000, "ack_timeout": 1, "standalone": True})
    assert settings.port == 9000
    assert settings.ack_timeout == 1.0
    assert settings.standalone is True
    assert from_file(tmp_path, {"backup_port": None}).backup_port is None


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("port", "eighty"),
        ("port", "8080.5"),
        ("port", ""),
        ("shards", [16]),
        ("ack_timeout", "soon"),
        ("standalone", "maybe"),
        ("standalone", "2"),
        ("backup_port", "x"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, name: str, raw: Any) -> None:
    with pytest.raises(SettingsError, match=f"setting '{name}' has an invalid value"):
        load_file(write(tmp_path, {name: raw}))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unknown setting.*colour"):
        load_file(write(tmp_path, {**COURSE, "colour": "blue"}))
    with pytest.raises(SettingsError, match="backupport"):
        parse_mapping({"backupport": "9000"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("primary=127.0.0.1", "is not valid JSON"),
        ('{"port": "8080",}', "is not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('["primary", "127.0.0.1"]', "must hold a JSON object"),
        ('"127.0.0.1"', "must hold a JSON object"),
        ("null", "must hold a JSON object"),
    ],
)
def test_malformed_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError, match=message) as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_invalid_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.conf"
    path.write_bytes(b'{"primary": "\xff"}')
    with pytest.raises(SettingsError, match="not valid UTF-8"):
        load_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_file(tmp_path / "absent.conf")


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"store": "btree"},
        {"store": ""},
        {"backup_initial_stage": "in_sync"},
        {"backup_initial_stage": "warm_start"},
        {"port": 0},
        {"port": 65536},
        {"port": -1},
        {"backup_port": 0},
        {"backup_port": 65536},
        {"shards": 0},
        {"max_key_bytes": 0},
        {"max_value_bytes": -1},
        {"transfer_chunk": 0},
        {"ack_timeout": 0},
        {"ack_timeout": -1.0},
        {"heartbeat_interval": -0.2},
        {"peer_timeout": -2.0},
        {"retry_min": -0.05},
        {"retry_min": 0.0},
        {"idle_timeout": -1.0},
        {"idle_timeout": 0.0},
        {"retry_min": 2.0, "retry_max": 1.0},
        {"errors": "strict"},
        {"errors": ""},
        {"errors": "HTTP"},
        {"persistence": "on"},
        {"persistence": "Always"},
        {"persistence": "always"},  # without data_dir
        {"persistence": "everysec", "data_dir": ""},
        {"rewrite_percentage": -1},
        {"persistence": "always", "data_dir": "/d", "standalone": True},
        {"rewrite_min_bytes": -1},
    ],
)
def test_invalid_settings_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        Settings(**changes)


def test_invalid_store_message() -> None:
    with pytest.raises(SettingsError, match="store must be 'sharded' or 'hash'"):
        Settings(store="btree")
    with pytest.raises(SettingsError, match="cold_start, bootstrapping_primary"):
        Settings(backup_initial_stage="in_sync")
    with pytest.raises(SettingsError, match="ack_timeout"):
        Settings(ack_timeout=-1.0)


def test_persistence_settings(tmp_path: Path) -> None:
    assert Settings().persistence == "off" and not Settings().persistent
    with pytest.raises(SettingsError, match="off, everysec, always"):
        Settings(persistence="fsync")
    with pytest.raises(SettingsError, match="persistence always needs data_dir"):
        Settings(persistence="always")
    path = write(tmp_path, {"persistence": "always", "data_dir": "/var/lib/pbkv"})
    settings = parse_flags(["--config", str(path), "--rewrite-percentage", "50"])
    assert settings.persistent and settings.data_dir == "/var/lib/pbkv"
    assert settings.rewrite_percentage == 50
    assert parse_flags(["--config", str(path), "--persistence", "off"]).persistent is False


def test_defaults_suit_course_clients() -> None:
    defaults = Settings()
    assert defaults.errors == "course"
    assert defaults.max_key_bytes == 64 * 1024
    assert defaults.max_value_bytes == 1024 * 1024


@pytest.mark.parametrize("mode", config.ERROR_MODES)
def test_error_modes_from_file_and_flag(tmp_path: Path, mode: str) -> None:
    path = write(tmp_path, {**COURSE, "errors": mode})
    assert parse_flags(["--config", str(path)]).errors == mode
    assert parse_flags(["--config", str(path), "--errors", "http"]).errors == "http"
    with pytest.raises(SettingsError, match="errors must be one of course, http"):
        Settings(errors="strict")


@pytest.mark.parametrize("stage", config.BACKUP_INITIAL_STAGES)
def test_valid_initial_stages(stage: str) -> None:
    assert Settings(backup_initial_stage=stage).backup_initial_stage == stage


def test_public_dict_round_trips() -> None:
    settings = Settings(port=9000, backup_port=9100, store="hash", standalone=True)
    public = config.to_public_dict(settings)
    assert public["port"] == 9000
    assert Settings(**public) == settings


# -- command line --------------------------------------------------------------------------
def test_flags_override_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, {**COURSE, "standalone": "true", "shards": "8"})
    settings = parse_flags(
        [
            "--config",
            str(path),
            "--port",
            "9000",
            "--backup-port",
            "9100",
            "--ack-timeout",
            "0.5",
            "--store",
            "hash",
            "--no-standalone",
            "--backup-initial-stage",
            "bootstrapping_primary",
        ]
    )
    assert settings.port == 9000
    assert settings.backup_port == 9100
    assert settings.ack_timeout == 0.5
    assert settings.store == "hash"
    assert settings.standalone is False
    assert settings.backup_initial_stage == "bootstrapping_primary"
    # Not given on the command line: the file wins over the defaults.
    assert settings.primary == "127.0.0.1"
    assert settings.shards == 8


def test_file_values_stay_without_flags(tmp_path: Path) -> None:
    path = write(tmp_path, {**COURSE, "port": "7000", "standalone": "yes"})
    settings = parse_flags(["--config", str(path)])
    assert settings.port == 7000
    assert settings.standalone is True
    assert parse_flags(["--config", str(path), "--standalone"]).standalone is True


def test_every_setting_has_a_flag(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    argv = ["--config", str(path)]
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            argv.append(flag if default else "--no-" + field.name.replace("_", "-"))
        elif default is not None:
            argv += [flag, str(default)]
    assert parse_flags(argv) == defaults
    assert parse_flags(["--config", str(path), "--backup-port", "9999"]).backup_port == 9999


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "btree"],
        ["--port", "eighty"],
        ["--ack-timeout", "-1"],
        ["--idle-timeout", "-5"],
        ["--backup-initial-stage", "in_sync"],
        ["--shards", "0"],
    ],
)
def test_bad_flags_rejected(tmp_path: Path, argv: list[str]) -> None:
    path = write(tmp_path, COURSE)
    with pytest.raises(SettingsError):
        parse_flags(["--config", str(path), *argv])


def test_bad_file_value_overridden_by_flag_still_fails(tmp_path: Path) -> None:
    """The whole file is checked, even a value a flag replaces."""
    path = write(tmp_path, {**COURSE, "port": "eighty"})
    with pytest.raises(SettingsError, match="port"):
        parse_flags(["--config", str(path), "--port", "9000"])


def test_explicit_missing_config_file_fails(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        parse_flags(["--config", str(tmp_path / "absent.conf")])


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Without conf/settings.conf in the working directory: the built-in defaults.
    assert parse_flags([]) == Settings()
    assert parse_flags(["--port", "9000"]).port == 9000
    # With it: its values.
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", {**COURSE, "port": "7000"})
    assert parse_flags([]).port == 7000
    assert parse_flags(["--port", "9000"]).port == 9000


# -- secrets -------------------------------------------------------------------------------
@pytest.fixture
def no_secret_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(config.SECRET_ENV, raising=False)
    monkeypatch.delenv(config.CLIENT_TOKEN_ENV, raising=False)
    return monkeypatch


def test_secret_precedence_flag_file_secret_file_environment(
    tmp_path: Path, no_secret_env: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("  from-secret-file\n")
    base = write(tmp_path, {**COURSE, "secret_file": str(secret_file)})
    no_secret_env.setenv(config.SECRET_ENV, "from-environment")
    # secret_file beats the environment; its content is stripped.
    assert parse_flags(["--config", str(base)]).secret == "from-secret-file"
    both = write(tmp_path, {**COURSE, "secret": "from-file", "secret_file": str(secret_file)}, "b")
    assert parse_flags(["--config", str(both)]).secret == "from-file"
    assert parse_flags(["--config", str(both), "--secret", "from-flag"]).secret == "from-flag"
    plain = write(tmp_path, COURSE, "plain")
    assert parse_flags(["--config", str(plain)]).secret == "from-environment"
    no_secret_env.delenv(config.SECRET_ENV)
    assert parse_flags(["--config", str(plain)]).secret is None


def test_client_token_from_setting_or_environment(
    tmp_path: Path, no_secret_env: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, COURSE)
    assert parse_flags(["--config", str(path)]).client_token is None
    no_secret_env.setenv(config.CLIENT_TOKEN_ENV, "env-token")
    assert parse_flags(["--config", str(path)]).client_token == "env-token"
    assert parse_flags(["--config", str(path), "--client-token", "t"]).client_token == "t"


def test_unreadable_or_empty_secret_file_fails(
    tmp_path: Path, no_secret_env: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError, match="cannot read secret_file"):
        parse_flags(["--secret-file", str(tmp_path / "absent")])
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(SettingsError, match="is empty"):
        parse_flags(["--secret-file", str(empty)])


@pytest.mark.parametrize("bad", ["", "has space", "tab\there", "caf\u00e9", "line\n"])
def test_secret_and_token_must_fit_a_header(bad: str) -> None:
    for name in config.SECRET_FIELDS:
        with pytest.raises(SettingsError, match=name) as caught:
            Settings(**{name: bad})
        if bad:
            assert bad not in str(caught.value)


def test_secret_and_token_never_shown() -> None:
    settings = Settings(secret="s3cr3t-value", client_token="t0ken-value")
    for text in (repr(settings), str(settings), json.dumps(config.to_public_dict(settings))):
        assert "s3cr3t-value" not in text
        assert "t0ken-value" not in text
    assert "secret" not in config.to_public_dict(settings)
    assert "client_token" not in config.to_public_dict(settings)


def test_tls_needs_certificate_key_and_ca() -> None:
    assert Settings(tls_cert="c", tls_key="k", tls_ca="a").tls
    assert not Settings().tls
    for partial in ({"tls_cert": "c"}, {"tls_cert": "c", "tls_key": "k"}, {"tls_ca": "a"}):
        with pytest.raises(SettingsError, match="tls_ca"):
            Settings(**partial)
