"""Request parameters: the query string and a form or JSON body decoded into
names and values, the request target split, and the key and value checked
against the size limits.  Every refusal is a ``RequestError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
import orjson

from pbkv.commands import Command
from pbkv.http.replies import RequestError
from pbkv.idempotency import MAX_KEY_CHARS, valid_key

# Parameters a query string or a body may carry: a route reads at most three (key,
# value and maybe one more).  Counted before anything is split or decoded, so a body
# of a million empty parameters costs one pass over its bytes, not a million pieces.
MAX_PARAMS = 16

_NEEDS_VALUE = frozenset({Command.INSERT, Command.UPDATE})
_NEEDS_KEY = frozenset({Command.GET, Command.INSERT, Command.UPDATE, Command.DELETE})


@dataclass(frozen=True, slots=True)
class Limits:
    """How large a key and a value may be, and what a request may take to carry them."""

    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 1024 * 1024

    @property
    def max_body_bytes(self) -> int:
        # Percent-encoding can triple every byte; leave room for names and separators.
        return 3 * (self.max_key_bytes + self.max_value_bytes) + 1024

    @property
    def max_head_bytes(self) -> int:
        # The query string may carry what a body can, plus room for ordinary headers.
        return self.max_body_bytes + 64 * 1024


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _decode_component(raw: bytes) -> str:
    """One name or value of a form: ``+`` is a space, then percent-decoding, then UTF-8.
    (``find``, not ``in``: ``b"+" in raw`` first tries ``b"+"`` as an integer, and
    raises and clears an error inside, each time.)"""
    if raw.find(b"+") >= 0:
        raw = raw.replace(b"+", b" ")
    if raw.find(b"%") >= 0:
        if _BAD_ESCAPE.search(raw):
            raise RequestError(
                400, "malformed percent-escape (a % must be followed by two hex digits)"
            )
        raw = unquote_to_bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8() from None


def _not_utf8() -> RequestError:
    return RequestError(400, "parameters are not valid UTF-8 after percent-decoding")


def _given_twice(name: str) -> RequestError:
    return RequestError(400, f"parameter {name!r} given more than once")


def _too_many_params() -> RequestError:
    return RequestError(400, f"more than {MAX_PARAMS} parameters in a query string or body")


# A JSON body a route can use: one object of at most MAX_PARAMS string members.  Only
# a body with many commas is matched against it (a value may hold any number of
# them); the match stops after MAX_PARAMS members, so a body of a million members is
# refused at the speed of the regex engine instead of being decoded.  It is matched
# with its escaped backslashes and quotes taken out (two passes of bytes.replace), so
# a string is a plain run between quotes.  orjson still checks what passes.
_JSON_MEMBER = rb'\s*"[^"]*"\s*:\s*"[^"]*"\s*'
_FLAT_JSON_OBJECT = re.compile(
    rb"\s*\{(?:%b(?:,%b){0,%d}|\s*)\}\s*" % (_JSON_MEMBER, _JSON_MEMBER, MAX_PARAMS - 1)
)


def _flat_json_object(body: bytes) -> bool:
    """Whether ``body`` has the shape of one object of at most MAX_PARAMS string members."""
    if body.find(b"\\") >= 0:  # find, not in: see _decode_component
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _FLAT_JSON_OBJECT.fullmatch(body) is not None


def _decode_pairs(form: bytes, into: dict[str, str]) -> None:
    """``application/x-www-form-urlencoded`` pairs, as ``parse_qsl`` with blank values
    kept, but on bytes: a form without escapes is decoded once, whole; another piece
    by piece (each piece unescaped, then decoded)."""
    try:
        text: str | None = form.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # percent-escapes may complete the raw bytes: piece by piece below
    # Searched and counted in the text where it decoded (native when compiled, where
    # the bytes methods are Python calls); the same counts: "&" is one byte in UTF-8.
    if text is not None and "%" not in text and "+" not in text:
        # Nothing to unescape (the common case): split the text decoded once.
        if text.count("&") >= MAX_PARAMS:
            raise _too_many_params()
        for pair in text.split("&"):
            if not pair:
                continue
            name, _, value = pair.partition("=")
            if name in into:
                raise _given_twice(name)
            into[name] = value
        return
    if form.count(b"&") >= MAX_PARAMS:
        raise _too_many_params()
    if text is None and form.find(b"%") < 0 and form.find(b"+") < 0:  # find: see below
        raise _not_utf8()
    for piece in form.split(b"&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition(b"=")
        name = _decode_component(raw_name)
        if name in into:
            raise _given_twice(name)
        into[name] = _decode_component(raw_value)


FORM_TYPE = b"application/x-www-form-urlencoded"  # what most clients send: compared whole


def _is_json(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def parse_params(query: bytes | None, body: bytes, content_type: bytes) -> dict[str, str]:
    """Query string and form or JSON body, merged; a name may appear once."""
    params: dict[str, str] = {}
    if query:
        if not query.isascii():
            raise RequestError(400, "query string must be ASCII (percent-encode the rest)")
        _decode_pairs(query, params)
    if not body:
        return params
    if content_type != FORM_TYPE and _is_json(content_type):
        if body.count(b",") >= MAX_PARAMS and not _flat_json_object(body):
            raise RequestError(
                400, f"a JSON body must be one object of at most {MAX_PARAMS} string parameters"
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "a JSON body must be an object")
        if body.count(b":") > len(data):
            _refuse_duplicate_names(body)  # more colons than names: look closer
        for name, value in data.items():
            if not isinstance(value, str):
                raise RequestError(400, f"parameter {name!r} must be a string")
            if name in params:
                raise RequestError(400, f"parameter {name!r} given more than once")
            params[name] = value
        return params
    _decode_pairs(body, params)
    return params


def _refuse_duplicate_names(body: bytes) -> None:
    """orjson keeps the last of repeated names; a repeated parameter is an error here."""

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for name, value in pairs:
            if name in seen:
                raise RequestError(400, f"parameter {name!r} given more than once")
            seen[name] = value
        return seen

    try:
        json.loads(body, object_pairs_hook=check)
    except RecursionError:
        raise RequestError(400, "JSON body nested too deeply") from None


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """Path and query string of a request target.

    ``httptools.parse_url`` refuses targets over 64 KiB, but a query string may
    carry a whole value, so the usual origin form ``/path?query`` is split here.
    """
    if target.startswith(b"/"):
        path, has_query, query = target.partition(b"?")
        return path, query.partition(b"#")[0] if has_query else None
    try:
        # Any: httptools' stub says path and query are bytes, but either may be None
        # (and compiled code checks the declared type).
        url: Any = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise RequestError(400, "malformed request target") from None
    return url.path or b"/", url.query


def key_and_value(
    command: Command, params: dict[str, str], limits: Limits
) -> tuple[str, str | None]:
    key = params.get("key")
    if command in _NEEDS_KEY:
        if key is None:
            raise RequestError(400, "missing parameter 'key'")
        if not key:
            raise RequestError(400, "key must not be empty")
        # (an ASCII text has as many bytes as characters: no need to encode it to count)
        if len(key) > limits.max_key_bytes or (
            not key.isascii() and len(key.encode()) > limits.max_key_bytes
        ):
            raise RequestError(413, f"key longer than {limits.max_key_bytes} bytes")
    value = params.get("value")
    if command in _NEEDS_VALUE:
        if value is None:
            raise RequestError(400, "missing parameter 'value'")
        if len(value) > limits.max_value_bytes or (
            not value.isascii() and len(value.encode()) > limits.max_value_bytes
        ):
            raise RequestError(413, f"value longer than {limits.max_value_bytes} bytes")
    return key or "", value


def idempotency_key(raw: bytes) -> str:
    """An ``Idempotency-Key`` header's value: 1 to 255 printable ASCII characters
    without spaces, optionally in double quotes (the IETF draft's structured-field
    string: ``Idempotency-Key: "8e03978e-40d5"``); anything else is a 400."""
    if 0 < len(raw) <= MAX_KEY_CHARS and raw.replace(b"-", b"").isalnum():
        return raw.decode()  # the common case (a UUID, a token): valid as it is
    text = raw.strip()
    if len(text) >= 2 and text[:1] == b'"' and text[-1:] == b'"':
        text = text[1:-1]
    key = text.decode("latin-1")
    if not valid_key(key):
        raise RequestError(
            400,
            f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters "
            "without spaces, given once",
        )
    return key
