"""Linearizability checking of key-value histories.

A history is split by key and each key is checked on its own: the model is one
register per key, and linearizability is compositional, so a history is linearizable
iff every key's sub-history is.

Each key is checked with the Wing-Gong search as refined by Lowe (WGL), the algorithm
Porcupine and Knossos use: calls and returns form a doubly linked list in time order;
the search repeatedly picks an operation whose call precedes every pending return,
applies it to the model, lifts it out of the list, and backtracks when it meets a
return whose operation it could not place. A cache of (set of linearized operations,
model state) pairs prunes configurations already explored, which makes the search
fast on real histories. The search uses an explicit stack, so long histories do not
hit Python's recursion limit, and a step/time budget turns a pathological search into
an "unknown" verdict instead of a hang.

Writes whose outcome is indeterminate ("replication failed", or no reply) have no
return event: they may be linearized at any point after their call, or never.

A ``restore`` sets a key to what a server recovered from disk after a power loss
(``value``; None: absent): a write that may have lost others before it, placed
between the loss (its call) and the moment the server served again (its return).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final, Literal

KINDS = frozenset({"get", "insert", "update", "delete", "restore"})
WRITES = frozenset({"insert", "update", "delete", "restore"})


class _Mark(Enum):
    IMPOSSIBLE = "the model cannot produce this outcome from this state"
    ANY_END = "no final dump given: any end state will do"


_IMPOSSIBLE: Final = _Mark.IMPOSSIBLE
_ANY_END: Final = _Mark.ANY_END
_State = str | None  # None is "absent"
_INF = float("inf")


@dataclass(frozen=True, slots=True)
class Operation:
    """One client request and what came of it.

    ``value`` is the argument of insert/update and None for get/delete. ``call`` is
    when the request was sent and ``ret`` when its reply arrived (None: no reply ever
    came, e.g. a timeout or a lost connection).

    The outcome is ``ok`` together with ``output`` (the value a reply carried):

    - get: ok=True found, ``output`` is the value; ok=False miss (``output`` ignored);
      ok=None no usable answer, the read observed nothing and is dropped.
    - insert: ok=True inserted; ok=False the key existed and nothing changed.
    - update: ok=True updated; ok=False the key was missing and nothing changed.
    - delete: ok=True deleted and ``output`` is the old value; ok=False the key was
      missing (``output`` ignored).
    - restore: ok=True; ``value`` is the key's value after it (None: absent).
    - any write with ok=None is indeterminate (answered "replication failed", or never
      answered): it may take effect at any moment after its call, even after the end of
      the history, or never.
    """

    client: int
    kind: str
    key: str
    value: str | None
    call: float
    ret: float | None
    ok: bool | None
    output: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.kind == "restore":
            if self.ok is not True:
                raise ValueError("a restore happened: ok=True")
        elif (self.kind in ("insert", "update")) != isinstance(self.value, str):
            raise ValueError(f"{self.kind} takes a string value iff it is insert/update")
        if self.ok is not None:
            if self.ret is None:
                raise ValueError("an operation with a definite outcome needs a return time")
            if self.ret < self.call:
                raise ValueError(f"return {self.ret} before call {self.call}")
        if self.ok and self.kind in ("get", "delete") and not isinstance(self.output, str):
            raise ValueError(f"a successful {self.kind} must carry the value it returned")

    @property
    def definite(self) -> bool:
        """True when the outcome is known, so the operation must be linearized."""
        return self.ok is not None

    def describe(self) -> str:
        """One line for humans, e.g. ``client 2 get -> 'v' [1.5, 2]``."""
        arg = f"({self.value!r})" if self.value is not None else ""
        if self.ok is None:
            out = "no answer" if self.kind == "get" else "indeterminate"
        elif self.kind == "get":
            out = repr(self.output) if self.ok else "miss"
        elif self.kind == "delete" and self.ok:
            out = f"ok {self.output!r}"
        else:
            out = "ok" if self.ok else "refused"
        end = "never" if self.ret is None else _fmt_time(self.ret)
        return f"client {self.client} {self.kind}{arg} -> {out} [{_fmt_time(self.call)}, {end}]"


@dataclass(frozen=True, slots=True)
class Result:
    """Verdict of :func:`check`.

    ``ok`` is True (linearizable), False (not) or None (unknown: budget exhausted).
    When not True, ``key`` names the key concerned and ``explanation`` says why;
    on failure ``operations`` holds that key's operations in call order and
    ``linearization`` the longest linearizable prefix the search found.
    """

    ok: bool | None
    key: str | None = None
    explanation: str = ""
    operations: tuple[Operation, ...] = ()
    linearization: tuple[Operation, ...] = ()


class History:
    """Records operations as a test driver issues them.

    ``clock`` is any monotonic time source, so a simulator can pass its own::

        h = History(clock=sim.now)
        op_id = h.invoke(client, "insert", "k", "v")
        h.complete(op_id, ok=True)          # or h.indeterminate(op_id)
        check(h.operations())

    Operations still pending when :meth:`operations` is called count as unanswered.
    Not thread-safe: meant for one asyncio loop or one simulator.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._calls: list[tuple[int, str, str, str | None, float]] = []
        self._ends: dict[int, tuple[float | None, bool | None, str | None]] = {}

    def invoke(self, client: int, kind: str, key: str, value: str | None = None) -> int:
        """Record that ``client`` sent a request now; returns its id."""
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        self._calls.append((client, kind, key, value, self._clock()))
        return len(self._calls) - 1

    def complete(self, op_id: int, ok: bool, value: str | None = None) -> None:
        """Record a definite reply: ``ok`` is the success flag, ``value`` the returned
        value of a get/delete (see :class:`Operation`)."""
        self._end(op_id, (self._clock(), ok, value))

    def indeterminate(self, op_id: int) -> None:
        """Record a reply that leaves the outcome unknown (error or timeout)."""
        self._end(op_id, (self._clock(), None, None))

    def operations(self) -> list[Operation]:
        """All operations in invocation order."""
        ops = []
        for op_id, (client, kind, key, value, call) in enumerate(self._calls):
            ret, ok, output = self._ends.get(op_id, (None, None, None))
            ops.append(Operation(client, kind, key, value, call, ret, ok, output))
        return ops

    def _end(self, op_id: int, end: tuple[float | None, bool | None, str | None]) -> None:
        if not 0 <= op_id < len(self._calls):
            raise KeyError(op_id)
        if op_id in self._ends:
            raise ValueError(f"operation {op_id} already completed")
        self._ends[op_id] = end
        # Validate now, so a driver bug points at the reply that caused it.
        client, kind, key, value, call = self._calls[op_id]
        Operation(client, kind, key, value, call, end[0], end[1], end[2])


def check(
    history: Iterable[Operation],
    initial: Mapping[str, str] | None = None,
    final: Mapping[str, str] | None = None,
    *,
    max_steps: int | None = 10_000_000,
    timeout: float | None = 60.0,
) -> Result:
    """Check that ``history`` is linearizable against a per-key map model.

    ``initial`` is the content before the history (default: empty). ``final``, when
    given, is the content observed afterwards (a server's dump): each key must then
    also have a linearization ending in that state, where a key missing from
    ``final`` is absent. ``max_steps`` bounds the search of each key and ``timeout``
    (seconds) the whole check; past either the verdict is unknown (``ok=None``).
    """
    start = dict(initial or {})
    by_key: dict[str, list[Operation]] = {}
    for op in history:
        # An unanswered read observed nothing, so it constrains nothing.
        if op.kind == "get" and op.ok is None:
            by_key.setdefault(op.key, [])
        else:
            by_key.setdefault(op.key, []).append(op)

    if final is not None:
        for key in sorted((start.keys() | final.keys()) - by_key.keys()):
            if start.get(key) != final.get(key):
                return Result(
                    ok=False,
                    key=key,
                    explanation=(
                        f"key {key!r} has no operations, yet its state went from "
                        f"{_fmt_state(start.get(key))} to {_fmt_state(final.get(key))}"
                    ),
                )

    deadline = None if timeout is None else time.monotonic() + timeout
    unknown: str | None = None
    for key in sorted(by_key):
        ops = sorted(by_key[key], key=lambda op: op.call)
        end: _State | Literal[_Mark.ANY_END] = _ANY_END if final is None else final.get(key)
        found = _search(ops, start.get(key), end, max_steps, deadline)
        if found.ok is False:
            return Result(
                ok=False,
                key=key,
                explanation=_explain(key, ops, start.get(key), end, found),
                operations=tuple(ops),
                linearization=tuple(ops[i] for i in found.prefix),
            )
        if found.ok is None and unknown is None:
            unknown = key
    if unknown is not None:
        return Result(
            ok=None,
            key=unknown,
            explanation=f"search budget exhausted on key {unknown!r}: verdict unknown",
        )
    return Result(ok=True)


def _apply(kind: str, arg: str | None, state: str | None) -> tuple[bool, str | None, str | None]:
    """Run a write on the model: (success, old value returned, new state)."""
    if kind == "insert":
        return (True, None, arg) if state is None else (False, None, state)
    if kind == "update":
        return (True, None, arg) if state is not None else (False, None, None)
    if kind == "restore":
        return True, None, arg
    return (True, state, None) if state is not None else (False, None, None)


def _step(op: Operation, state: _State) -> _State | Literal[_Mark.IMPOSSIBLE]:
    """The state after ``op`` if the model allows its outcome from ``state``, else
    ``_IMPOSSIBLE``."""
    if op.kind == "get":
        found = state is not None
        if found != op.ok or (found and state != op.output):
            return _IMPOSSIBLE
        return state
    success, old, new = _apply(op.kind, op.value, state)
    if op.ok is None:
        # An indeterminate write that changes nothing here is the same as dropping it,
        # which stays possible, so skip it: this keeps the search from branching on it.
        return _IMPOSSIBLE if new == state else new
    if success != op.ok or (op.kind == "delete" and success and old != op.output):
        return _IMPOSSIBLE
    return new


@dataclass(frozen=True, slots=True)
class _Found:
    ok: bool | None
    prefix: list[int]  # longest linearizable prefix (indices into the key's ops)
    all_definite: bool  # some order placed every definite op (only the end state failed)


def _search(
    ops: list[Operation],
    start: _State,
    end: _State | Literal[_Mark.ANY_END],
    max_steps: int | None,
    deadline: float | None,
) -> _Found:
    """WGL search over one key's operations, sorted by call time.

    Definite operations live in the linked list of call/return entries. Indeterminate
    writes have no return, so they sit apart (``optional``) and are tried only once no
    definite operation can go next: reaching a configuration with few of them used
    first lets the cache prune the same configuration reached with more of them used.
    """
    ops, unobserved = _abstract_values(ops, end)
    definite = [i for i, op in enumerate(ops) if op.ok is not None]
    # An indeterminate update of a value nobody observes can always be dropped: applied,
    # it only swaps one present value for another, and no read could tell (it would have
    # to return that value). Such an insert stays: it changes absent to present.
    optional = [
        i
        for i, op in enumerate(ops)
        if op.ok is None and not (op.kind == "update" and op.value == unobserved)
    ]

    # Entries in time order; at equal times calls come first, so touching intervals
    # count as concurrent (clock ties cannot order them).
    # Every definite operation has a return time (Operation checks it): none is left out.
    events = [(ops[i].call, 0, i) for i in definite] + [
        (ret, 1, i) for i in definite if (ret := ops[i].ret) is not None
    ]
    events.sort()

    # Doubly linked list over entries 1..m, entry 0 is the head; -1 ends the list.
    m = len(events)
    nxt = [*range(1, m + 1), -1]
    prv = [-1, *range(m)]
    is_call = [False] * (m + 1)
    op_of = [-1] * (m + 1)
    time_of = [0.0] * (m + 1)
    call_entry = [0] * len(ops)
    ret_entry = [0] * len(ops)
    for j, (t, is_ret, i) in enumerate(events, 1):
        op_of[j], time_of[j], is_call[j] = i, t, not is_ret
        if is_ret:
            ret_entry[i] = j
        else:
            call_entry[i] = j

    def unlink(j: int) -> None:
        nxt[prv[j]] = nxt[j]
        if nxt[j] != -1:
            prv[nxt[j]] = prv[j]

    def relink(j: int) -> None:
        nxt[prv[j]] = j
        if nxt[j] != -1:
            prv[nxt[j]] = j

    # Identical indeterminate writes are interchangeable: only the earliest unused one
    # is tried, which spares the search every permutation of, say, lost deletes.
    opt_call = [ops[i].call for i in optional]
    twin = [-1] * len(optional)
    last: dict[tuple[str, str | None], int] = {}
    for k, i in enumerate(optional):
        sig = (ops[i].kind, ops[i].value)
        twin[k] = last.get(sig, -1)
        last[sig] = k

    remaining = len(definite)
    state = start
    all_definite = remaining == 0
    if all_definite and (end is _ANY_END or state == end):
        return _Found(True, [], True)

    # (definite ops linearized, state) -> sets of indeterminate writes used with it.
    cache: dict[tuple[int, _State], list[int]] = {}
    # (op, its slot in `optional` or -1, state before it, `limit` when it was chosen)
    stack: list[tuple[int, int, _State, float]] = []
    done = 0  # bitset over ops: definite ops linearized
    used = 0  # bitset over slots of `optional`: indeterminate writes linearized
    best: list[int] = []
    steps = 0
    entry = nxt[0]  # scan position among definite entries
    slot = -1  # scan position in `optional`, or -1 while scanning definite entries
    limit = _INF  # optional writes called after this return time cannot go next
    while True:
        steps += 1
        if steps & 0x3FF == 0 and (
            (max_steps is not None and steps > max_steps)
            or (deadline is not None and time.monotonic() > deadline)
        ):
            return _Found(None, _longest(best, stack), all_definite)

        if slot < 0:
            if entry == -1 or not is_call[entry]:
                # No definite op can go before this return: try indeterminate writes.
                limit = _INF if entry == -1 else time_of[entry]
                slot = 0
                continue
            i = op_of[entry]
        elif slot >= len(optional) or opt_call[slot] > limit:
            # Nothing can go next: undo the last choice and try its successors.
            if not stack:
                return _Found(False, best, all_definite)
            # Copy the stack only when about to shrink it: copying on every
            # step made long histories quadratic.
            best = _longest(best, stack)
            i, slot, state, limit = stack.pop()
            if slot < 0:
                done &= ~(1 << i)
                relink(ret_entry[i])
                relink(call_entry[i])
                remaining += 1
                entry = nxt[call_entry[i]]
            else:
                used &= ~(1 << slot)
                slot += 1
            continue
        elif used >> slot & 1 or (twin[slot] >= 0 and not used >> twin[slot] & 1):
            slot += 1
            continue
        else:
            i = optional[slot]

        new = _step(ops[i], state)
        if new is not _IMPOSSIBLE:
            new_done, new_used = (done | 1 << i, used) if slot < 0 else (done, used | 1 << slot)
            if _unseen(cache, (new_done, new), new_used):
                stack.append((i, slot, state, limit))
                done, used, state = new_done, new_used, new
                if slot < 0:
                    unlink(call_entry[i])
                    unlink(ret_entry[i])
                    remaining -= 1
                if remaining == 0:
                    all_definite = True
                    if end is _ANY_END or state == end:
                        return _Found(True, _longest(best, stack), True)
                entry, slot = nxt[0], -1
                continue
        if slot < 0:
            entry = nxt[entry]
        else:
            slot += 1


def _longest(best: list[int], stack: list[tuple[int, int, _State, float]]) -> list[int]:
    """The longer of the best prefix so far and the current stack's ops."""
    return [op for op, *_ in stack] if len(stack) > len(best) else best


def _abstract_values(
    ops: list[Operation], end: _State | Literal[_Mark.ANY_END]
) -> tuple[list[Operation], str]:
    """Replace every written value that no read, delete or final state observes with
    one token; returns the new operations and the token.

    The model only ever compares a value with an observed one, so such values are
    indistinguishable; merging them lets the cache merge states and makes writes of
    them interchangeable.
    """
    observed = {op.output for op in ops if op.ok and op.kind in ("get", "delete")}
    if isinstance(end, str):
        observed.add(end)
    token = "\0unobserved"
    while token in observed:
        token += "\0"
    abstract = [
        replace(op, value=token) if op.value is not None and op.value not in observed else op
        for op in ops
    ]
    return abstract, token


def _unseen(
    cache: dict[tuple[int, _State], list[int]], seen: tuple[int, _State], used: int
) -> bool:
    """Record a configuration; False if it is covered by one already explored.

    Having used fewer indeterminate writes leaves strictly more options (they may be
    dropped and have no deadline), so a configuration with the same definite ops and
    state and a subset of the writes covers this one.
    """
    sets = cache.get(seen)
    if sets is None:
        cache[seen] = [used]
        return True
    if any(other & ~used == 0 for other in sets):
        return False
    sets[:] = [other for other in sets if used & ~other]  # drop the ones this covers
    sets.append(used)
    return True


_SHOW_OPS = 60
_SHOW_PREFIX = 30
_SHOW_STUCK = 10


def _explain(
    key: str,
    ops: list[Operation],
    start: _State,
    end: _State | Literal[_Mark.ANY_END],
    found: _Found,
) -> str:
    lines = [f"key {key!r} is not linearizable ({len(ops)} operations)"]
    end_text = "not given" if end is _ANY_END else _fmt_state(end)
    lines.append(f"initial state: {_fmt_state(start)}; final state: {end_text}")
    if found.all_definite:
        lines.append(
            "every definite operation can be linearized, but no linearization ends in "
            "the final state"
        )
    lines.append("operations in call order:")
    lines += [f"  #{i} {op.describe()}" for i, op in enumerate(ops[:_SHOW_OPS])]
    if len(ops) > _SHOW_OPS:
        lines.append(f"  ... {len(ops) - _SHOW_OPS} more")

    lines.append(f"longest linearizable prefix ({len(found.prefix)} operations):")
    state = start
    steps = []
    for i in found.prefix:
        after = _step(ops[i], state)
        assert after is not _IMPOSSIBLE, "a prefix the search found must replay"
        state = after
        steps.append(f"  #{i} {ops[i].describe()}  => {_fmt_state(state)}")
    if len(steps) > _SHOW_PREFIX:
        lines.append(f"  ... {len(steps) - _SHOW_PREFIX} earlier steps")
    lines += steps[-_SHOW_PREFIX:]

    placed = set(found.prefix)
    stuck = [i for i, op in enumerate(ops) if op.ok is not None and i not in placed]
    if stuck:
        lines.append("definite operations it could not place next (first by call):")
        lines += [f"  #{i} {ops[i].describe()}" for i in stuck[:_SHOW_STUCK]]
    return "\n".join(lines)


def _fmt_state(state: str | None) -> str:
    return "absent" if state is None else repr(state)


def _fmt_time(t: float) -> str:
    return f"{t:.6f}".rstrip("0").rstrip(".")
