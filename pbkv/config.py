"""Settings: ``conf/settings.conf`` (JSON with string values, as in the course)
overridden by command-line flags.

Every field of ``Settings`` can appear in the file under its own name and on
the command line as ``--name-with-dashes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "conf/settings.conf"
ROLES = ("primary", "backup")
BACKUP_INITIAL_STAGES = ("cold_start", "bootstrapping_primary")
SECRET_ENV = "PBKV_SECRET"
CLIENT_TOKEN_ENV = "PBKV_CLIENT_TOKEN"
# Never shown: not in repr, status, logs or ``to_public_dict``.
SECRET_FIELDS = ("secret", "client_token")
# "course": every request that reaches a route gets HTTP 200 and the course's failure
# shape, the reason in an X-Pbkv-Error header; "http": real HTTP statuses and JSON errors.
ERROR_MODES = ("course", "http")
# Persistence (docs/persistence.md): "off" keeps the data in memory only; "everysec"
# logs every batch and fsyncs once a second; "always" fsyncs before acknowledging.
PERSISTENCE_MODES = ("off", "everysec", "always")
# etcd's client port, when a coordinator URL names none.
ETCD_CLIENT_PORT = 2379
# etcd 3.4 with its default --heartbeat-interval (100 ms) and --election-timeout (1 s)
# grants no lease shorter than ceil(1.5 election timeouts) = 2 s: asked for 1 s, it
# grants 2 s. A shorter setting would not mean what it says.
MIN_LEASE_TTL = 2


# The most shards a store may have; a transfer declaring more is refused (see wire.py).
MAX_SHARDS = 4096


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which."""


@dataclass(frozen=True, slots=True)
class Settings:
    primary: str = "127.0.0.1"
    backup: str = "127.0.0.2"
    port: int = 8080
    # None: same as ``port``, or port + 1 when both servers share an address.
    backup_port: int | None = None

    store: str = "sharded"  # "sharded" or "hash"
    shards: int = 16
    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 1024 * 1024

    # Replication timing, in seconds.
    ack_timeout: float = 2.0  # a batch not acknowledged by then fails
    heartbeat_interval: float = 0.2  # each side sends at least this often
    peer_timeout: float = 2.0  # silence after which the peer is gone
    retry_min: float = 0.05  # first back-off after a failed attempt
    retry_max: float = 1.0  # back-off ceiling
    transfer_chunk: int = 2048  # pairs per frame during a full transfer
    batches_in_flight: int = 2  # replication batches sent before the oldest is acked
    # The backup's undo record for partial resynchronization (0: always a full transfer).
    undo_bytes: int = 64 * 1024 * 1024

    backup_initial_stage: str = "cold_start"
    # A primary that answers writes without a backup (tests, one-node use).
    standalone: bool = False
    idle_timeout: float = 300.0  # close connections this long after their last request
    # Bounds on what clients may hold (see docs/limits.md).
    header_timeout: float = 10.0  # a request line and headers must arrive within this
    body_timeout: float = 30.0  # a body must arrive within this after its headers
    send_timeout: float = 60.0  # replies that do not drain for this long close the connection
    max_reply_buffer: int = 1024 * 1024  # unsent reply bytes before a connection is not read
    max_pipeline: int = 1024  # unanswered requests before a connection is not read
    max_pending_bytes: int = 256 * 1024 * 1024  # unfinished requests and unanswered writes
    max_memory: int = 0  # approximate bytes of pairs past which writes are refused; 0 = off
    max_clients: int = 10_000  # client connections; the replication channel has a reserve
    # Safe retries (docs/api.md): the remembered replies of writes with an Idempotency-Key,
    # at most this many, each for this many seconds (both servers must agree on both).
    idempotency_keys: int = 100_000
    idempotency_ttl: float = 3600.0
    errors: str = "course"  # how refusals are answered: see ERROR_MODES
    log_level: str = "info"

    # Trust (docs/security.md). The secret authenticates the two servers to each
    # other and the owner's /kvman/shutdown; see ``with_secrets`` for where it
    # may come from. The client token, when set, is needed by every client request.
    secret: str | None = dataclasses.field(default=None, repr=False)
    secret_file: str | None = None
    client_token: str | None = dataclasses.field(default=None, repr=False)
    tls_cert: str | None = None  # PEM certificate chain of this server
    tls_key: str | None = None  # its private key
    tls_ca: str | None = None  # the CA that signed both servers' certificates

    # High availability (SPEC section 8): etcd's client URL(s), comma-separated; None is
    # the seed's fixed pair. ``cluster`` prefixes every key the members share in etcd,
    # ``lease_ttl`` is the lease (whole seconds, as etcd counts them) their keys live by.
    coordinator: str | None = None
    cluster: str = "pbkv"
    lease_ttl: int = 3

    # Persistence (SPEC section 10, docs/persistence.md): a record log and snapshots in
    # ``data_dir``/<this server's address>/. A rewrite (a new snapshot, the log after it
    # emptied) starts once the log has grown by ``rewrite_percentage`` percent of the
    # last snapshot's size and is at least ``rewrite_min_bytes`` (Redis's
    # auto-aof-rewrite-percentage and auto-aof-rewrite-min-size); 0 percent: never.
    persistence: str = "off"
    data_dir: str | None = None
    rewrite_percentage: int = 100
    rewrite_min_bytes: int = 64 * 1024 * 1024
    # Writes are refused (before anything is applied) while the data folder's file
    # system has less than this free: room for the records of writes under way.
    disk_headroom: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.store not in ("sharded", "hash"):
            raise SettingsError(f"store must be 'sharded' or 'hash', not {self.store!r}")
        if self.errors not in ERROR_MODES:
            raise SettingsError(
                f"errors must be one of {', '.join(ERROR_MODES)}, not {self.errors!r}"
            )
        if self.backup_initial_stage not in BACKUP_INITIAL_STAGES:
            raise SettingsError(
                f"backup_initial_stage must be one of {', '.join(BACKUP_INITIAL_STAGES)}"
            )
        for name in (
            "port",
            "shards",
            "max_key_bytes",
            "max_value_bytes",
            "transfer_chunk",
            "batches_in_flight",
            "max_reply_buffer",
            "max_pipeline",
            "max_pending_bytes",
            "max_clients",
            "idempotency_keys",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be a positive number")
        if self.undo_bytes < 0:
            raise SettingsError("undo_bytes must be 0 (no partial resync) or more")
        if self.shards > MAX_SHARDS:
            raise SettingsError(f"shards must be at most {MAX_SHARDS}")
        if not 0 < self.port < 65536:
            raise SettingsError("port must be between 1 and 65535")
        if self.backup_port is not None and not 0 < self.backup_port < 65536:
            raise SettingsError("backup_port must be between 1 and 65535")
        for name in (
            "ack_timeout",
            "heartbeat_interval",
            "peer_timeout",
            "retry_min",
            "idle_timeout",
            "header_timeout",
            "body_timeout",
            "send_timeout",
            "idempotency_ttl",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be a positive number of seconds")
        if self.max_memory < 0:
            raise SettingsError("max_memory must be 0 (off) or a number of bytes")
        if self.retry_max < self.retry_min:
            raise SettingsError("retry_max must be at least retry_min")
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            # It travels in an Authorization header: visible ASCII only. The
            # message never quotes the value.
            if value is not None and (not value or not all("!" <= c <= "~" for c in value)):
                raise SettingsError(f"{name} must be non-empty printable ASCII without spaces")
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise SettingsError(
                "TLS needs all of tls_cert, tls_key and tls_ca (the CA verifies the peer)"
            )
        if self.coordinator is not None:
            parse_endpoints(self.coordinator)
        if not self.cluster or not all("!" <= c <= "~" for c in self.cluster):
            raise SettingsError("cluster must be non-empty printable ASCII without spaces")
        if self.cluster.startswith("/") or self.cluster.endswith("/"):
            raise SettingsError("cluster must not start or end with '/'")
        if self.persistence not in PERSISTENCE_MODES:
            raise SettingsError(
                f"persistence must be one of {', '.join(PERSISTENCE_MODES)}, "
                f"not {self.persistence!r}"
            )
        if self.persistence != "off" and not self.data_dir:
            raise SettingsError(f"persistence {self.persistence} needs data_dir (a folder)")
        if self.persistence != "off" and self.standalone:
            raise SettingsError("persistence needs a pair: a standalone primary logs no batches")
        if self.rewrite_percentage < 0:
            raise SettingsError("rewrite_percentage must be 0 (never) or more")
        if self.rewrite_min_bytes < 0:
            raise SettingsError("rewrite_min_bytes must be 0 or a number of bytes")
        if self.disk_headroom < 0:
            raise SettingsError("disk_headroom must be 0 or a number of bytes")
        if self.lease_ttl < MIN_LEASE_TTL:
            raise SettingsError(
                f"lease_ttl must be at least {MIN_LEASE_TTL} seconds (etcd grants no less)"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def persistent(self) -> bool:
        return self.persistence != "off"

    @property
    def coordinator_endpoints(self) -> tuple[tuple[str, int], ...]:
        """etcd's client endpoints as (host, port); empty without a coordinator."""
        return () if self.coordinator is None else parse_endpoints(self.coordinator)

    @property
    def effective_backup_port(self) -> int:
        if self.backup_port is not None:
            return self.backup_port
        return self.port + 1 if self.primary == self.backup else self.port

    def address_of(self, role: str) -> tuple[str, int]:
        if role == "primary":
            return self.primary, self.port
        if role == "backup":
            return self.backup, self.effective_backup_port
        raise SettingsError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """etcd client URLs, comma-separated (``http://10.0.0.1:2379,http://10.0.0.2:2379``),
    as (host, port) pairs; ``host:port`` without a scheme is accepted, as etcdctl
    does, and the port defaults to etcd's 2379. An IPv6 host keeps its brackets.
    Only plain ``http``: the client speaks no TLS to etcd."""
    endpoints: list[tuple[str, int]] = []
    for item in text.split(","):
        url = item.strip()
        if not url:
            continue
        split = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        try:
            port = split.port or ETCD_CLIENT_PORT
        except ValueError:
            raise SettingsError(f"coordinator URL {url!r} has an invalid port") from None
        if split.scheme != "http":
            raise SettingsError(
                f"coordinator URL {url!r}: only http:// is supported (no TLS to etcd)"
            )
        host = split.hostname
        if not host or split.path.strip("/") or split.query or split.username:
            raise SettingsError(f"coordinator URL {url!r} must be http://HOST[:PORT]")
        endpoints.append((f"[{host}]" if ":" in host else host, port))
    if not endpoints:
        raise SettingsError("coordinator must name at least one etcd URL")
    return tuple(endpoints)


_FIELDS = {f.name: f for f in fields(Settings)}


def _convert(name: str, raw: Any) -> Any:
    """Turn a string (file or flag) into the field's type."""
    kind = _FIELDS[name].type
    if raw is None:
        return None
    if name == "coordinator" and isinstance(raw, list):
        # The settings file may list the URLs as a JSON array.
        if not all(isinstance(url, str) for url in raw):
            raise SettingsError(f"setting {name!r} has an invalid value {raw!r}")
        return ",".join(raw)
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name!r} has an invalid value {raw!r}") from None


def parse_mapping(values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
    return {name: _convert(name, raw) for name, raw in values.items()}


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid UTF-8: {exc.reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a JSON object")
    return parse_mapping(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting, plus ``--config``."""
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="settings file (JSON)")
    for name, field in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, dest=name, default=None, action="store_const", const=True)
            parser.add_argument(
                "--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """File values first, then the flags that were given."""
    values: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config and (Path(config).exists() or config != DEFAULT_CONFIG_PATH):
        values.update(load_file(config))
    flags = {n: getattr(args, n) for n in _FIELDS if getattr(args, n, None) is not None}
    values.update(parse_mapping(flags))
    return with_secrets(Settings(**values))


def with_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """Fill in the secret and the client token from where they may live outside the
    settings, so that neither needs to sit in a world-readable file.

    The secret is the first of: ``secret`` (flag, then settings file), the stripped
    contents of ``secret_file`` (read now), the ``PBKV_SECRET`` environment variable.
    The client token: ``client_token``, then ``PBKV_CLIENT_TOKEN``.
    """
    env = os.environ if environ is None else environ
    secret = settings.secret
    if secret is None and settings.secret_file is not None:
        try:
            secret = Path(settings.secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8"
            raise SettingsError(
                f"cannot read secret_file {settings.secret_file}: {reason}"
            ) from None
        if not secret:
            raise SettingsError(f"secret_file {settings.secret_file} is empty")
    if secret is None:
        secret = env.get(SECRET_ENV) or None
    token = settings.client_token
    if token is None:
        token = env.get(CLIENT_TOKEN_ENV) or None
    if secret == settings.secret and token == settings.client_token:
        return settings
    return dataclasses.replace(settings, secret=secret, client_token=token)


def to_public_dict(settings: Settings) -> dict[str, Any]:
    """Every setting except the secret and the client token."""
    public = dataclasses.asdict(settings)
    for name in SECRET_FIELDS:
        del public[name]
    return public
