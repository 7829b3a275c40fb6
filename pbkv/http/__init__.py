"""The client API: HTTP/1.1 on ``httptools`` with a bare asyncio protocol.

Parsing belongs to httptools; this package reads requests, routes them,
decodes parameters, checks limits and who may ask, and turns outcomes into the
course's exact JSON replies.  Replies on one connection go out in request order
even when a write is answered later than a read behind it (pipelining), and a
read behind a write of its connection still unanswered waits for that write.

One module a job:

- ``reader``: bytes in, requests out (the parser's callbacks, the request
  phases, size limits, raw UTF-8 in a target); no I/O.
- ``protocol``: the connection (asyncio I/O, flow control, timeouts).
- ``pending``: the replies a connection owes, in request order, and the
  requests that wait for the writes before them.
- ``replies``: the bytes of a reply, outcomes as the course's JSON, the two
  error modes (``errors``: ``course`` or ``http``).
- ``params``: query strings and bodies decoded into a key and a value.
- ``access``: the client token, the shutdown secret or addresses, who may open
  the replication channel.

The route table itself (path, methods, command) is ``pbkv/routes.py``, shared
with the clients.
"""

from pbkv.http.access import (
    LOOPBACK,
    OPEN,
    Access,
    access_for,
    certificate_names,
    host_addresses,
    peer_ip,
)
from pbkv.http.params import Limits, key_and_value, parse_params, split_target
from pbkv.http.pending import PendingReply
from pbkv.http.protocol import App, HttpProtocol
from pbkv.http.reader import Phase, RequestHandler, RequestReader, percent_encode_high
from pbkv.http.replies import (
    RequestError,
    error_body,
    header_text,
    outcome_reply,
    raise_method,
    refusal_reply,
    response,
)

__all__ = [
    "LOOPBACK",
    "OPEN",
    "Access",
    "App",
    "HttpProtocol",
    "Limits",
    "PendingReply",
    "Phase",
    "RequestError",
    "RequestHandler",
    "RequestReader",
    "access_for",
    "certificate_names",
    "error_body",
    "header_text",
    "host_addresses",
    "key_and_value",
    "outcome_reply",
    "parse_params",
    "peer_ip",
    "percent_encode_high",
    "raise_method",
    "refusal_reply",
    "response",
    "split_target",
]
