"""The attacks of the trust issue, re-created on real processes, and refused.

Addresses of 127.0.0.0/8 other than the pair's own stand for other hosts: a
socket bound to 127.0.0.9 is an outsider on the same network.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import ssl
import subprocess
import sys

import pytest

from pbkv.client import AsyncClient, BadRequest, Client, tls_context
from pbkv.wire import FrameType
from tests.support.forge import (
    UPGRADE_REQUEST,
    RawChannel,
    Writer,
    checksum_of,
    forged_hello,
    transfer_frames,
    upgrade_flood,
)
from tests.support.harness import Pair, wait_for
from tests.support.raw_http import FORM

OUTSIDER = "127.0.0.9"
PAIRS = {f"key{i:04d}": f"value{i}" for i in range(1000)}


def load(pair: Pair, pairs: dict[str, str] = PAIRS) -> None:
    client = pair.client()
    for key, value in pairs.items():
        assert client.insert(key, value)


def shutdown_from(address: tuple[str, int], source: str, authorization: str = "") -> bytes:
    """A raw ``GET /kvman/shutdown`` from ``source``; the whole reply."""
    with socket.create_connection(address, timeout=5, source_address=(source, 0)) as sock:
        header = f"Authorization: {authorization}\r\n" if authorization else ""
        sock.sendall(f"GET /kvman/shutdown HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def refused_with(reply: bytes, status: int) -> bool:
    """Refused with ``status``: as it is (``http`` error mode), or as the default
    ``course`` mode answers, HTTP 200 with the course failure and the status in a header."""
    if reply.startswith(b"HTTP/1.1 %d " % status):
        return True
    head, _, body = reply.partition(b"\r\n\r\n")
    return (
        head.startswith(b"HTTP/1.1 200 ")
        and b"\r\nX-Pbkv-Status: %d" % status in head
        and body == b'{"success":"false"}'
    )


def forge_empty_copy(pair: Pair, source: str) -> RawChannel:
    """The issue's first attack: Upgrade, a HELLO claiming a confirmed primary, an empty
    transfer and an injected BATCH."""
    channel = RawChannel(pair.address["backup"], source)
    if channel.status == 101:
        channel.send(
            forged_hello(), *transfer_frames({}), [FrameType.BATCH, 1, ["key0001", "x"], 0, [], 0]
        )
    return channel


def assert_untouched(pair: Pair, role: str) -> None:
    assert pair.dump(role) == PAIRS
    assert pair.status(role)["keys"] == len(PAIRS)


def test_forged_channel_from_another_address_is_refused(make_pair) -> None:
    pair = make_pair()
    pair.start_both()
    load(pair)
    channel = forge_empty_copy(pair, OUTSIDER)
    assert channel.status == 403
    assert b"only from the primary" in channel.body()
    channel.close()
    assert pair.stage("backup") == "in_sync"
    assert_untouched(pair, "backup")
    assert f"refused a replication channel from {OUTSIDER}" in pair.log("backup")
    for role in ("primary", "backup"):
        assert pair.log(role).count("no secret set: protected mode") == 1
    # The real primary's channel came from its own configured address, and still serves.
    assert "accepted a replication channel from 127.0.0.1:" in pair.log("backup")
    assert pair.client().insert("after", "1")
    assert pair.dump("backup")["after"] == "1"


def test_forged_channel_while_the_primary_is_down_changes_nothing(make_pair) -> None:
    """The data-loss case: a forged copy on the backup, then the primary restarts from it."""
    pair = make_pair()
    pair.start_both()
    load(pair)
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    channel = forge_empty_copy(pair, OUTSIDER)
    assert channel.status == 403
    channel.close()
    assert_untouched(pair, "backup")
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    assert_untouched(pair, "primary")


def test_transfer_with_a_key_in_the_wrong_shard_is_rejected(make_pair) -> None:
    """From the primary's own address while it is down (a local attacker, or a buggy
    primary): every checksum matches, the key sits in the wrong shard."""
    pair = make_pair()
    pair.start_both()
    load(pair)
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    lie = dict(PAIRS, key0001="forged")
    channel = RawChannel(pair.address["backup"], "127.0.0.1")
    assert channel.status == 101
    channel.send(forged_hello(len(lie)))
    channel.send(*transfer_frames(lie, moved="key0001"))
    replies = channel.frames_until_closed()
    channel.close()
    assert [frame.kind for frame in replies] == [FrameType.HELLO, FrameType.SYNC_NACK]
    assert "holds a key of shard" in replies[-1].reason
    status = pair.status("backup")
    assert (
        status["transfers_failed"] >= 1
        and "holds a key of shard" in (status["last_transfer_error"])
    )
    assert_untouched(pair, "backup")
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    assert_untouched(pair, "primary")


def test_a_dishonest_primary_proposing_a_skip_over_other_data_is_refused(make_pair) -> None:
    """From the primary's address while it is down (protected mode): a confirmed primary
    that says both hold the same data, with a checksum that is not the backup's."""
    pair = make_pair()
    pair.start_both()
    load(pair)
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    channel = RawChannel(pair.address["backup"], "127.0.0.1")
    assert channel.status == 101
    channel.send(forged_hello(len(PAIRS)), [FrameType.SKIP, checksum_of({}), len(PAIRS), 0])
    replies = channel.frames_until_closed()
    channel.close()
    assert [frame.kind for frame in replies] == [FrameType.HELLO, FrameType.SYNC_NACK]
    assert replies[-1].reason == "skip proposed but the data differs"
    assert_untouched(pair, "backup")
    assert pair.status("backup")["confirmed"] is True
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    assert_untouched(pair, "primary")


def test_with_a_secret_a_forged_channel_from_the_primarys_own_address_is_refused(
    make_pair,
) -> None:
    """The address check passes (a local attacker, the primary down): the proofs do not."""
    pair = make_pair(secret="pair-secret")
    pair.start_both()
    load(pair)
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    channel = forge_empty_copy(pair, "127.0.0.1")
    assert channel.status == 101
    replies = channel.frames_until_closed()
    channel.close()
    assert [frame.kind for frame in replies] == [FrameType.AUTH_FAILED]
    assert "without proving it" in replies[0].reason
    assert_untouched(pair, "backup")
    assert pair.status("backup")["confirmed"] is True
    pair.start("primary")  # warm-starts from the untouched copy
    pair.wait_stage("primary", "in_sync")
    assert_untouched(pair, "primary")
    assert "authenticated the backup: the channel is keyed" in pair.log("primary")


def test_a_pair_whose_secrets_differ_never_syncs_and_both_logs_say_why(make_pair) -> None:
    pair = make_pair(secret="the-primary-s")
    pair.start("backup", "--secret", "the-backup-s")
    pair.start("primary", "--wait", "1", check=False)  # never ready: it cannot sync
    wait_for(lambda: "does not match the primary's secret" in pair.log("primary"), 10, "why")
    wait_for(lambda: "refused authentication" in pair.log("backup"), 10, "the backup's why")
    assert "the-backup-s" not in pair.log("backup") + pair.log("primary")
    assert pair.status("primary")["stage"] == "bootstrapping_secondary"
    assert pair.status("backup")["stage"] == "bootstrapping_primary"
    with pytest.raises(Exception):  # noqa: B017 - refused in either error mode
        assert not pair.client().insert("k", "v")
        raise AssertionError("unreachable: a write without a backup is refused")


def test_a_large_frame_before_the_hello_is_refused_at_its_header(make_pair) -> None:
    """Until the handshake is done only small frames count: a 32 MiB BATCH is refused
    from its length alone, before its bytes are read."""
    pair = make_pair()
    pair.start_both()
    load(pair)
    pair.kill("primary")
    pair.wait_stage("backup", "bootstrapping_primary")
    channel = RawChannel(pair.address["backup"], "127.0.0.1")
    assert channel.status == 101
    channel.sock.sendall((32 << 20).to_bytes(4, "big") + bytes(8) + b"\x93\x02\x01")
    assert channel.frames_until_closed() == []  # closed without a word
    channel.close()
    assert "exceeds" in pair.log("backup")
    assert_untouched(pair, "backup")


def test_protected_mode_shutdown_only_from_loopback_or_the_servers(make_pair) -> None:
    pair = make_pair()
    pair.start_both()
    load(pair)
    for role in ("primary", "backup"):
        reply = shutdown_from(pair.address[role], OUTSIDER)
        assert refused_with(reply, 403)
        assert b"configured server addresses" in reply
    assert pair.alive("primary") and pair.alive("backup")
    assert_untouched(pair, "backup")
    assert pair.client().insert("still", "serving")
    # The backup's own address (127.0.0.2) may stop the primary; loopback may stop anything.
    assert shutdown_from(pair.address["primary"], "127.0.0.2").startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: not pair.alive("primary"), what="primary to exit")
    pair.shutdown("backup")
    assert not pair.alive("backup")


def test_secret_guards_shutdown_and_the_owner_still_can(make_pair) -> None:
    pair = make_pair(secret="owner-secret")
    pair.start_both()
    load(pair)
    address = pair.address["primary"]
    for authorization in ("", "Bearer wrong", "Bearer owner-secret-", "owner-secret"):
        reply = shutdown_from(address, "127.0.0.1", authorization)
        assert refused_with(reply, 401), authorization
    with pytest.raises(BadRequest) as refused:
        Client(*address).shutdown(secret="guess")
    assert refused.value.status == 401
    assert pair.alive("primary") and pair.stage("primary") == "in_sync"
    assert_untouched(pair, "primary")
    assert "owner-secret" not in pair.log("primary") + pair.log("backup")
    assert "owner-secret" not in str(pair.status("primary"))
    # The secret works from anywhere, even an address protected mode would refuse.
    assert shutdown_from(address, OUTSIDER, "Bearer owner-secret").startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: not pair.alive("primary"), what="primary to exit")
    # The CLI takes it from the environment.
    host, port = pair.address["backup"]
    env = {**os.environ, "PBKV_SECRET": "owner-secret"}
    command = [sys.executable, "-m", "pbkv", "shutdown", "--host", host, "--port", str(port)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not pair.alive("backup"), what="backup to exit")


def test_stop_server_without_a_pid_file_uses_the_secret(make_pair) -> None:
    pair = make_pair(secret="owner-secret")
    pair.start("primary", "--standalone")
    pid = pair.pid("primary")
    pair.pid_file("primary").unlink()
    pair.stop("primary")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="primary to exit")


def test_client_token_is_needed_by_every_client(make_pair) -> None:
    pair = make_pair(client_token="client-token", standalone="true")
    pair.start("primary")  # the launcher's readiness poll sends the token
    host, port = pair.address["primary"]
    for call in (lambda c: c.get("a"), lambda c: c.count(), lambda c: c.status()):
        with pytest.raises(BadRequest) as refused:
            call(Client(host, port, token="wrong"))
        assert refused.value.status == 401
    assert Client(host, port, token="client-token").insert("a", "1")
    assert pair.client().get("a") == "1"

    async def async_calls() -> tuple[int, str | None]:
        with pytest.raises(BadRequest):
            async with AsyncClient(host, port) as anonymous:
                await anonymous.count()
        async with AsyncClient(host, port, token="client-token") as client:
            return await client.count(), await client.get("a")

    assert asyncio.run(async_calls()) == (1, "1")
    base = [sys.executable, "-m", "pbkv", "--host", host, "--port", str(port)]
    run = lambda *words, env=None: subprocess.run(  # noqa: E731
        [*base, *words], env=env, capture_output=True, text=True, timeout=30
    )
    assert run("get", "a").returncode == 2
    assert run("--token", "client-token", "get", "a").stdout == "1\n"
    env = {**os.environ, "PBKV_CLIENT_TOKEN": "client-token"}
    assert run("get", "a", env=env).stdout == "1\n"
    assert "client-token" not in pair.log("primary")
    pair.stop("primary")


@pytest.fixture
def authority(tmp_path):
    from tests.support.certs import Authority  # cryptography is a test dependency

    return Authority(tmp_path / "certs")


def tls_pair(make_pair, authority) -> Pair:
    primary_cert, primary_key = authority.issue("primary", "127.0.0.1")
    pair = make_pair(tls_ca=str(authority.ca_file), tls_cert=primary_cert, tls_key=primary_key)
    pair.backup_tls = authority.issue("backup", "127.0.0.2")
    return pair


def start_tls_pair(pair: Pair) -> None:
    cert, key = pair.backup_tls
    pair.start("backup", "--tls-cert", cert, "--tls-key", key)
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    pair.wait_stage("backup", "in_sync")


def test_tls_pair_syncs_and_serves(make_pair, authority) -> None:
    pair = tls_pair(make_pair, authority)
    start_tls_pair(pair)
    load(pair, dict(list(PAIRS.items())[:100]))
    assert pair.dump("backup") == dict(list(PAIRS.items())[:100])
    # Every client speaks HTTPS from the settings: the library, asyncio, the CLI.
    with Client.from_settings(pair.config, "backup") as client:
        assert client.get("key0001") == "value1"

    async def async_get() -> str | None:
        async with AsyncClient.from_settings(pair.config) as client:
            return await client.get("key0002")

    assert asyncio.run(async_get()) == "value2"
    command = [sys.executable, "-m", "pbkv", "--config", str(pair.config), "get", "key0003"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.stdout == "value3\n", result.stderr
    pair.kill("primary")
    pair.start("primary")  # warm start over TLS
    pair.wait_stage("primary", "in_sync")
    assert len(pair.dump("primary")) == 100
    assert "channel over TLS" in pair.log("backup")


def test_pbkv_load_streams_a_file_of_several_blocks_over_tls(make_pair, authority) -> None:
    """A load's body goes out a block at a time while the client watches for an early
    reply: what TLS itself sends after the handshake (session tickets) is not one."""
    from pbkv.bulk import json_lines

    pair = tls_pair(make_pair, authority)
    start_tls_pair(pair)
    pairs = [(f"key-{i:08d}", "v" * 100) for i in range(30_000)]  # over 3 MiB: 4 blocks
    command = [sys.executable, "-m", "pbkv", "--config", str(pair.config), "load", "-"]
    done = subprocess.run(command, input=json_lines(pairs), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"30000 pairs written" in done.stdout, done.stdout
    assert len(pair.dump("backup")) == 30_000
    # An invalid line early in a long file: the answer comes while the client sends.
    data = json_lines(pairs[:5]) + b"not json\n" + json_lines(pairs) * 7  # over 20 MiB
    done = subprocess.run(command, input=data, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"line 6: not valid JSON" in done.stderr, done.stderr


def test_the_backup_over_tls_redirects_to_https(make_pair, authority) -> None:
    primary_cert, primary_key = authority.issue("primary", "127.0.0.1")
    pair = make_pair(
        tls_ca=str(authority.ca_file), tls_cert=primary_cert, tls_key=primary_key, errors="http"
    )
    pair.backup_tls = authority.issue("backup", "127.0.0.2")
    start_tls_pair(pair)
    context = tls_context(str(authority.ca_file))
    host, port = pair.address["backup"]
    conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        conn.request("POST", "/kv/insert?key=t", body=b"value=v", headers={"Content-Type": FORM})
        reply = conn.getresponse()
        reply.read()
    finally:
        conn.close()
    assert reply.status == 307
    assert reply.getheader("Location") == "https://%s:%d/kv/insert?key=t" % pair.address["primary"]
    addresses = ["%s:%d" % pair.address[role] for role in ("backup", "primary")]
    with Client(addresses=addresses, timeout=10, ssl_context=context) as client:
        assert client.insert("t", "v")
        assert client.address == pair.address["primary"]


def test_plain_client_to_a_tls_port_fails_cleanly(make_pair, authority) -> None:
    pair = tls_pair(make_pair, authority)
    start_tls_pair(pair)
    host, port = pair.address["primary"]
    with pytest.raises((ConnectionError, BadRequest)):
        Client(host, port, timeout=5).get("a")
    # A client that does not trust the CA refuses the server.
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(host, port, timeout=5, ssl_context=tls_context()).get("a")
    assert pair.client().insert("still", "serving")


def test_tls_channel_needs_a_certificate_of_the_primary(make_pair, authority, tmp_path) -> None:
    pair = tls_pair(make_pair, authority)
    start_tls_pair(pair)
    load(pair, {"a": "1"})
    host, port = pair.address["backup"]

    def upgrade(context: ssl.SSLContext) -> bytes:
        raw = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.1", 0))
        with context.wrap_socket(raw, server_hostname=host) as sock:
            sock.sendall(UPGRADE_REQUEST)
            return sock.recv(4096)

    accepted = pair.log("backup").count("accepted a replication channel")
    no_certificate = tls_context(str(authority.ca_file))
    assert upgrade(no_certificate).startswith(b"HTTP/1.1 403 ")
    # A certificate from the right CA that names the backup, not the primary.
    with_backup_certificate = tls_context(str(authority.ca_file))
    with_backup_certificate.load_cert_chain(*pair.backup_tls)
    assert upgrade(with_backup_certificate).startswith(b"HTTP/1.1 403 ")
    # One from another CA that names the primary: the TLS handshake itself fails.
    from tests.support.certs import Authority

    rogue = Authority(tmp_path / "rogue", "rogue CA")
    rogue_context = tls_context(str(authority.ca_file))
    rogue_context.load_cert_chain(*rogue.issue("primary", "127.0.0.1"))
    # (TLS 1.3: the server's refusal comes as an alert after the client's handshake.)
    try:
        reply = upgrade(rogue_context)
    except (ssl.SSLError, ConnectionError):
        reply = b""
    assert reply == b""
    assert pair.log("backup").count("accepted a replication channel") == accepted
    assert pair.log("backup").count("refused a replication channel") == 2
    assert pair.dump("backup") == {"a": "1"}
    assert pair.stage("backup") == "in_sync"


# -- a new channel must prove itself before it replaces the live one ------------------------


def test_with_a_secret_an_upgrade_flood_from_the_primarys_address_costs_no_write(
    make_pair,
) -> None:
    """Thousands of Upgrades from the primary's own address (any local user can bind it),
    each answered 101: none may drop the authenticated channel before it proves the
    secret, so the writer never waits and nothing is refused."""
    pair = make_pair(secret="pair-secret")
    pair.start_both()
    load(pair, dict(list(PAIRS.items())[:100]))
    with Writer(pair.address["primary"]) as writer:
        wait_for(lambda: writer.acknowledged > 50, 10, "the writer to run")
        upgrades = upgrade_flood(pair.address["backup"], "127.0.0.1", seconds=3.0)
    assert upgrades > 200, f"only {upgrades} upgrades: the flood did not happen"
    print(
        f"{upgrades} upgrades; writer: {writer.acknowledged} acknowledged, longest gap "
        f"{writer.longest_gap:.3f}s"
    )
    assert writer.refused == [], writer.refused[:3]
    assert writer.longest_gap < 1.0
    for role in ("primary", "backup"):
        assert pair.stage(role) == "in_sync"
    assert pair.dump("backup") == pair.dump("primary")
    assert "replaced by a new connection" not in pair.log("backup")
    log = pair.log("backup")
    assert "did not prove the secret: the backup has a secret set" in log
    assert log.count("accepted a replication channel") < 100  # a flood, not a log flood


# -- a peer's words reach the log escaped --------------------------------------------------

FORGED_REASON = "nothing\r\nCRITICAL backup lost every key\x1b[2J\x1b[31m"


@pytest.mark.parametrize("secret", ["pair-secret", None])
def test_a_peers_reason_cannot_forge_a_log_line_or_an_escape(make_pair, secret) -> None:
    """With a secret, before any proof (an AUTH_FAILED on a new channel); without, from
    the primary's address (a SYNC_NACK in a transfer): the reason is logged escaped."""
    pair = make_pair(secret=secret) if secret else make_pair()
    pair.start_both()
    channel = RawChannel(pair.address["backup"], "127.0.0.1")
    assert channel.status == 101
    if secret:
        channel.send([FrameType.AUTH_CHALLENGE, bytes(32)], [FrameType.AUTH_FAILED, FORGED_REASON])
    else:
        channel.send(
            forged_hello(),
            [FrameType.SNAPSHOT_BEGIN, 16, 0],
            [FrameType.SYNC_NACK, FORGED_REASON],
        )
    channel.frames_until_closed()
    channel.close()
    wait_for(lambda: "CRITICAL backup lost" in pair.log("backup"), 10, "the reason in the log")
    with open(pair.log_file("backup"), "rb") as file:
        raw = file.read()
    assert b"\x1b" not in raw
    assert not [line for line in raw.splitlines() if line.startswith(b"CRITICAL")]
    assert b"nothing\\r\\nCRITICAL backup lost every key\\x1b[2J" in raw
    pair.wait_stage("primary", "in_sync")
    assert pair.client().insert("after", "1")


# -- counts a frame declares -------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's largest resident set so far, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_snapshot_begin_declaring_a_huge_shard_count_allocates_nothing(make_pair) -> None:
    """Protected mode, from the primary's address: one tiny SNAPSHOT_BEGIN declaring
    100,000,000 shards (it allocated 1.5 GB) is refused before anything is allocated."""
    pair = make_pair()
    pair.start_both()
    load(pair, dict(list(PAIRS.items())[:100]))
    pid = pair.pid("backup")
    assert pid is not None
    before = peak_rss(pid)
    channel = RawChannel(pair.address["backup"], "127.0.0.1")
    assert channel.status == 101
    channel.send(forged_hello(), [FrameType.SNAPSHOT_BEGIN, 100_000_000, 0])
    assert [frame.kind for frame in channel.frames_until_closed()] == [FrameType.HELLO]
    channel.close()
    why = "bad frame: SNAPSHOT_BEGIN field 1: a shard count must be 1 to 4096, not 100000000"
    wait_for(
        lambda: why in pair.log("backup") or peak_rss(pid) - before > 20_000_000,
        10,
        "the frame to be refused or to cost memory",
    )
    grown = peak_rss(pid) - before
    print(f"backup peak RSS {before / 1e6:.1f} MB, grew by {grown / 1e6:.1f} MB")
    assert grown < 20_000_000
    assert why in pair.log("backup")
    assert pair.client("backup").get("key0001") == "value1"
    pair.wait_stage("primary", "in_sync")
    pair.wait_stage("backup", "in_sync")
    assert pair.client().insert("after", "1")
    assert pair.dump("backup") == pair.dump("primary")
