"""The ``pbkv`` command: talk to a running server, or run one with ``pbkv serve ...``.

Exit status: 0 done; 1 the answer was "no" (key missing, key already exists);
2 usage error, server error or no connection.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pbkv.config import (
    CLIENT_TOKEN_ENV,
    DEFAULT_CONFIG_PATH,
    SECRET_ENV,
    Settings,
    SettingsError,
    add_arguments,
    load_file,
    settings_from_args,
    with_secrets,
)
from pbkv.stages import Role

if TYPE_CHECKING:
    from pbkv.client import Client, PbkvError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO = 1
EXIT_ERROR = 2

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def escape(text: str) -> str:
    """Backslash-escape ``\\``, tab, newline, CR and NUL so a dump line stays one line."""
    return text.translate(_ESCAPES)


def _connection_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command; only the top level holds defaults."""
    from pbkv.client import DEFAULT_FAILOVER, DEFAULT_RETRY_FOR, DEFAULT_TIMEOUT

    parser = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        # On the subcommands, an option not given must not overwrite the top level's value.
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        default=default(None),
        metavar="PATH",
        help=f"settings file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "-a",
        "--address",
        action="append",
        default=default(None),
        metavar="HOST:PORT",
        help="a server of the cluster; give it several times or comma-separated: the "
        "client finds the primary among them and follows it through a failover",
    )
    parser.add_argument(
        "--coordinator",
        default=default(None),
        metavar="URL",
        help="etcd's client URL(s): talk to the members registered there (see --cluster)",
    )
    parser.add_argument(
        "--cluster",
        default=default(None),
        metavar="NAME",
        help="the cluster's name in etcd (default: the settings' cluster, pbkv)",
    )
    parser.add_argument(
        "--failover",
        "--retry-for",
        dest="failover",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="how long one command keeps trying: looking for the primary (with --address "
        f"or --coordinator; default {DEFAULT_FAILOVER:g}), and sending a write again with "
        "its Idempotency-Key after a lost connection, 'replication failed' or a refusal "
        f"(default {DEFAULT_RETRY_FOR:g} with one server; 0: one attempt)",
    )
    parser.add_argument("--host", default=default(None), help="server address (overrides config)")
    parser.add_argument("--port", type=int, default=default(None), help="server port")
    parser.add_argument(
        "--backup",
        action="store_true",
        default=default(False),
        help="talk to the backup instead of the primary",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print raw JSON replies"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"per-request timeout (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help=f"the servers' client_token (default: the settings, then ${CLIENT_TOKEN_ENV})",
    )
    parser.add_argument(
        "--secret",
        default=default(None),
        help=f"the servers' secret, for shutdown (default: the settings, then ${SECRET_ENV})",
    )
    parser.add_argument(
        "--cafile",
        default=default(None),
        metavar="PATH",
        help="speak HTTPS, verifying the server against this CA (default: the settings' tls_ca)",
    )
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbkv",
        description="Client for a pbkv server (primary-backup replicated key-value store).",
        parents=[_connection_options(defaults=True)],
        epilog="Exit status: 0 ok, 1 key missing or already there, 2 error.",
    )
    common = [_connection_options(defaults=False)]
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("get", parents=common, help="print the value of KEY")
    cmd.add_argument("key", metavar="KEY")
    cmd = commands.add_parser("insert", parents=common, help="add KEY (fails if it exists)")
    cmd.add_argument("key", metavar="KEY")
    cmd.add_argument("value", metavar="VALUE")
    cmd = commands.add_parser("update", parents=common, help="change KEY (fails if missing)")
    cmd.add_argument("key", metavar="KEY")
    cmd.add_argument("value", metavar="VALUE")
    cmd = commands.add_parser("delete", parents=common, help="remove KEY, print its old value")
    cmd.add_argument("key", metavar="KEY")
    commands.add_parser("count", parents=common, help="print the number of keys")
    cmd = commands.add_parser(
        "dump",
        parents=common,
        help="write every pair to FILE (default: stdout) as JSON lines, one [key, value] "
        "array a line (what load reads)",
    )
    cmd.add_argument("file", nargs="?", metavar="FILE", help="the file to write (- : stdout)")
    cmd.add_argument(
        "--tsv",
        action="store_true",
        help="KEY<TAB>VALUE lines instead (backslash, tab, newline, CR, NUL escaped)",
    )
    cmd = commands.add_parser(
        "load",
        parents=common,
        help="load pairs from FILE (default: stdin) into the primary: JSON lines as dump "
        "writes them, or CSV key,value records with --csv",
        description="Stream FILE to the primary's bulk load (POST /kvman/load). Each batch "
        "of pairs is applied on both servers, whole, before the next counts; an invalid "
        "line stops the load: every line before it is applied, nothing from it on. "
        "Exit status: 0 every line applied, 2 otherwise.",
    )
    cmd.add_argument("file", nargs="?", default="-", metavar="FILE", help="- : stdin")
    cmd.add_argument("--csv", action="store_true", help="CSV records key,value (RFC 4180)")
    cmd.add_argument(
        "--mode",
        choices=("insert", "upsert"),
        default="insert",
        help="insert (default): a key that exists keeps its value (counted as skipped); "
        "upsert: its value is overwritten",
    )
    commands.add_parser("status", parents=common, help="print the server's status")
    cmd = commands.add_parser(
        "cluster",
        parents=common,
        help="list the servers: address, role, stage, epoch, in sync, lag, lease left",
        description="List the cluster's servers (as patronictl list does): those given, "
        "else the members registered in etcd (--coordinator), else the settings' pair. "
        "Exit status: 0 every server answered, 1 some did not, 2 none to list.",
    )
    cmd.add_argument("servers", nargs="*", metavar="HOST:PORT", help="the servers to list")
    commands.add_parser("shutdown", parents=common, help="stop the server")
    # No option prefix: every word after "serve" (even -h or --port) is the server's.
    cmd = commands.add_parser(
        "serve", add_help=False, prefix_chars="\0", help="run a server (see: pbkv serve -h)"
    )
    cmd.add_argument("server_args", nargs=argparse.REMAINDER)
    cmd = commands.add_parser(
        "check-data",
        add_help=False,
        prefix_chars="\0",
        help="verify persistence files, --fix cuts a torn tail (see: pbkv check-data -h)",
    )
    cmd.add_argument("check_args", nargs=argparse.REMAINDER)
    return parser


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {role} %(message)s",
        stream=sys.stderr,
    )


def serve_main(argv: list[str] | None = None, ready_fd: int | None = None) -> int:
    """``pbkv serve --role primary|backup [settings...]``: run one server until stopped.

    ``ready_fd``: a pipe to write ``listening`` on (then closed) once the server
    listens (``bin/start_server`` waits for it).
    """
    parser = argparse.ArgumentParser(prog="pbkv serve", description="Run a pbkv server.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--role", choices=[role.value for role in Role])
    which.add_argument(
        "--member",
        metavar="HOST:PORT",
        help="a member of the cluster the coordinator setting names, listening here",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    member: tuple[str, int] | None = None
    try:
        settings = settings_from_args(args)
        if args.member is not None:
            member = _member_address(args.member, settings)
    except SettingsError as exc:
        print(f"pbkv: {exc}", file=sys.stderr)
        return 2
    role = Role(args.role or Role.BACKUP)
    setup_logging(settings.log_level, "member" if member else role)
    import asyncio
    import signal

    import uvloop

    from pbkv.metrics import freeze_startup_objects
    from pbkv.node import Node  # the server's dependencies are not the client's

    listening: Callable[[], None] | None = None
    if ready_fd is not None:
        fd = ready_fd

        def listening() -> None:
            try:
                os.write(fd, b"listening\n")
            except OSError:
                pass  # the launcher is gone: nobody to tell
            os.close(fd)

    async def serve() -> None:
        node = Node(settings, role, member)
        freeze_startup_objects()  # the process's own objects, and the data it recovered
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, node.stopped.set)
        await node.run(listening)

    try:
        uvloop.run(serve())
    except OSError as exc:
        host, port = member or settings.address_of(role)
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _member_address(text: str, settings: Settings) -> tuple[str, int]:
    """A member's own address; a member needs a coordinator and a secret."""
    from pbkv.member import parse_address

    if settings.coordinator is None:
        raise SettingsError("a member (--member) needs the coordinator setting (etcd's URL)")
    if settings.secret is None:
        raise SettingsError(
            "a member needs a secret (secret, secret_file or PBKV_SECRET): any member may "
            "lead, so the members prove the secret to each other instead of trusting addresses"
        )
    try:
        return parse_address(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _address(args: argparse.Namespace) -> tuple[str, int]:
    if args.host is not None and args.port is not None:
        return args.host, args.port
    from pbkv.client import server_address

    role = "backup" if args.backup else "primary"
    if args.config is None and not Path(DEFAULT_CONFIG_PATH).exists():
        host, port = Settings().address_of(role)  # what a server started here would use
    else:
        host, port = server_address(args.config or DEFAULT_CONFIG_PATH, role)
    return (args.host if args.host is not None else host), (
        args.port if args.port is not None else port
    )


def _settings(args: argparse.Namespace) -> Settings:
    """The settings file's (if any), with the flags' token and secret.

    The same precedence as the server's: a flag, then the settings file (``secret``,
    then ``secret_file``), then ``PBKV_SECRET`` / ``PBKV_CLIENT_TOKEN``.
    """
    path = args.config or DEFAULT_CONFIG_PATH
    settings = Settings(**load_file(path)) if Path(path).exists() or args.config else Settings()
    if args.secret is not None:
        settings = dataclasses.replace(settings, secret=args.secret)
    if args.token is not None:
        settings = dataclasses.replace(settings, client_token=args.token)
    return with_secrets(settings)


def _client_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The token and TLS of the flags or the settings, as the clients take them."""
    from pbkv.client import tls_context

    cafile = args.cafile if args.cafile is not None else settings.tls_ca
    return {
        "token": settings.client_token,
        "ssl_context": tls_context(cafile) if cafile is not None else None,
    }


def _given_addresses(words: list[str] | None) -> list[tuple[str, int]]:
    """The servers of ``--address`` (repeated, or comma-separated) or of arguments."""
    from pbkv.client import parse_address

    found: list[tuple[str, int]] = []
    for word in words or ():
        for item in word.split(","):
            if item.strip():
                address = parse_address(item)
                if address not in found:
                    found.append(address)
    return found


def _registered(args: argparse.Namespace, coordinator: str, cluster: str) -> list[tuple[str, int]]:
    """The members registered in etcd; raises ValueError when there are none."""
    import asyncio

    from pbkv.client import member_addresses
    from pbkv.coordinator import CoordinatorError

    try:
        found = asyncio.run(member_addresses(coordinator, cluster, args.timeout))
    except CoordinatorError as exc:
        raise ValueError(f"etcd at {coordinator}: {exc}") from None
    if not found:
        raise ValueError(f"no member of cluster {cluster!r} is registered at {coordinator}")
    return found


def _one_server(args: argparse.Namespace) -> bool:
    """Whether the flags name one server (``--host``, ``--port``, ``--backup``)."""
    return args.host is not None or args.port is not None or bool(args.backup)


def _client(args: argparse.Namespace, settings: Settings) -> Client:
    """A client of ``--address`` / ``--coordinator`` (finding the primary among them);
    else of the one server of ``--host``, ``--port`` and ``--backup``; else of the
    members registered at the settings' ``coordinator``, or the settings' primary."""
    from pbkv.client import Client

    options = _client_options(args, settings)
    addresses = _given_addresses(args.address)
    coordinator = args.coordinator
    if coordinator is None and not addresses and not _one_server(args):
        coordinator = settings.coordinator  # a member's settings: ask etcd
    if coordinator is not None:
        addresses += _registered(args, coordinator, args.cluster or settings.cluster)
    if addresses:
        return Client(timeout=args.timeout, addresses=addresses, failover=args.failover, **options)
    host, port = _address(args)
    return Client(host, port, timeout=args.timeout, failover=args.failover, **options)


def _flatten(status: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in status.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def status_lines(status: dict[str, Any]) -> list[str]:
    """``field: value`` lines with the values aligned; nested objects use dotted names."""
    items = list(_flatten(status))
    width = max((len(name) for name, _ in items), default=0) + 1
    return [
        f"{name + ':':<{width}} {value if isinstance(value, str) else json.dumps(value)}"
        for name, value in items
    ]


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


def _no(message: str) -> int:
    print(f"pbkv: {message}", file=sys.stderr)
    return EXIT_NO


def _run(client: Client, args: argparse.Namespace, secret: str | None = None) -> int:
    """Run one command and print its result; the exit status says whether it said "yes"."""
    command = args.command
    if command in ("get", "delete"):
        value = client.get(args.key) if command == "get" else client.delete(args.key)
        if args.json:
            _print_json({"success": "false" if value is None else "true", "value": value or ""})
        elif value is not None:
            print(value)
        if value is None:
            return EXIT_NO if args.json else _no(f"key not found: {escape(args.key)}")
        return EXIT_OK
    if command in ("insert", "update"):
        done = (client.insert if command == "insert" else client.update)(args.key, args.value)
        if args.json:
            _print_json({"success": "true" if done else "false"})
        if done:
            return EXIT_OK
        if args.json:
            return EXIT_NO
        problem = "key already exists" if command == "insert" else "key not found"
        return _no(f"{problem}: {escape(args.key)}")
    if command == "count":
        count = client.count()
        if args.json:
            _print_json({"result": str(count)})
        else:
            print(count)
    elif command == "dump":
        _dump(client.iter_dump(), args)
    elif command == "load":
        return _load(client, args)
    elif command == "status":
        status = client.status()
        if args.json:
            _print_json(status)
        else:
            print("\n".join(status_lines(status)))
    elif command == "shutdown":
        client.shutdown(secret=secret)
    return EXIT_OK


DUMP_BATCH = 10_000  # pairs formatted and written at a time


def _dump(pairs: Iterator[tuple[str, str]], args: argparse.Namespace) -> None:
    """Write the pairs as they arrive, a batch at a time: the dump is never held whole.
    A file is written under a temporary name, renamed once the dump ended whole: a
    dump cut short leaves no file that looks complete (on stdout, what came before
    the error is written)."""
    batches = iter(lambda: list(itertools.islice(pairs, DUMP_BATCH)), [])
    if args.json:  # one JSON array, as json.dumps writes it
        sys.stdout.write("[")
        separator = ""
        for batch in batches:
            items = (json.dumps(list(pair), ensure_ascii=False) for pair in batch)
            sys.stdout.write(separator + ", ".join(items))
            separator = ", "
        sys.stdout.write("]\n")
    elif args.tsv:
        for batch in batches:
            sys.stdout.write("".join(f"{escape(key)}\t{escape(value)}\n" for key, value in batch))
    else:
        _write_json_lines(batches, args.file)


def _write_json_lines(batches: Iterator[list[tuple[str, str]]], path: str | None) -> None:
    from pbkv.bulk import json_lines

    if path is None or path == "-":
        sys.stdout.flush()
        for batch in batches:
            sys.stdout.buffer.write(json_lines(batch))
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as out:
            for batch in batches:
                out.write(json_lines(batch))
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class _ProgressBar:
    """``[#####     ] 52%  68.1 MB  31.2 MB/s`` on a terminal, redrawn a few times a
    second; a total of 0 (stdin) shows no bar."""

    WIDTH = 30

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = self.drawn = _now()

    def __call__(self, sent: int) -> None:
        now = _now()
        if now - self.drawn < 0.1:
            return
        self.drawn = now
        rate = sent / max(now - self.started, 1e-9) / 1e6
        text = f"{sent / 1e6:8.1f} MB  {rate:6.1f} MB/s"
        if self.total:
            done = min(1.0, sent / self.total)
            filled = int(done * self.WIDTH)
            text = f"[{'#' * filled}{' ' * (self.WIDTH - filled)}] {done:4.0%} {text}"
        sys.stderr.write("\r" + text)
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _now() -> float:
    import time

    return time.monotonic()


def _load(client: Client, args: argparse.Namespace) -> int:
    """``pbkv load``: the file to the primary's bulk load, a summary at the end."""
    from pbkv.bulk import LineFormat, LoadMode
    from pbkv.bulkclient import LoadFailed, load_stream

    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    with source:
        size = os.fstat(source.fileno()).st_size if args.file != "-" else 0
        bar = _ProgressBar(size) if sys.stderr.isatty() else None
        try:
            summary = load_stream(
                client.address,
                source,
                LoadMode(args.mode),
                LineFormat.CSV if args.csv else LineFormat.JSON,
                token=client.token,
                ssl_context=client.ssl_context,
                timeout=args.timeout,
                progress=bar,
            )
        except LoadFailed as failed:
            if args.json:
                _print_json(
                    {
                        "success": "false",
                        "error": failed.reason,
                        "line": failed.line,
                        "lines": failed.lines,
                        "applied": failed.applied,
                        "skipped": failed.skipped,
                    }
                )
            print(
                f"pbkv: {failed.reason}; {failed.lines} lines applied before it "
                f"({failed.applied} pairs written, {failed.skipped} skipped), none after",
                file=sys.stderr,
            )
            return EXIT_ERROR
        finally:
            if bar is not None:
                bar.clear()
    if args.json:
        _print_json(
            {
                "success": "true",
                "lines": summary.lines,
                "applied": summary.applied,
                "skipped": summary.skipped,
                "seconds": round(summary.seconds, 3),
            }
        )
    else:
        print(
            f"loaded {summary.lines} lines in {summary.seconds:.2f} s: {summary.applied} pairs "
            f"written, {summary.skipped} skipped ({args.mode} mode)"
        )
    return EXIT_OK


def _describe(error: PbkvError) -> str:
    from pbkv.client import NotPrimary, ReplicationFailed, Unavailable

    if isinstance(error, NotPrimary):
        return f"{error.error} (not the primary; the primary is {error.primary})"
    if isinstance(error, Unavailable):
        hints = [f"stage {error.stage}"] if error.stage else []
        if error.retry_after is not None:
            hints.append(f"retry after {error.retry_after:g}s")
        return f"{error.error} ({', '.join(hints)})" if hints else error.error
    if isinstance(error, ReplicationFailed):
        return f"{error.error}: the write was not acknowledged and may or may not have applied"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pbkv`` command; returns the exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["serve"]:  # at once: a server needs none of the client's modules
        return serve_main(words[1:])
    if words[:1] == ["check-data"]:  # files on this machine: no server, no client
        from pbkv.persist.check import check_data_main

        return check_data_main(words[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # --help or a usage error: report it as a status
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command in ("serve", "check-data"):  # options before it: the command comes first
        parser.print_usage(sys.stderr)
        print(f"pbkv: error: put options after '{args.command}'", file=sys.stderr)
        return EXIT_ERROR

    from pbkv.client import OutcomeUnknown, PbkvError  # not imported to serve

    try:
        settings = _settings(args)
        if args.command == "cluster":
            return _cluster(args, settings)
        client = _client(args, settings)
    except ValueError as exc:
        print(f"pbkv: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with client:
            return _run(client, args, settings.secret)
    except PbkvError as exc:
        message = _describe(exc)
    except OutcomeUnknown as exc:
        message = str(exc)
    except ConnectionRefusedError:
        message = f"cannot connect to {_where(client)}: connection refused"
    except TimeoutError:
        message = f"no reply from {_where(client)} within {args.timeout:g}s"
    except OSError as exc:
        message = f"{_where(client)}: {exc.strerror or exc}"
    print(f"pbkv: {message}", file=sys.stderr)
    return EXIT_ERROR


def _where(client: Client) -> str:
    """The server a failure came from; with several, after how long."""
    from pbkv.client import format_address

    address = format_address(*client.address)
    if len(client.addresses) > 1 and client.failover > 0:
        return f"{address} (no primary found among {len(client.addresses)} servers)"
    return address


# -- pbkv cluster ------------------------------------------------------------------------------
def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    """``pbkv cluster``: list the servers given, or registered in etcd, or of the pair."""
    import asyncio

    from pbkv import roster

    given = _given_addresses([*args.servers, *(args.address or ())])
    coordinator = args.coordinator
    if not given and coordinator is None and not _one_server(args):
        coordinator = settings.coordinator
    cluster = args.cluster or settings.cluster
    members: list[tuple[str | None, tuple[str, int], dict[str, Any] | None]] = []
    title = None
    if given:
        members = [(None, address, None) for address in given]
    elif coordinator is not None:
        from pbkv.coordinator import CoordinatorError

        title = cluster
        try:
            listed = asyncio.run(roster.registered(coordinator, cluster, args.timeout))
        except CoordinatorError as exc:
            print(f"pbkv: etcd at {coordinator}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        members = [(name, address, info) for name, address, info in listed]
    else:  # the settings' pair (or --host and --port: one server)
        if args.host is not None or args.port is not None:
            servers = [_address(args)]
        else:
            servers = [settings.address_of(role) for role in ("primary", "backup")]
        members = [(None, address, None) for address in servers]
    if not members:
        print(f"pbkv: no member of cluster {cluster!r} is registered", file=sys.stderr)
        return EXIT_ERROR
    addresses = [address for _, address, _ in members]
    options = _client_options(args, settings)
    statuses = asyncio.run(roster.gather(addresses, args.timeout, **options))
    entries = [
        roster.Entry(address, info, status, name)
        for (name, address, info), status in zip(members, statuses, strict=True)
    ]
    rows = roster.rows(entries)
    if args.json:
        _print_json([row.as_json() for row in rows])
    else:
        print(roster.table(rows, title))
    return EXIT_OK if all(row.reachable for row in rows) else EXIT_NO


if __name__ == "__main__":
    sys.exit(main())
