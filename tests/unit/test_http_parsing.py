"""The pure parts of the client API: parameters, limits and the course's JSON replies."""

from __future__ import annotations

import json
import time
from urllib.parse import quote, urlencode

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.commands import Command, Counted, Done, Dumped, MemoryFull, Refused, ReplicationFailed
from pbkv.http import (
    Limits,
    RequestError,
    error_body,
    key_and_value,
    outcome_reply,
    parse_params,
    percent_encode_high,
    refusal_reply,
    response,
)
from pbkv.http.params import MAX_PARAMS
from pbkv.stages import Stage

FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"

NASTY = [
    "",
    "a&b=c",
    "1+1=2",
    "100%",
    "%2B",
    "%",
    "  spaced out  ",
    "line\r\nbreak",
    "nul\0byte",
    "quote\"s and 'single'",
    "back\\slash",
    "emoji 😀🎉",
    "ключ",
    "\u2028\u2029",
    "?#;/",
]


def encoded(params: dict[str, str]) -> bytes:
    """Percent-encode everything, as a careful client does."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items()).encode()


def status_of(call, *args) -> int:
    with pytest.raises(RequestError) as info:
        call(*args)
    return info.value.status


# -- parse_params: round trips -------------------------------------------------------------
@pytest.mark.parametrize("value", NASTY)
def test_nasty_values_round_trip_every_way(value: str) -> None:
    params = {"key": value + "k", "value": value}
    assert parse_params(encoded(params), b"", b"") == params
    assert parse_params(None, encoded(params), FORM) == params
    assert parse_params(None, urlencode(params).encode(), FORM) == params  # '+' for spaces
    assert parse_params(None, json.dumps(params).encode(), JSON) == params
    assert parse_params(None, json.dumps(params, ensure_ascii=False).encode(), JSON) == params


@settings(max_examples=150, deadline=None)
@given(key=st.text(min_size=1), value=st.text())
def test_any_text_round_trips(key: str, value: str) -> None:
    params = {"key": key, "value": value}
    assert parse_params(encoded(params), b"", b"") == params
    assert parse_params(None, encoded(params), FORM) == params
    assert parse_params(None, encoded(params), b"") == params  # no content type: a form
    assert parse_params(None, urlencode(params).encode(), FORM) == params
    assert parse_params(None, json.dumps(params).encode(), JSON) == params


def test_empty_value_round_trips() -> None:
    assert parse_params(b"key=k&value=", b"", b"") == {"key": "k", "value": ""}
    assert parse_params(None, b"key=k&value", FORM) == {"key": "k", "value": ""}
    assert parse_params(encoded({"key": "k", "value": ""}), b"", b"") == {
        "key": "k",
        "value": "",
    }


def test_plus_is_space_unless_encoded() -> None:
    assert parse_params(None, b"key=a+b", FORM) == {"key": "a b"}
    assert parse_params(None, b"key=a%2Bb", FORM) == {"key": "a+b"}
    assert parse_params(b"key=a+b%2B", b"", b"") == {"key": "a b+"}
    assert parse_params(None, b"key=a%20b", FORM) == {"key": "a b"}


def test_special_characters_when_encoded() -> None:
    body = b"key=a%26b%3Dc&value=%25%0D%0A%00%22%27%F0%9F%98%80"
    assert parse_params(None, body, FORM) == {"key": "a&b=c", "value": "%\r\n\0\"'😀"}


@pytest.mark.parametrize("form", [b"key=100%", b"key=a&value=%zz", b"key=%4", b"k%g1=v"])
def test_a_malformed_percent_escape_is_refused(form: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        parse_params(None, form, FORM)
    assert caught.value.status == 400 and "percent-escape" in caught.value.message


def test_a_repeated_name_in_a_json_body_is_refused() -> None:
    with pytest.raises(RequestError) as caught:
        parse_params(None, b'{"key":"a","value":"b","key":"c"}', JSON)
    assert caught.value.status == 400 and "'key' given more than once" in caught.value.message
    # Colons inside strings only make the check look closer; the body is still fine.
    assert parse_params(None, b'{"key":"a:b","value":"c:d"}', JSON) == {
        "key": "a:b",
        "value": "c:d",
    }


def test_raw_utf8_in_a_form_body() -> None:
    assert parse_params(None, "key=ключ&value=😀".encode(), FORM) == {
        "key": "ключ",
        "value": "😀",
    }


def test_raw_bytes_that_an_escape_completes_are_text() -> None:
    """The form is decoded whole only when nothing is escaped: raw bytes that are not
    UTF-8 alone may be completed by a percent-escape (as parse_qsl reads them)."""
    assert parse_params(None, b"key=k&value=\xc3%A9", FORM) == {"key": "k", "value": "é"}
    with pytest.raises(RequestError, match="not valid UTF-8"):
        parse_params(None, b"key=k&value=\xc3", FORM)


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "escaped"])
@pytest.mark.parametrize("utf8", [False, True], ids=["raw-bytes", "utf8"])
def test_too_many_parameters_are_refused_before_anything_else(escaped: bool, utf8: bool) -> None:
    """Counted first whichever way the form is read: as text, or piece by piece."""
    value = (b"%41" if escaped else b"a") + (b"" if utf8 else b"\xff")
    pieces = [b"k%d=%b" % (i, value) for i in range(MAX_PARAMS)] + [b"k0=again"]
    with pytest.raises(RequestError, match=f"more than {MAX_PARAMS}"):
        parse_params(None, b"&".join(pieces), FORM)


def test_query_and_body_merge() -> None:
    assert parse_params(b"key=k", b"value=v", FORM) == {"key": "k", "value": "v"}
    assert parse_params(b"key=k", b'{"value": "v"}', JSON) == {"key": "k", "value": "v"}
    assert parse_params(None, b"", FORM) == {}
    assert parse_params(b"", b"", b"") == {}


def test_json_content_type_variants() -> None:
    body = b'{"key": "k", "value": "v"}'
    expected = {"key": "k", "value": "v"}
    assert parse_params(None, body, b"application/json; charset=utf-8") == expected
    assert parse_params(None, body, b"Application/JSON") == expected


# -- parse_params: errors ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "body", "content_type"),
    [
        (b"key=%FF", b"", b""),
        (b"key=%C3", b"", b""),
        (b"key=%ED%A0%80", b"", b""),  # an encoded surrogate
        (None, b"key=%FF", FORM),
        (None, b"key=\xff", FORM),  # raw invalid UTF-8
        (None, b"key=k&value=%80abc", FORM),
    ],
)
def test_invalid_utf8_is_400(query: bytes | None, body: bytes, content_type: bytes) -> None:
    with pytest.raises(RequestError, match="UTF-8") as info:
        parse_params(query, body, content_type)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("query", "body", "content_type"),
    [
        (b"key=a&key=b", b"", b""),
        (b"key=a&key=a", b"", b""),
        (None, b"value=1&value=2", FORM),
        (b"key=a", b"key=b", FORM),
        (b"key=a", b'{"key": "b"}', JSON),
    ],
)
def test_duplicated_parameter_is_400(query: bytes | None, body: bytes, content_type: bytes) -> None:
    with pytest.raises(RequestError, match="more than once") as info:
        parse_params(query, body, content_type)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'["key", "k"]',
        b'"key"',
        b"42",
        b"null",
        b'{"key": 1}',
        b'{"key": null}',
        b'{"key": "k", "value": ["v"]}',
        b'{"key": "k", "value": {"a": "b"}}',
        b'{"key": true}',
        b'{"key": "k"',
        b"key=k",
        b'{"key": "\\ud800"}',  # a lone surrogate
        b'{"key": "\xff"}',
    ],
)
def test_bad_json_body_is_400(body: bytes) -> None:
    assert status_of(parse_params, None, body, JSON) == 400


# -- parse_params: how many parameters ------------------------------------------------------
def many(count: int, as_json: bool = False) -> bytes:
    if as_json:
        return b"{" + b",".join(b'"n%d":""' % i for i in range(count)) + b"}"
    return b"&".join(b"n%d=" % i for i in range(count))


@pytest.mark.parametrize("content_type", [FORM, JSON])
def test_up_to_max_params_parameters_pass_and_more_are_refused(content_type: bytes) -> None:
    as_json = content_type == JSON
    assert len(parse_params(None, many(MAX_PARAMS, as_json), content_type)) == MAX_PARAMS
    with pytest.raises(RequestError, match=f"at most {MAX_PARAMS}|more than {MAX_PARAMS}") as info:
        parse_params(None, many(MAX_PARAMS + 1, as_json), content_type)
    assert info.value.status == 400


def test_max_params_holds_in_the_query_string_too() -> None:
    assert len(parse_params(many(MAX_PARAMS), b"", b"")) == MAX_PARAMS
    assert status_of(parse_params, many(MAX_PARAMS + 1), b"", b"") == 400
    assert status_of(parse_params, b"&" * MAX_PARAMS, b"", b"") == 400  # empty pieces too


@pytest.mark.parametrize("content_type", [FORM, JSON], ids=["form", "json"])
def test_a_body_of_half_a_million_parameters_is_refused_in_milliseconds(
    content_type: bytes,
) -> None:
    body = many(400_000, content_type == JSON)
    assert len(body) > 3_000_000
    started = time.perf_counter()
    assert status_of(parse_params, None, body, content_type) == 400
    # Decoding them took 0.1 s (JSON) to 0.7 s (form); one pass over the bytes is ~1 ms.
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    "value",
    [
        ",:" * 100_000,
        '","' * 1000,
        '\\",' * 1000,
        "\\" * 100 + ",",
        '\\"' * 50 + "," * 50,
        "中," * 1000,
        "\u0000,\n," * 100,
    ],
)
def test_json_values_with_many_commas_still_pass(value: str) -> None:
    for body in (
        orjson.dumps({"key": "k", "value": value}),
        json.dumps({"key": value, "value": value}, indent=2).encode(),
        json.dumps({"key": "k", "value": value}, ensure_ascii=True).encode(),
    ):
        assert parse_params(None, body, JSON) == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"key": "k", "value": [' + b"1," * 100 + b"1]}",
        b'{"key": "k", "value": "v"' + b', "a": 1' * 20 + b"}",
        b"[" + b'"a",' * 20 + b'"a"]',
        b'{"key": "k,,,,,,,,,,,,,,,,,,,,,,,,", "value": "\\"}x',
    ],
)
def test_a_json_body_with_many_commas_outside_strings_is_refused(body: bytes) -> None:
    assert status_of(parse_params, None, body, JSON) == 400


# -- key_and_value -------------------------------------------------------------------------
LIMITS = Limits()


@pytest.mark.parametrize("command", [Command.GET, Command.INSERT, Command.UPDATE, Command.DELETE])
def test_key_required(command: Command) -> None:
    with pytest.raises(RequestError, match="missing parameter 'key'") as info:
        key_and_value(command, {"value": "v"}, LIMITS)
    assert info.value.status == 400
    with pytest.raises(RequestError, match="empty") as info:
        key_and_value(command, {"key": "", "value": "v"}, LIMITS)
    assert info.value.status == 400


@pytest.mark.parametrize("command", [Command.INSERT, Command.UPDATE])
def test_value_required_for_writes(command: Command) -> None:
    with pytest.raises(RequestError, match="missing parameter 'value'") as info:
        key_and_value(command, {"key": "k"}, LIMITS)
    assert info.value.status == 400
    assert key_and_value(command, {"key": "k", "value": ""}, LIMITS) == ("k", "")


def test_commands_without_value_or_key() -> None:
    assert key_and_value(Command.GET, {"key": "k"}, LIMITS) == ("k", None)
    assert key_and_value(Command.DELETE, {"key": "k"}, LIMITS) == ("k", None)
    assert key_and_value(Command.COUNT, {}, LIMITS) == ("", None)
    assert key_and_value(Command.DUMP, {}, LIMITS) == ("", None)
    # Unknown extra parameters are ignored.
    assert key_and_value(Command.GET, {"key": "k", "x": "y"}, LIMITS) == ("k", None)


def test_key_limit_counts_bytes() -> None:
    assert LIMITS.max_key_bytes == 64 * 1024  # course clients used keys of 8 KiB and more
    limit = LIMITS.max_key_bytes
    assert key_and_value(Command.GET, {"key": "k" * limit}, LIMITS)[0] == "k" * limit
    assert status_of(key_and_value, Command.GET, {"key": "k" * (limit + 1)}, LIMITS) == 413
    emoji = "😀" * (limit // 4)  # exactly the limit in bytes
    assert key_and_value(Command.GET, {"key": emoji}, LIMITS)[0] == emoji
    with pytest.raises(RequestError, match=f"{limit} bytes") as info:
        key_and_value(Command.INSERT, {"key": emoji + "😀", "value": "v"}, LIMITS)
    assert info.value.status == 413
    key = "k" * 8282  # the longest key of a course stress test
    assert key_and_value(Command.INSERT, {"key": key, "value": "v"}, LIMITS) == (key, "v")


def test_value_limit_counts_bytes() -> None:
    limits = Limits(max_key_bytes=8, max_value_bytes=10)
    assert key_and_value(Command.INSERT, {"key": "k", "value": "v" * 10}, limits)[1] == "v" * 10
    assert status_of(key_and_value, Command.INSERT, {"key": "k", "value": "v" * 11}, limits) == 413
    assert status_of(key_and_value, Command.UPDATE, {"key": "k", "value": "é" * 6}, limits) == 413
    assert key_and_value(Command.UPDATE, {"key": "k", "value": "é" * 5}, limits)[1] == "é" * 5
    assert status_of(key_and_value, Command.GET, {"key": "k" * 9}, limits) == 413
    assert LIMITS.max_value_bytes == 1024 * 1024
    assert LIMITS.max_body_bytes > 3 * (LIMITS.max_key_bytes + LIMITS.max_value_bytes)


# -- outcome_reply -------------------------------------------------------------------------
def reply(command: Command, outcome, errors: str = "course") -> tuple[int, object, bytes]:
    status, body, extra = outcome_reply(command, outcome, errors)
    return status, json.loads(body), extra


@pytest.mark.parametrize("command", [Command.INSERT, Command.UPDATE])
def test_insert_update_replies(command: Command) -> None:
    assert outcome_reply(command, Done(True)) == (200, b'{"success":"true"}', b"")
    assert outcome_reply(command, Done(False)) == (200, b'{"success":"false"}', b"")


@pytest.mark.parametrize("command", [Command.GET, Command.DELETE])
def test_get_delete_replies(command: Command) -> None:
    assert reply(command, Done(True, "v")) == (200, {"success": "true", "value": "v"}, b"")
    assert reply(command, Done(True, "")) == (200, {"success": "true", "value": ""}, b"")
    assert outcome_reply(command, Done(False)) == (
        200,
        b'{"success":"false","value":""}',
        b"",
    )


def test_count_reply() -> None:
    assert outcome_reply(Command.COUNT, Counted(3)) == (200, b'{"result":"3"}', b"")
    assert reply(Command.COUNT, Counted(0)) == (200, {"result": "0"}, b"")
    assert reply(Command.COUNT, Counted(10**7)) == (200, {"result": "10000000"}, b"")


def test_dump_reply() -> None:
    pairs = [("k1", "v1"), ("k2", "v2")]
    assert reply(Command.DUMP, Dumped(pairs)) == (200, [["k1", "v1"], ["k2", "v2"]], b"")
    assert reply(Command.DUMP, Dumped([])) == (200, [], b"")


def test_replication_failed_reply() -> None:
    status, body, extra = outcome_reply(Command.INSERT, ReplicationFailed(), "http")
    assert status == 503
    assert json.loads(body) == {"success": "false", "error": "replication failed"}
    assert body == b'{"success":"false","error":"replication failed"}'
    assert b"Retry-After:" in extra


@pytest.mark.parametrize("command", [Command.INSERT, Command.UPDATE])
@pytest.mark.parametrize("errors", ["http", "course"])
def test_memory_full_is_the_reply_of_a_refusal_with_507(command: Command, errors: str) -> None:
    """The outcome answers as the RequestError the server raised for it did, byte for byte."""
    message = "max_memory reached (1000 bytes): write refused"
    path = b"/kv/insert" if command is Command.INSERT else b"/kv/update"
    expected = refusal_reply(errors, path, 507, message)
    assert outcome_reply(command, MemoryFull(1000), errors) == expected
    status, body, extra = expected
    if errors == "http":
        assert (status, json.loads(body), extra) == (
            507,
            {"success": "false", "error": message},
            b"",
        )
    else:
        assert (status, body) == (200, b'{"success":"false"}')
        assert headers_of(extra) == {"X-Pbkv-Error": message, "X-Pbkv-Status": "507"}


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("command", [Command.GET, Command.INSERT, Command.COUNT])
def test_stage_refusal_reply(stage: Stage, command: Command) -> None:
    status, body, extra = reply(command, Refused(stage, "primary"), "http")
    assert status == 503
    assert body == {
        "success": "false",
        "error": f"not accepting this request in stage {stage.value}",
        "stage": stage.value,
    }
    assert extra.startswith(b"Retry-After: ")
    assert extra.endswith(b"\r\n")


def test_backup_write_refusal_names_the_primary() -> None:
    refused = Refused(Stage.IN_SYNC, "backup", primary="127.0.0.1:8080")
    status, body, extra = reply(Command.INSERT, refused, "http")
    assert status == 503
    assert set(body) == {"success", "error", "stage", "primary"}
    assert body["success"] == "false"
    assert "127.0.0.1:8080" in body["error"]
    assert body["primary"] == "127.0.0.1:8080"
    assert body["stage"] == "in_sync"
    assert b"Retry-After:" in extra


@pytest.mark.parametrize(
    ("target", "location"),
    [
        (b"/kv/insert", b"http://127.0.0.1:8080/kv/insert"),
        (b"/kv/get?key=a%20b&x=%E9%9F%A9", b"http://127.0.0.1:8080/kv/get?key=a%20b&x=%E9%9F%A9"),
        (b"http://127.0.0.2:8080/kv/insert?key=k", b"http://127.0.0.1:8080/kv/insert?key=k"),
        (b"http://127.0.0.2:8080/kv/insert", b"http://127.0.0.1:8080/kv/insert"),
    ],
)
def test_a_refusal_naming_the_primary_is_a_307_in_http_mode(target: bytes, location: bytes):
    refused = Refused(Stage.IN_SYNC, "backup", primary="127.0.0.1:8080")
    status, body, extra = outcome_reply(Command.INSERT, refused, "http", target)
    assert status == 307
    assert extra == b"Location: " + location + b"\r\n"  # no Retry-After: it would delay
    # The body is the 503's, byte for byte.
    assert body == outcome_reply(Command.INSERT, refused, "http")[1]
    assert set(json.loads(body)) == {"success", "error", "stage", "primary"}


def test_a_redirect_brackets_an_ipv6_primary_and_keeps_https():
    refused = Refused(Stage.IN_SYNC, "spare", primary="::1:8080")
    status, _, extra = outcome_reply(Command.GET, refused, "http", b"/kv/get?key=k", b"https")
    assert (status, extra) == (307, b"Location: https://[::1]:8080/kv/get?key=k\r\n")


def test_a_refusal_names_the_role_and_what_was_asked():
    refused = Refused(Stage.IN_SYNC, "spare", primary="127.0.0.1:8080")
    read = json.loads(outcome_reply(Command.GET, refused, "http", b"/kv/get?key=k")[1])
    assert read["error"] == "this server is the spare; send reads to the primary at 127.0.0.1:8080"
    write = json.loads(outcome_reply(Command.UPDATE, refused, "http")[1])
    assert write["error"].startswith("this server is the spare; send writes to the primary")


@pytest.mark.parametrize("command", list(Command))
def test_no_redirect_without_a_primary_or_in_course_mode(command: Command):
    target = b"/" + command.value.encode()
    no_primary = outcome_reply(command, Refused(Stage.COLD_START, "primary"), "http", target)
    assert no_primary[0] == 503
    named = Refused(Stage.IN_SYNC, "backup", primary="127.0.0.1:8080")
    course = outcome_reply(command, named, "course", target)
    assert course == outcome_reply(command, named, "course")  # the target changes nothing
    assert course[0] == 200 and b"Location" not in course[2]
    assert b"X-Pbkv-Primary: 127.0.0.1:8080\r\n" in course[2]


def headers_of(extra: bytes) -> dict[str, str]:
    lines = extra.decode("ascii").split("\r\n")
    assert lines[-1] == ""
    return dict(line.split(": ", 1) for line in lines[:-1])


COURSE_FAILURE = {
    Command.GET: b'{"success":"false","value":""}',
    Command.DELETE: b'{"success":"false","value":""}',
    Command.INSERT: b'{"success":"false"}',
    Command.UPDATE: b'{"success":"false"}',
    Command.COUNT: b'{"success":"false"}',
    Command.DUMP: b'{"success":"false"}',
}


@pytest.mark.parametrize("command", list(Command))
def test_replication_failed_reply_in_course_mode(command: Command) -> None:
    status, body, extra = outcome_reply(command, ReplicationFailed(), "course")
    assert (status, body) == (200, COURSE_FAILURE[command])
    assert headers_of(extra) == {
        "X-Pbkv-Error": "replication failed",
        "X-Pbkv-Status": "503",
        "Retry-After": "1",
    }


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("command", list(Command))
def test_stage_refusal_reply_in_course_mode(stage: Stage, command: Command) -> None:
    status, body, extra = outcome_reply(command, Refused(stage, "primary"), "course")
    assert (status, body) == (200, COURSE_FAILURE[command])
    assert headers_of(extra) == {
        "X-Pbkv-Error": f"not accepting this request in stage {stage.value}",
        "X-Pbkv-Status": "503",
        "X-Pbkv-Stage": stage.value,
        "Retry-After": "1",
    }


def test_backup_write_refusal_in_course_mode_names_the_primary() -> None:
    refused = Refused(Stage.IN_SYNC, "backup", primary="127.0.0.1:8080")
    status, body, extra = outcome_reply(Command.DELETE, refused, "course")
    assert (status, body) == (200, b'{"success":"false","value":""}')
    headers = headers_of(extra)
    assert headers["X-Pbkv-Primary"] == "127.0.0.1:8080"
    assert headers["X-Pbkv-Stage"] == "in_sync"
    assert "127.0.0.1:8080" in headers["X-Pbkv-Error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (b"/kv/get", b'{"success":"false","value":""}'),
        (b"/kv/delete", b'{"success":"false","value":""}'),
        (b"/kv/insert", b'{"success":"false"}'),
        (b"/kv/update", b'{"success":"false"}'),
        (b"/kvman/countkey", b'{"success":"false"}'),
        (b"/kvman/dump", b'{"success":"false"}'),
        (b"/kvman/status", b'{"success":"false"}'),
        (b"/kvman/shutdown", b'{"success":"false"}'),
    ],
)
@pytest.mark.parametrize("status", [400, 401, 403, 405, 413, 500, 503, 507])
def test_every_refusal_of_a_route_in_course_mode(path: bytes, body: bytes, status: int) -> None:
    """Any status a route refuses with, today's or one added later, is translated."""
    assert refusal_reply("course", path, status, "why") == (
        200,
        body,
        b"X-Pbkv-Error: why\r\nX-Pbkv-Status: %d\r\n" % status,
    )
    assert refusal_reply("http", path, status, "why") == (
        status,
        b'{"success":"false","error":"why"}',
        b"",
    )


@pytest.mark.parametrize("path", [b"/", b"/kv/nothing", b"/metrics", b"/kvrepl", b""])
def test_no_course_route_keeps_http_errors_in_course_mode(path: bytes) -> None:
    assert refusal_reply("course", path, 404, "unknown path") == (
        404,
        b'{"success":"false","error":"unknown path"}',
        b"",
    )


@pytest.mark.parametrize(
    "message",
    [
        "line\r\nX-Injected: 1",
        "parameter 'ключ' given more than once",
        "nul\0 del\x7f tab\t back\\slash 😀",
        "x" * 5000,
    ],
)
def test_refusal_header_is_safe_ascii_and_decodes_back(message: str) -> None:
    _, _, extra = refusal_reply("course", b"/kv/get", 400, message)
    value = headers_of(extra)["X-Pbkv-Error"]
    assert value.isascii() and value.isprintable()
    assert len(value) <= 2000
    assert value.encode().decode("unicode_escape") == message[:300]


def test_unknown_outcome_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        outcome_reply(Command.GET, "not an outcome")


@pytest.mark.parametrize("value", NASTY)
def test_nasty_values_survive_the_json_reply(value: str) -> None:
    for command in (Command.GET, Command.DELETE):
        assert reply(command, Done(True, value))[1] == {"success": "true", "value": value}
    assert reply(Command.DUMP, Dumped([(value + "k", value)]))[1] == [[value + "k", value]]


@settings(max_examples=150, deadline=None)
@given(value=st.text(), pairs=st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=5))
def test_any_value_survives_the_json_reply(value: str, pairs: list[tuple[str, str]]) -> None:
    assert reply(Command.GET, Done(True, value))[1] == {"success": "true", "value": value}
    assert reply(Command.DUMP, Dumped(pairs))[1] == [list(pair) for pair in pairs]


# -- framing helpers -----------------------------------------------------------------------
def test_error_body_shape() -> None:
    assert json.loads(error_body('bad "input"\n')) == {
        "success": "false",
        "error": 'bad "input"\n',
    }
    assert json.loads(error_body("x", stage="warm_start")) == {
        "success": "false",
        "error": "x",
        "stage": "warm_start",
    }


def test_response_framing() -> None:
    body = '{"value":"😀"}'.encode()
    raw = response(503, body, b"Retry-After: 1\r\n", close=True)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert b"Connection: close" in lines
    assert b"Retry-After: 1" in lines
    assert rest == body
    keep = response(200, b"{}")
    assert keep.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" not in keep
    assert keep.endswith(b"\r\n\r\n{}")


@given(st.text(alphabet=st.sampled_from("ab=&%+2F0c é"), max_size=30))
def test_form_decoding_agrees_with_parse_qsl(text):
    """Our bytes-level form decoding gives what urllib's parse_qsl gives, except
    that a '%' not followed by two hex digits is refused rather than kept."""
    import re
    from urllib.parse import parse_qsl

    from pbkv.http.params import _decode_pairs

    try:
        expected_pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        expected_pairs = None
    if re.search("%(?![0-9A-Fa-f]{2})", text):
        expected_pairs = None
    names = [name for name, _ in expected_pairs or []]
    ours: dict[str, str] = {}
    if expected_pairs is None or len(names) != len(set(names)):
        with pytest.raises(RequestError):
            _decode_pairs(text.encode(), ours)
    else:
        _decode_pairs(text.encode(), ours)
        assert ours == dict(expected_pairs)


def test_percent_encode_high_touches_only_bytes_from_0x80() -> None:
    raw = "/kv/get?key=韩国人&v=a%20b+c".encode()
    assert percent_encode_high(raw) == b"/kv/get?key=%E9%9F%A9%E5%9B%BD%E4%BA%BA&v=a%20b+c"
    assert percent_encode_high(b"?key=\xce\xd2\xff") == b"?key=%CE%D2%FF"
    ascii_only = bytes(range(0x80))
    assert percent_encode_high(ascii_only) == ascii_only


def test_refusal_log_lines_are_throttled_and_counted() -> None:
    from pbkv.limits import LogThrottle

    throttle = LogThrottle(per_window=3, window=1.0)
    assert [throttle.allow(10.0 + n / 100) for n in range(5)] == [0, 0, 0, None, None]
    assert throttle.allow(11.0) == 2  # the next window reports what was left out
    assert throttle.allow(11.1) == 0
