"""One client connection: I/O, flow control and timeouts.

The request reader (``reader.py``) turns the bytes read into requests; this
class routes each to the server, holds its reply's place in request order
(``pending.py``), carries out a read behind an unanswered write of the same
connection only once that write is answered, writes replies as the client reads
them, stops reading while replies or unanswered writes pile up, hands the
connection over when it becomes the replication channel, and closes it when a
timeout passes (``sweep``).

The keys and values of a connection's writes count in ``guard.pending_bytes``
(``max_pending_bytes``) from the moment the request is complete until it is
answered: past the bound, a connection holding some of them is not read until
they are answered.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import orjson

from pbkv.commands import Command, Dumped, Outcome
from pbkv.http.access import (
    OPEN,
    Access,
    channel_refusal,
    check_client_token,
    check_shutdown,
    peer_ip,
)
from pbkv.http.load import BulkLoad
from pbkv.http.params import Limits, idempotency_key, key_and_value, parse_params, split_target
from pbkv.http.pending import HeldRequest, PendingReply, ready_bytes
from pbkv.http.reader import Phase, RequestReader
from pbkv.http.replies import (
    CONTINUE,
    COURSE_FAILURES,
    MAX_REDIRECT_TARGET,
    TRUE,
    RequestError,
    error_body,
    outcome_reply,
    raise_method,
    refusal_reply,
    response,
)
from pbkv.limits import CLOCK_STEP, DUMP_PAIRS, DumpStream, Guard
from pbkv.routes import (
    ADMIN_ROUTES,
    COMMAND_ROUTES,
    FOLLOW_PATH,
    LISTENING_PATH,
    LOAD_PATH,
    METRICS_PATH,
    STATUS_PATH,
)
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

log = logging.getLogger(__name__)

# Course clients wrote by GET with query parameters (their servers took any method):
# in course mode every course route takes both of these.
_COURSE_METHODS = (b"GET", b"POST")


class App(Protocol):
    """What the HTTP layer needs from a server (``node.Node`` implements it)."""

    @property
    def accepts_replication(self) -> bool: ...

    def read(self, command: Command, key: str) -> Outcome: ...

    def submit(
        self,
        command: Command,
        key: str,
        value: str | None,
        respond: Callable[[Outcome], None],
        idempotency: str | None = None,
    ) -> Outcome | None: ...

    def submit_pairs(
        self, pairs: list[str], upsert: bool, respond: Callable[[Outcome], None]
    ) -> Outcome | None: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> tuple[bytes, str]: ...

    def shutdown(self) -> None: ...

    def upgrade(self, transport: asyncio.Transport, leftover: bytes) -> None: ...

    def backup_listening(self) -> None: ...


class HttpProtocol(asyncio.Protocol):
    """One client connection (the ``RequestHandler`` of its reader)."""

    def __init__(
        self,
        app: App,
        limits: Limits,
        connections: set[HttpProtocol],
        errors: str = "course",
        access: Access = OPEN,
        guard: Guard | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.errors = errors
        self.access = access
        self.connections = connections
        self.guard = guard if guard is not None else Guard()
        self.transport: asyncio.Transport | None = None
        self.scheme = b"http"  # of a redirect to the primary: the scheme we speak
        self.reader = RequestReader(self, limits, self.guard)
        self._pending: collections.deque[PendingReply] = collections.deque()
        self._after_reply: Callable[[], None] | None = None
        self._queued = 0  # reply bytes ready but waiting behind an unanswered request
        self._stream: DumpStream | None = None  # the dump being sent
        self._write_paused = False
        self._stalled_since = 0.0  # when writing paused or the close began
        self._reading_paused = False
        self._counted = False  # in guard.clients
        self._writes_out = 0  # writes submitted whose outcome is not known yet
        # Requests that wait for those writes, in request order (see pending.py).
        self._held: collections.deque[HeldRequest] = collections.deque()
        self._unanswered_bytes = 0  # this connection's share of guard.pending_bytes
        self.load: BulkLoad | None = None  # the last bulk load read (see load.py)

    # -- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's connection: the transport is a full asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        guard = self.guard
        bounds = guard.limits
        transport.set_write_buffer_limits(high=bounds.max_reply_buffer)
        if guard.clients < bounds.max_clients:
            guard.clients += 1
            self._counted = True
            return
        # Over max_clients: the replication channel still gets through (a few
        # connections in reserve, each must ask for the upgrade at once).
        guard.refused_clients.hit(guard.clock)
        if len(guard.probation) >= bounds.reserved_clients:
            guard.probation.popleft().reader.refuse_client()
        self.reader.upgrade_only = True
        guard.probation.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        self.connections.discard(self)
        self.transport = None
        self.reader.close()
        self._pending.clear()
        self._drop_held()
        self._stream = None

    def pause_writing(self) -> None:
        # The transport holds max_reply_buffer unsent bytes: stop reading requests
        # (and producing a dump) until the client has read them.
        self._write_paused = True
        self._stalled_since = self.guard.clock
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume_reading()
        if self._stream is not None:
            self.guard.pump.want(self._pump_stream)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)

    # -- what the reader reports -------------------------------------------------------
    def request_ready(self) -> None:
        """Route the request the reader holds; its reply takes its place in the queue now."""
        reader = self.reader
        parser = reader.parser
        pending = self._pending
        url = reader.url
        # The target is kept for a redirect to the primary, unless too long to repeat.
        reply = PendingReply(
            not parser.should_keep_alive(), url if len(url) <= MAX_REDIRECT_TARGET else None
        )
        pending.append(reply)
        path = b""
        try:
            path, query = split_target(url)
            method = parser.get_method()
            if self.access.client_token is not None:
                check_client_token(self.access, path, reader.authorization)
            route = COMMAND_ROUTES.get(path)
            if route is None:
                self._admin(reply, path, method)
            else:
                allowed, command, is_read = route  # is_read: Command.is_read, looked up once
                if method != allowed and not (
                    self.errors == "course" and method in _COURSE_METHODS
                ):
                    raise_method(allowed)
                body = reader.body
                params = parse_params(query, b"".join(body) if body else b"", reader.content_type)
                key, value = key_and_value(command, params, self.limits)
                if not is_read:
                    ident = reader.idempotency_key
                    if ident is None:
                        self._write(reply, command, key, value)
                    else:
                        self._write(reply, command, key, value, idempotency_key(ident))
                elif self._writes_out:  # behind a write not yet answered: after it
                    self._hold(False, len(key), lambda: self._read(reply, command, key))
                else:
                    self._answer(reply, command, self.app.read(command, key))
        except RequestError as exc:
            self._refuse(reply, path, exc.status, exc.message)
        except Exception:  # a bug must not stall this connection's later replies
            log.exception("internal error while handling a request")
            reply.close = True
            self._refuse(reply, path, 500, "internal server error")
        if len(pending) > self.guard.limits.max_pipeline or (
            self._unanswered_bytes and self._over_pending_bytes()
        ):
            self._pause_reading()  # read on once replies have caught up

    def refuse_and_close(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer an unrecoverable request error and close the connection."""
        if self.reader.closing:
            return
        if self.reader.stream is not None and self.load is not None:
            self.load.abort(status, message)  # its reply comes first, then this one
        reply = PendingReply(close=True)
        self._pending.append(reply)
        self._reply(reply, status, error_body(message), extra)

    def send_continue(self) -> None:
        # Replies go in request order: an interim reply only when none is due before it.
        if not self._pending and self.transport is not None:
            self.transport.write(CONTINUE)

    def write_and_close(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()

    def wait_for_room(self) -> bool:
        # A connection with writes of its own still unanswered (a pipelining client)
        # waits for them: backpressure, not a refusal.
        if not self._unanswered_bytes:
            return False
        self._pause_reading()
        return True

    def upgrade_requested(self, leftover: bytes) -> None:
        reader = self.reader
        path = reader.url.partition(b"?")[0]
        follow = path == FOLLOW_PATH  # a spare follows a member's backup (``following.py``)
        if not reader.upgrade or (path != UPGRADE_PATH and not follow) or self._pending:
            self.refuse_and_close(400, "unsupported upgrade")
            return
        if follow and not getattr(self.app, "accepts_followers", False):
            self.refuse_and_close(400, "only a member's backup may be followed")
            return
        if not follow and not self.app.accepts_replication:
            self.refuse_and_close(400, "only the backup accepts a replication channel")
            return
        transport = self.transport
        assert transport is not None
        refusal = channel_refusal(self.access, transport)
        if refusal is not None:
            log.warning(
                "refused a replication channel from %s: %s", peer_ip(transport) or "?", refusal
            )
            self.refuse_and_close(403, refusal)
            return
        self._leave()
        self.connections.discard(self)
        reader.closing = True
        self.transport = None
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: "
            + UPGRADE_TOKEN
            + b"\r\nConnection: Upgrade\r\n\r\n"
        )
        if follow:
            self.app.follow_upgrade(transport, leftover)  # type: ignore[attr-defined]
        else:
            self.app.upgrade(transport, leftover)

    # -- a bulk load (load.py) ------------------------------------------------------------
    def stream_began(self) -> BulkLoad | None:
        reader = self.reader
        try:
            path, query = split_target(reader.url)
        except RequestError:
            return None  # routed as a whole request, which refuses it
        if path != LOAD_PATH:
            return None
        reply = PendingReply(not reader.parser.should_keep_alive())
        self._pending.append(reply)
        self._writes_out += 1  # the reads behind it wait for its answer
        self.load = BulkLoad(self, reply, reader.parser.get_method(), query)
        return self.load

    def load_answered(self, load: BulkLoad, status: int, body: bytes, extra: bytes) -> None:
        self._writes_out -= 1
        self._reply(load.reply, status, body, extra)
        if self._held and not self._writes_out:
            self._run_held()

    def hold_reading(self) -> None:
        self._pause_reading()

    def release_reading(self) -> None:
        self._maybe_resume_reading()

    # -- timeouts ----------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """The node's periodic check (once a second): timeouts of this connection."""
        transport = self.transport
        if transport is None:
            return
        reader = self.reader
        bounds = self.guard.limits
        if reader.upgrade_only and not reader.closing and now - reader.since > CLOCK_STEP:
            reader.refuse_client()  # the replication channel asks for its upgrade at once
            return
        if reader.closing or self._write_paused:
            # Replies the client does not read: give up on them after send_timeout.
            if now - self._stalled_since > bounds.send_timeout:
                self.guard.timeouts += 1
                transport.abort()
            return
        # Stamps come from a clock the sweep advances: subtract its step so that no
        # timeout fires early (it fires up to two steps late).
        elapsed = now - reader.since - CLOCK_STEP
        phase = reader.phase
        if (phase is Phase.REQUEST_LINE or phase is Phase.HEADERS) and (
            elapsed > bounds.header_timeout
        ):
            self.guard.timeouts += 1
            self.refuse_and_close(
                408, f"request head not received within {bounds.header_timeout:g} s"
            )
        elif phase is Phase.BODY and elapsed > bounds.body_timeout:
            self.guard.timeouts += 1
            reader.refused = True
            self.refuse_and_close(
                408, f"request body not received within {bounds.body_timeout:g} s"
            )
        elif phase is Phase.IDLE and not self._pending and elapsed > bounds.idle_timeout:
            transport.close()

    # -- routes the server answers itself -------------------------------------------------
    def _admin(self, reply: PendingReply, path: bytes, method: bytes) -> None:
        allowed = ADMIN_ROUTES.get(path)
        if allowed is None:
            if path == UPGRADE_PATH:
                raise RequestError(400, "the replication channel needs an Upgrade header")
            raise RequestError(404, f"unknown path {path.decode('utf-8', 'replace')}")
        if method not in allowed and not (
            self.errors == "course" and method in _COURSE_METHODS and path in COURSE_FAILURES
        ):
            raise_method(b", ".join(allowed))
        if path in (STATUS_PATH, METRICS_PATH):
            if self._writes_out:  # they read the store too: after the writes before them
                self._hold(False, 0, lambda: self._server_state(reply, path))
            else:
                self._server_state(reply, path)
        elif path == LISTENING_PATH:
            self.app.backup_listening()
            self._reply(reply, 200, TRUE)
        else:
            reader = self.reader
            check_shutdown(self.access, self.transport, reader.authorization, reader.from_web_page)
            reply.close = True
            self._after_reply = self.app.shutdown
            self._reply(reply, 200, TRUE)

    def _server_state(self, reply: PendingReply, path: bytes) -> None:
        if path == STATUS_PATH:
            self._reply(reply, 200, orjson.dumps(self.app.status()))
        else:
            body, content_type = self.app.metrics()
            self._reply(reply, 200, body, content_type=content_type.encode())

    # -- carrying requests out in order ------------------------------------------------
    def _read(self, reply: PendingReply, command: Command, key: str) -> None:
        self._answer(reply, command, self.app.read(command, key))

    def _write(
        self,
        reply: PendingReply,
        command: Command,
        key: str,
        value: str | None,
        ident: str | None = None,
    ) -> None:
        # Its key and value count until it is answered: queued and in flight, they
        # are memory the client's connection holds.
        size = len(key) if value is None else len(key) + len(value)
        self._unanswered_bytes += size
        self.guard.pending_bytes += size
        if self._held:  # behind a held read: it must not be seen by that read
            self._hold(True, size, lambda: self._submit(reply, command, key, value, size, ident))
        else:
            self._submit(reply, command, key, value, size, ident)

    def _submit(
        self,
        reply: PendingReply,
        command: Command,
        key: str,
        value: str | None,
        size: int,
        ident: str | None = None,
    ) -> None:
        self._writes_out += 1

        def answered(outcome: Outcome) -> None:
            self._write_answered(reply, command, size, outcome)

        if ident is None:
            outcome = self.app.submit(command, key, value, answered)
        else:  # with an Idempotency-Key
            outcome = self.app.submit(command, key, value, answered, ident)
        if outcome is not None:
            self._write_answered(reply, command, size, outcome)

    def _write_answered(
        self, reply: PendingReply, command: Command, size: int, outcome: Outcome
    ) -> None:
        self._writes_out -= 1
        self._unanswered_bytes -= size
        self.guard.pending_bytes -= size  # kept by the store, or dropped: not freed here
        self._answer(reply, command, outcome)
        if self._held and not self._writes_out:
            self._run_held()

    def _hold(self, is_write: bool, size: int, run: Callable[[], None]) -> None:
        if not is_write and size:
            self._unanswered_bytes += size
            self.guard.pending_bytes += size
        self._held.append(HeldRequest(is_write, size, run))

    def _run_held(self) -> None:
        """Carry out the held requests whose turn has come: writes at once, a read once
        no write before it is unanswered."""
        held = self._held
        while held and not self.reader.closing:
            request = held[0]
            if not request.is_write:
                if self._writes_out:
                    return
                self._unanswered_bytes -= request.size
                self.guard.pending_bytes -= request.size
            held.popleft()
            request.run()  # a write's bytes now count until it is answered
        self._drop_held()  # closing: nothing more is carried out

    def _drop_held(self) -> None:
        for request in self._held:
            self._unanswered_bytes -= request.size
            self.guard.pending_bytes -= request.size
        self._held.clear()

    def _over_pending_bytes(self) -> bool:
        guard = self.guard
        return guard.pending_bytes > guard.limits.max_pending_bytes

    # -- replies -----------------------------------------------------------------------
    def _answer(self, reply: PendingReply, command: Command, outcome: Outcome) -> None:
        if isinstance(outcome, Dumped) and not isinstance(outcome.source, list):
            if len(outcome.source) > DUMP_PAIRS:
                self._stream_dump(reply, outcome.source)
                return
            outcome = Dumped(list(outcome.source.items()))  # small: one reply as before
        status, body, extra = outcome_reply(
            command, outcome, self.errors, reply.target, self.scheme
        )
        self._reply(reply, status, body, extra)

    def _refuse(self, reply: PendingReply, path: bytes, status: int, message: str) -> None:
        status, body, extra = refusal_reply(self.errors, path, status, message)
        self._reply(reply, status, body, extra)

    def _stream_dump(self, reply: PendingReply, store: Any) -> None:
        """A dump goes out in chunks as the client reads it (chunked encoding;
        to an HTTP/1.0 client, delimited by the end of the connection)."""
        parser = self.reader.parser
        # None once the connection closed (see RequestReader.close).
        if parser is not None and parser.get_http_version() == "1.0":  # type: ignore[redundant-expr]
            reply.close = True
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            reply.stream = DumpStream(store, chunked=False)
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += b"Transfer-Encoding: chunked\r\n"
            head += b"Connection: close\r\n\r\n" if reply.close else b"\r\n"
            reply.stream = DumpStream(store, chunked=True)
        reply.data = head
        self._flush()

    def _reply(
        self,
        reply: PendingReply,
        status: int,
        body: bytes,
        extra: bytes = b"",
        content_type: bytes | None = None,
    ) -> None:
        data = response(status, body, extra, close=reply.close)
        if content_type is not None:
            data = data.replace(b"application/json", content_type, 1)
        reply.data = data
        self._flush()

    def _flush(self) -> None:
        """Send the replies that are ready, in request order."""
        pending = self._pending
        transport = self.transport
        if self._stream is not None:
            return  # a dump is on the wire; the replies behind it wait
        while pending:
            reply = pending[0]
            data = reply.data
            if data is None:
                break
            if transport is None:
                pending.popleft()
                continue
            transport.write(data)
            stream = reply.stream
            if stream is not None:
                reply.data = b""
                self._stream = stream
                self.guard.pump.want(self._pump_stream)  # within the pump's budget
                return
            pending.popleft()
            if reply.close:
                self._close_after_write()
                return
        if pending:
            # Replies ready behind one still being worked on count against the bound too.
            self._queued = ready_bytes(pending)
            if self._queued > self.guard.limits.max_reply_buffer:
                self._pause_reading()
                return
        else:
            self._queued = 0
        if self._reading_paused:
            self._maybe_resume_reading()

    def _pump_stream(self) -> None:
        """Send the next chunk of the dump, or finish it; the pump calls it once per turn."""
        stream = self._stream
        transport = self.transport
        if stream is None or transport is None:
            return
        if self._write_paused:
            return  # resume_writing queues this again
        chunk = stream.next_chunk()
        if chunk:
            transport.write(chunk)
        if not stream.done:
            self.guard.pump.want(self._pump_stream)
            return
        self._stream = None
        if self._pending.popleft().close:
            self._close_after_write()
            return
        self._flush()

    def _close_after_write(self) -> None:
        self.reader.closing = True
        self._stalled_since = self.guard.clock
        self._pending.clear()
        if self.transport is not None:
            self.transport.close()
        if self._after_reply is not None:
            after, self._after_reply = self._after_reply, None
            after()

    # -- flow control and the guard's counts ------------------------------------------------
    def _leave(self) -> None:
        """Give back what this connection counted in the guard (once)."""
        reader = self.reader
        reader.release()
        guard = self.guard
        if self._counted:
            self._counted = False
            guard.clients -= 1
        elif reader.upgrade_only:
            reader.upgrade_only = False
            try:
                guard.probation.remove(self)
            except ValueError:
                pass

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.reader.paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._write_paused
            and self.transport is not None
            and len(self._pending) <= self.guard.limits.max_pipeline
            and self._queued <= self.guard.limits.max_reply_buffer
            and not (self._unanswered_bytes and self._over_pending_bytes())
            and (self.load is None or not self.load.waiting)
        ):
            self._reading_paused = False
            self.reader.paused = False
            self.transport.resume_reading()
