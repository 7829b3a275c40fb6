"""The coordinator settings (etcd URLs, cluster prefix, lease TTL), and that a server
without a coordinator never loads etcd's client."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pbkv import config
from pbkv.config import Settings, SettingsError, load_file, parse_endpoints, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def parse_flags(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_defaults_are_the_fixed_pair() -> None:
    settings = Settings()
    assert settings.coordinator is None
    assert settings.coordinator_endpoints == ()
    assert settings.cluster == "pbkv"
    assert settings.lease_ttl == 3


def test_settings_file_with_one_url_or_a_list(tmp_path: Path) -> None:
    path = tmp_path / "settings.conf"
    path.write_text(
        json.dumps({"coordinator": "http://10.0.0.1:2379", "cluster": "prod", "lease_ttl": "5"})
    )
    settings = Settings(**load_file(path))
    assert settings.coordinator_endpoints == (("10.0.0.1", 2379),)
    assert (settings.cluster, settings.lease_ttl) == ("prod", 5)
    path.write_text(json.dumps({"coordinator": ["http://10.0.0.1:2379", "10.0.0.2:22379"]}))
    settings = Settings(**load_file(path))
    assert settings.coordinator == "http://10.0.0.1:2379,10.0.0.2:22379"
    assert settings.coordinator_endpoints == (("10.0.0.1", 2379), ("10.0.0.2", 22379))


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.conf"
    path.write_text(json.dumps({"coordinator": "http://10.0.0.1:2379", "lease_ttl": "5"}))
    settings = parse_flags(
        [
            "--config",
            str(path),
            "--coordinator",
            "http://127.0.0.1:2379, http://127.0.0.2:2379",
            "--cluster",
            "team/kv",
            "--lease-ttl",
            "2",
        ]
    )
    assert settings.coordinator_endpoints == (("127.0.0.1", 2379), ("127.0.0.2", 2379))
    assert (settings.cluster, settings.lease_ttl) == ("team/kv", 2)


@pytest.mark.parametrize(
    ("text", "endpoints"),
    [
        ("http://etcd.example:2379", (("etcd.example", 2379),)),
        ("etcd.example", (("etcd.example", 2379),)),
        ("http://[::1]:2379", (("[::1]", 2379),)),
        ("http://a:1,,http://b:2,", (("a", 1), ("b", 2))),
    ],
)
def test_endpoints(text: str, endpoints: tuple[tuple[str, int], ...]) -> None:
    assert parse_endpoints(text) == endpoints


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"coordinator": ""}, "at least one etcd URL"),
        ({"coordinator": " , "}, "at least one etcd URL"),
        ({"coordinator": "https://10.0.0.1:2379"}, "only http://"),
        ({"coordinator": "http://10.0.0.1:99999"}, "invalid port"),
        ({"coordinator": "http://10.0.0.1:2379/v3"}, "http://HOST[:PORT]"),
        ({"coordinator": "http://user@10.0.0.1:2379"}, "http://HOST[:PORT]"),
        ({"cluster": ""}, "cluster must be non-empty"),
        ({"cluster": "my cluster"}, "cluster must be non-empty"),
        ({"cluster": "pbkv/"}, "must not start or end with '/'"),
        ({"cluster": "/pbkv"}, "must not start or end with '/'"),
        ({"lease_ttl": 1}, "lease_ttl must be at least 2"),
        ({"lease_ttl": 0}, "lease_ttl must be at least 2"),
    ],
)
def test_invalid_values_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings(**values)  # type: ignore[arg-type]


def test_a_fractional_ttl_is_refused() -> None:
    # etcd counts leases in whole seconds.
    with pytest.raises(SettingsError, match="lease_ttl"):
        config.parse_mapping({"lease_ttl": "2.5"})


def test_the_server_does_not_import_the_etcd_client() -> None:
    """grpc costs start-up time: only a configured coordinator may load it. The
    coordinator module itself imports it only when it opens a connection."""
    code = (
        "import sys\n"
        "import pbkv.cli, pbkv.node, pbkv.launcher, pbkv.config, pbkv.coordinator\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aetcd', 'grpc', 'google'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
