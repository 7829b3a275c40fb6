"""Tests of the linearizability checker used to judge simulated and real histories."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pbkv.testing.linearizability import History, Operation, check

NEVER_WRITTEN = "never-written"


def op(
    kind: str,
    call: float,
    ret: float | None,
    ok: bool | None,
    *,
    value: str | None = None,
    output: str | None = None,
    key: str = "k",
    client: int = 0,
) -> Operation:
    return Operation(client, kind, key, value, call, ret, ok, output)


def get(call: float, ret: float, found: str | None, **kw: object) -> Operation:
    """A read that found ``found`` (None: a miss)."""
    return op("get", call, ret, found is not None, output=found, **kw)  # type: ignore[arg-type]


def ins(call: float, ret: float | None, ok: bool | None, value: str, **kw: object) -> Operation:
    return op("insert", call, ret, ok, value=value, **kw)  # type: ignore[arg-type]


def upd(call: float, ret: float | None, ok: bool | None, value: str, **kw: object) -> Operation:
    return op("update", call, ret, ok, value=value, **kw)  # type: ignore[arg-type]


def dele(call: float, ret: float | None, ok: bool | None, old: str | None = None) -> Operation:
    return op("delete", call, ret, ok, output=old if ok else "")


# --- accepted histories ---------------------------------------------------------------


def test_sequential_history_is_accepted() -> None:
    history = [
        get(0, 1, None),
        ins(2, 3, True, "a"),
        get(4, 5, "a"),
        ins(6, 7, False, "b"),  # key exists: refused, legitimately
        upd(8, 9, True, "b"),
        get(10, 11, "b"),
        dele(12, 13, True, "b"),
        get(14, 15, None),
        dele(16, 17, False),
        upd(18, 19, False, "c"),
        ins(20, 21, True, "c"),
    ]
    assert check(history).ok is True
    assert check(history, final={"k": "c"}).ok is True


def test_empty_history_is_accepted() -> None:
    assert check([]).ok is True
    assert check([], initial={"k": "v"}, final={"k": "v"}).ok is True


def test_initial_state_is_respected() -> None:
    assert check([get(0, 1, "v")], initial={"k": "v"}).ok is True
    assert check([get(0, 1, None)], initial={"k": "v"}).ok is False


@pytest.mark.parametrize("seen", ["x", "y"])
def test_read_during_concurrent_writes_may_see_either(seen: str) -> None:
    history = [
        ins(0, 1, True, "a"),
        upd(2, 10, True, "x", client=1),
        upd(2, 10, True, "y", client=2),
        get(3, 4, seen, client=3),
    ]
    assert check(history).ok is True
    # Seeing one value mid-way does not fix the last writer.
    assert check(history, final={"k": "x"}).ok is True
    assert check(history, final={"k": "y"}).ok is True


def test_indeterminate_write_that_took_effect_is_accepted() -> None:
    history = [
        ins(0, 1, None, "a"),  # answered "replication failed"
        get(2, 3, "a"),
    ]
    assert check(history, final={"k": "a"}).ok is True


def test_indeterminate_write_that_never_took_effect_is_accepted() -> None:
    history = [ins(0, None, None, "a"), get(2, 3, None)]  # no answer ever came
    assert check(history, final={}).ok is True


def test_indeterminate_write_may_take_effect_after_its_reply() -> None:
    history = [
        upd(0, 1, None, "b"),
        get(2, 3, "a"),
        get(4, 5, "b"),
    ]
    assert check(history, initial={"k": "a"}, final={"k": "b"}).ok is True


def test_indeterminate_write_may_take_effect_only_after_the_history() -> None:
    history = [ins(0, 1, None, "a"), get(2, 3, None)]
    assert check(history, final={"k": "a"}).ok is True


def test_indeterminate_writes_of_unread_values() -> None:
    # Nobody reads "u", so whether the update happened cannot be told apart.
    history = [upd(0, None, None, "u"), get(2, 3, "a"), upd(4, 5, True, "b"), get(6, 7, "b")]
    assert check(history, initial={"k": "a"}, final={"k": "b"}).ok is True
    assert check(history, initial={"k": "a"}, final={"k": "u"}).ok is True
    # An unread insert still changes presence, which a read can see.
    history = [ins(0, None, None, "u"), get(2, 3, None), upd(4, 5, True, "b")]
    assert check(history, final={"k": "b"}).ok is True
    history[1] = get(6, 7, None)  # after the update succeeded, the key cannot be absent
    assert check(history, final={"k": "b"}).ok is False


def test_failed_insert_on_existing_key_is_accepted() -> None:
    history = [ins(0, 1, True, "a"), ins(2, 3, False, "b"), get(4, 5, "a")]
    assert check(history, final={"k": "a"}).ok is True


def test_unanswered_read_is_ignored() -> None:
    history = [ins(0, 1, True, "a"), op("get", 2, None, None)]
    assert check(history, final={"k": "a"}).ok is True


def test_keys_are_checked_independently() -> None:
    history = [
        ins(0, 10, True, "a", key="x"),
        ins(0, 10, True, "b", key="y"),
        get(1, 2, "b", key="y"),
        get(3, 4, None, key="x"),
        get(11, 12, "a", key="x"),
    ]
    assert check(history, final={"x": "a", "y": "b"}).ok is True


# --- rejected histories ---------------------------------------------------------------


def test_stale_read_is_rejected() -> None:
    history = [upd(0, 1, True, "b"), get(2, 3, "a")]
    result = check(history, initial={"k": "a"})
    assert result.ok is False
    assert result.key == "k"
    assert "'a'" in result.explanation and "update('b')" in result.explanation


def test_lost_acknowledged_write_is_rejected() -> None:
    history = [ins(0, 1, True, "a", key="x"), ins(0, 1, True, "b", key="y")]
    assert check(history, final={"x": "a", "y": "b"}).ok is True
    result = check(history, final={"y": "b"})
    assert result.ok is False
    assert result.key == "x"
    assert "final state" in result.explanation


def restore(call: float, ret: float, value: str | None) -> Operation:
    """What a server recovered from disk after a power loss at ``call``."""
    return op("restore", call, ret, True, value=value, client=-1)


def test_a_restore_may_bring_back_an_older_value_and_later_reads_follow_it() -> None:
    history = [
        ins(0, 1, True, "a"),
        upd(2, 3, True, "b"),
        get(3.5, 4, "b"),
        restore(5, 6, "a"),  # the power took the update
        get(7, 8, "a"),
    ]
    assert check(history, final={"k": "a"}).ok is True


def test_a_read_after_a_restore_must_see_what_it_restored() -> None:
    history = [ins(0, 1, True, "a"), upd(2, 3, True, "b"), restore(5, 6, "a"), get(7, 8, "b")]
    assert check(history).ok is False


def test_a_restore_to_absent_is_a_write_of_nothing() -> None:
    history = [ins(0, 1, True, "a"), restore(2, 3, None), get(4, 5, None), ins(6, 7, True, "c")]
    assert check(history, final={"k": "c"}).ok is True
    with pytest.raises(ValueError):
        op("restore", 0, 1, None, value="a")


def test_lost_acknowledged_delete_is_rejected() -> None:
    history = [dele(0, 1, True, "a")]
    assert check(history, initial={"k": "a"}, final={"k": "a"}).ok is False


def test_change_to_untouched_key_is_rejected() -> None:
    assert check([], initial={"k": "a"}, final={"k": "b"}).ok is False
    assert check([], final={"k": "a"}).ok is False
    assert check([ins(0, 1, True, "a")], initial={"z": "1"}, final={"k": "a"}).ok is False


def test_update_refused_while_key_present_is_rejected() -> None:
    history = [ins(0, 1, True, "a"), upd(2, 3, False, "b")]
    assert check(history).ok is False


def test_insert_refused_while_key_absent_is_rejected() -> None:
    assert check([ins(0, 1, False, "a")]).ok is False


def test_refused_write_later_visible_is_rejected() -> None:
    history = [ins(0, 1, True, "a"), ins(2, 3, False, "b"), get(4, 5, "b")]
    assert check(history).ok is False


def test_read_of_rewound_value_is_rejected() -> None:
    # The read overlaps the write, but a write with a definite failure had no effect.
    history = [ins(0, 1, True, "a"), ins(2, 10, False, "b"), get(3, 4, "b", client=1)]
    assert check(history).ok is False


def test_non_monotonic_reads_are_rejected() -> None:
    history = [
        upd(0, 10, True, "b"),
        get(1, 2, "b", client=1),
        get(3, 4, "a", client=1),  # went back to the value before the write
    ]
    assert check(history, initial={"k": "a"}).ok is False
    # The other order is fine while the write is in flight.
    history[1:] = [get(1, 2, "a", client=1), get(3, 4, "b", client=1)]
    assert check(history, initial={"k": "a"}).ok is True


def test_delete_returning_wrong_old_value_is_rejected() -> None:
    history = [ins(0, 1, True, "a"), upd(2, 3, True, "b"), dele(4, 5, True, "a")]
    assert check(history).ok is False
    history[-1] = dele(4, 5, True, "b")
    assert check(history, final={}).ok is True


def test_delete_refused_while_key_present_is_rejected() -> None:
    assert check([dele(0, 1, False)], initial={"k": "a"}).ok is False


def test_failure_explanation_names_the_stuck_operation() -> None:
    history = [ins(0, 1, True, "a"), get(2, 3, None)]
    result = check(history)
    assert result.ok is False
    assert result.operations == tuple(history)
    assert result.linearization == (history[0],)
    assert "could not place" in result.explanation
    assert "get -> miss" in result.explanation


# --- budget -----------------------------------------------------------------------------


def _hard_impossible_history(n: int) -> list[Operation]:
    """n overlapping updates, then a read of a value nobody wrote: the search must try
    every subset of the updates before it can say no."""
    writes = [upd(1, 100, True, f"v{i}", client=i) for i in range(n)]
    return [ins(0, 1, True, "a"), *writes, get(101, 102, NEVER_WRITTEN, client=n)]


def test_step_budget_gives_unknown_instead_of_hanging() -> None:
    result = check(_hard_impossible_history(14), max_steps=2_000)
    assert result.ok is None
    assert result.key == "k"


def test_hard_history_is_rejected_within_default_budget() -> None:
    assert check(_hard_impossible_history(10)).ok is False


# --- History recorder -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_history_records_with_a_simulated_clock() -> None:
    clock = FakeClock()
    h = History(clock=clock)
    a = h.invoke(1, "insert", "k", "v")
    clock.now = 1.0
    b = h.invoke(2, "get", "k")
    clock.now = 2.0
    h.complete(a, ok=True)
    h.complete(b, ok=True, value="v")
    c = h.invoke(3, "update", "k", "w")
    clock.now = 3.0
    h.indeterminate(c)
    h.invoke(4, "delete", "k")  # never answered

    ops = h.operations()
    assert ops[0] == Operation(1, "insert", "k", "v", 0.0, 2.0, True, None)
    assert ops[1] == Operation(2, "get", "k", None, 1.0, 2.0, True, "v")
    assert ops[2] == Operation(3, "update", "k", "w", 2.0, 3.0, None, None)
    assert ops[3] == Operation(4, "delete", "k", None, 3.0, None, None, None)
    assert check(ops, final={"k": "w"}).ok is True
    assert check(ops, final={}).ok is True
    assert check(ops, final={"k": "x"}).ok is False


def test_history_rejects_driver_mistakes() -> None:
    h = History(clock=FakeClock())
    with pytest.raises(ValueError):
        h.invoke(1, "upsert", "k", "v")
    a = h.invoke(1, "get", "k")
    with pytest.raises(ValueError):
        h.complete(a, ok=True)  # a found read must carry its value
    b = h.invoke(1, "insert", "k", "v")
    h.complete(b, ok=True)
    with pytest.raises(ValueError):
        h.complete(b, ok=False)
    with pytest.raises(KeyError):
        h.indeterminate(99)


def test_operation_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        Operation(0, "insert", "k", None, 0, 1, True)  # insert needs a value
    with pytest.raises(ValueError):
        Operation(0, "get", "k", "v", 0, 1, False)  # get takes no value
    with pytest.raises(ValueError):
        Operation(0, "update", "k", "v", 0, None, True)  # definite needs a return time
    with pytest.raises(ValueError):
        Operation(0, "update", "k", "v", 2, 1, True)  # returned before its call


# --- generated histories ----------------------------------------------------------------


def run_sequential(steps: list[tuple[str, str, str]]) -> tuple[list[Operation], dict[str, str]]:
    """Run (kind, key, value) steps one after another against a dict."""
    db: dict[str, str] = {}
    history = []
    for n, (kind, key, value) in enumerate(steps):
        history.append(_run_on_dict(db, 0, kind, key, value, 2.0 * n, 2.0 * n + 1))
    return history, db


def _run_on_dict(
    db: dict[str, str], client: int, kind: str, key: str, value: str, call: float, ret: float
) -> Operation:
    state = db.get(key)
    if kind == "get":
        return Operation(client, kind, key, None, call, ret, state is not None, state or "")
    if kind == "delete":
        if state is not None:
            del db[key]
        return Operation(client, kind, key, None, call, ret, state is not None, state or "")
    ok = (state is None) if kind == "insert" else (state is not None)
    if ok:
        db[key] = value
    return Operation(client, kind, key, value, call, ret, ok)


step_st = st.tuples(
    st.sampled_from(["get", "get", "insert", "update", "delete"]),
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["x", "y", "z", ""]),
)


def _corrupt_a_read(history: list[Operation], pick: int) -> list[Operation]:
    reads = [i for i, o in enumerate(history) if o.kind == "get" and o.ok is not None]
    assume(reads)
    i = reads[pick % len(reads)]
    return [*history[:i], replace(history[i], ok=True, output=NEVER_WRITTEN), *history[i + 1 :]]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(step_st, max_size=40), pick=st.integers(min_value=0))
def test_sequential_dict_histories_are_accepted_and_corruption_caught(
    steps: list[tuple[str, str, str]], pick: int
) -> None:
    history, db = run_sequential(steps)
    assert check(history, final=db).ok is True
    corrupted = _corrupt_a_read(history, pick)
    result = check(corrupted, final=db)
    assert result.ok is False
    assert NEVER_WRITTEN in result.explanation


def simulate(
    rng: random.Random,
    n_ops: int,
    n_clients: int,
    n_keys: int,
    *,
    hot_keys: int = 0,
    trouble: float = 0.0,
) -> tuple[list[Operation], dict[str, str]]:
    """A concurrent execution against a dict: every client issues operations back to
    back, each takes effect at a random point inside its interval. With probability
    ``trouble`` a write is indeterminate (applied or not) and a read goes unanswered."""
    keys = [f"key{i}" for i in range(n_keys)]
    weights = [8 if i < hot_keys else 1 for i in range(n_keys)]
    free_at = [0.0] * n_clients
    planned = []
    for n in range(n_ops):
        client = min(range(n_clients), key=free_at.__getitem__)
        call = free_at[client] + rng.uniform(0, 0.5)
        effect = call + rng.uniform(0, 5)
        ret = effect + rng.uniform(0, 5)
        free_at[client] = ret
        kind = rng.choice(["get", "get", "insert", "update", "delete"])
        key = rng.choices(keys, weights)[0]
        planned.append((effect, n, client, kind, key, f"v{n}", call, ret))

    db: dict[str, str] = {}
    history = []
    for effect, _, client, kind, key, value, call, ret in sorted(planned):
        lost = rng.random() < trouble
        if lost and kind == "get":
            history.append(Operation(client, kind, key, None, call, None, None))
        elif lost:
            if rng.random() < 0.5:  # the write happened even though nobody heard
                _run_on_dict(db, client, kind, key, value, call, ret)
            answered = rng.random() < 0.5
            arg = None if kind == "delete" else value
            history.append(Operation(client, kind, key, arg, call, ret if answered else None, None))
        else:
            history.append(_run_on_dict(db, client, kind, key, value, call, ret))
        assert effect <= ret
    rng.shuffle(history)  # the checker must not rely on input order
    return history, db


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), pick=st.integers(min_value=0))
def test_concurrent_dict_histories_are_accepted_and_corruption_caught(seed: int, pick: int) -> None:
    history, db = simulate(random.Random(seed), 60, 4, 3, trouble=0.1)
    assert check(history, final=db).ok is True
    assert check(_corrupt_a_read(history, pick), final=db).ok is False


def test_large_concurrent_history_is_checked_quickly() -> None:
    history, db = simulate(random.Random(1), 2000, 8, 20, hot_keys=3, trouble=0.02)
    started = time.perf_counter()
    result = check(history, final=db)
    elapsed = time.perf_counter() - started
    assert result.ok is True, result.explanation
    assert elapsed < 3.0, f"checking took {elapsed:.2f}s"


def test_large_concurrent_history_with_a_lost_write_is_rejected_quickly() -> None:
    history, db = simulate(random.Random(2), 2000, 8, 20, hot_keys=3)
    acked = [o for o in history if o.kind == "insert" and o.ok and db.get(o.key) == o.value]
    assert acked, "the simulation should leave some inserted values in place"
    lost = dict(db)
    del lost[acked[0].key]
    started = time.perf_counter()
    result = check(history, final=lost)
    elapsed = time.perf_counter() - started
    assert result.ok is False
    assert result.key == acked[0].key
    assert elapsed < 3.0, f"checking took {elapsed:.2f}s"


def test_large_history_with_a_stale_read_is_rejected_quickly() -> None:
    rng = random.Random(3)
    history, db = simulate(rng, 2000, 8, 20, hot_keys=3, trouble=0.05)
    # Make one read that found a value return an older value of the same key instead.
    i = next(i for i, o in enumerate(history) if o.kind == "get" and o.ok and o.key == "key0")
    older = [
        o.value
        for o in history
        if o.key == "key0"
        and o.ok
        and o.kind in ("insert", "update")
        and o.ret is not None
        and o.ret < history[i].call
        and o.value != history[i].output
    ]
    assert older
    history[i] = replace(history[i], output=older[0])
    started = time.perf_counter()
    result = check(history, final=db)
    elapsed = time.perf_counter() - started
    assert result.ok is False
    assert result.key == "key0"
    assert elapsed < 3.0, f"checking took {elapsed:.2f}s"


# --- agreement with a brute-force reference ---------------------------------------------


def brute_force(history: list[Operation], start: str | None, end: str | None) -> bool:
    """Linearizable per the definition: some subset of the indeterminate writes plus
    every definite operation, in some order that respects real time, replays on the
    model and ends in ``end``. Exponential; for tiny single-key histories only."""
    definite = [o for o in history if o.ok is not None]
    maybe = [o for o in history if o.ok is None and o.kind != "get"]
    for mask in range(1 << len(maybe)):
        chosen = definite + [o for i, o in enumerate(maybe) if mask >> i & 1]
        for order in itertools.permutations(chosen):
            if _respects_real_time(order) and _replays(order, start) == (True, end):
                return True
    return False


def _respects_real_time(order: tuple[Operation, ...]) -> bool:
    for i, later in enumerate(order):
        for earlier in order[i + 1 :]:
            # `earlier` was placed after `later`: wrong if it returned before `later` began
            if earlier.ok is not None and earlier.ret is not None and earlier.ret < later.call:
                return False
    return True


def _replays(order: tuple[Operation, ...], state: str | None) -> tuple[bool, str | None]:
    for o in order:
        if o.kind == "get":
            if (state is not None) != o.ok or (o.ok and state != o.output):
                return False, None
            continue
        if o.kind == "insert":
            success, new, old = state is None, (o.value if state is None else state), None
        elif o.kind == "update":
            success, new, old = state is not None, (o.value if state is not None else None), None
        else:
            success, new, old = state is not None, None, state
        if o.ok is not None and (
            success != o.ok or (o.kind == "delete" and o.ok and old != o.output)
        ):
            return False, None
        state = new
    return True, state


@st.composite
def tiny_operation(draw: st.DrawFn) -> Operation:
    kind = draw(st.sampled_from(["get", "insert", "update", "delete"]))
    call = draw(st.integers(0, 6))
    ret = call + draw(st.integers(0, 4))
    ok = draw(st.sampled_from([True, False, None]))
    value = draw(st.sampled_from(["x", "y"])) if kind in ("insert", "update") else None
    output = draw(st.sampled_from(["x", "y"])) if ok and kind in ("get", "delete") else None
    answered = ok is not None or draw(st.booleans())
    return Operation(
        draw(st.integers(0, 3)), kind, "k", value, call, ret if answered else None, ok, output
    )


@settings(max_examples=600, deadline=None)
@given(
    history=st.lists(tiny_operation(), max_size=6),
    start=st.sampled_from([None, "x", "y"]),
    end=st.sampled_from([None, "x", "y", "any"]),
)
def test_agrees_with_brute_force(
    history: list[Operation], start: str | None, end: str | None
) -> None:
    initial = {} if start is None else {"k": start}
    if end == "any":
        expected = any(brute_force(history, start, e) for e in (None, "x", "y"))
        assert (check(history, initial=initial).ok is True) == expected
    else:
        final = {} if end is None else {"k": end}
        expected = brute_force(history, start, end)
        assert (check(history, initial=initial, final=final).ok is True) == expected
