"""The database map and its order-independent checksum."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.store import (
    CHECKSUM_MODULUS,
    HashStore,
    ShardedStore,
    combine,
    make_store,
    pair_checksum,
    shard_of,
    without_pairs,
)

# (kind, shard count) pairs; the hash store always has one shard.
SHAPES = [("sharded", 1), ("sharded", 7), ("sharded", 16), ("hash", 16)]
SHAPE_IDS = [f"{kind}-{count}" for kind, count in SHAPES]

# A few fixed keys make overwrites and removals of present keys likely.
keys = st.one_of(
    st.sampled_from(["a", "b", "ab", "key", "", "😀", "x y", "ÿ", "\0", "k\r\n"]),
    st.text(max_size=8),
)
values = st.text(max_size=12)
contents = st.dictionaries(keys, values, max_size=40)

put_op = st.tuples(st.just("put"), keys, values)
remove_op = st.tuples(st.just("remove"), keys, st.none())
operations = st.lists(st.one_of(put_op, remove_op), max_size=80)


def new_store(shape: tuple[str, int]) -> ShardedStore:
    kind, count = shape
    return make_store(kind, count)


def expected_checksum(pairs: dict[str, str]) -> int:
    return sum(pair_checksum(k, v) for k, v in pairs.items()) % CHECKSUM_MODULUS


def filled(shape: tuple[str, int], pairs: dict[str, str]) -> ShardedStore:
    store = new_store(shape)
    for key, value in pairs.items():
        store.put(key, value)
    return store


def assert_matches(store: ShardedStore, model: dict[str, str]) -> None:
    assert len(store) == len(model)
    assert sorted(store.items()) == sorted(model.items())
    for key, value in model.items():
        assert key in store
        assert store.get(key) == value
    assert store.checksum == expected_checksum(model)
    assert sum(store.shard_len(i) for i in range(store.shard_count)) == len(model)


# -- construction ------------------------------------------------------------------------
def test_make_store_kinds() -> None:
    sharded = make_store("sharded", 5)
    assert type(sharded) is ShardedStore
    assert sharded.kind == "sharded"
    assert sharded.shard_count == 5
    single = make_store("hash", 16)
    assert isinstance(single, HashStore)
    assert single.kind == "hash"
    assert single.shard_count == 1
    with pytest.raises(ValueError, match="unknown store kind"):
        make_store("btree", 4)
    with pytest.raises(ValueError):
        ShardedStore(0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_empty_store(shape: tuple[str, int]) -> None:
    store = new_store(shape)
    assert len(store) == 0
    assert store.checksum == 0
    assert list(store.items()) == []
    assert store.get("missing") is None
    assert "missing" not in store
    assert all(store.shard_checksum(i) == 0 for i in range(store.shard_count))
    assert all(list(store.shard_chunks(i, 3)) == [] for i in range(store.shard_count))


# -- (a) agrees with a dict ----------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(ops=operations, probes=st.lists(keys, max_size=10))
def test_agrees_with_dict(shape: tuple[str, int], ops: list, probes: list[str]) -> None:
    store = new_store(shape)
    model: dict[str, str] = {}
    for op, key, value in ops:
        if op == "put":
            assert store.put(key, value) == model.get(key)
            model[key] = value
        else:
            assert store.remove(key) == model.pop(key, None)
        assert len(store) == len(model)
    assert_matches(store, model)
    for key in probes:
        assert (key in store) == (key in model)
        assert store.get(key) == model.get(key)


def test_put_and_remove_return_previous_value() -> None:
    store = ShardedStore(4)
    assert store.put("k", "1") is None
    assert store.put("k", "2") == "1"
    assert store.put("k", "") == "2"
    assert store.get("k") == ""
    assert "k" in store  # an empty value is a value
    assert store.remove("k") == ""
    assert store.remove("k") is None
    assert len(store) == 0
    assert store.checksum == 0


# -- (b) order independence ----------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), final=contents, junk=st.lists(st.tuples(keys, values), max_size=20))
def test_checksum_ignores_write_order(
    shape: tuple[str, int], data: st.DataObject, final: dict[str, str], junk: list
) -> None:
    in_order = filled(shape, final)

    # The same final pairs in another order, interleaved with writes later undone.
    pairs = data.draw(st.permutations(list(final.items())), label="order")
    writes = [("final", k, v) for k, v in pairs] + [("junk", k, v) for k, v in junk]
    writes = data.draw(st.permutations(writes), label="interleaving")
    shuffled = new_store(shape)
    junk_keys = set()
    for origin, key, value in writes:
        shuffled.put(key, value)
        if origin == "junk":
            junk_keys.add(key)
    for key in data.draw(st.permutations(sorted(junk_keys)), label="undo order"):
        if key in final:
            shuffled.put(key, final[key])
        else:
            assert shuffled.remove(key) is not None

    assert shuffled.checksum == in_order.checksum == expected_checksum(final)
    assert len(shuffled) == len(in_order) == len(final)
    assert sorted(shuffled.items()) == sorted(final.items())


@settings(max_examples=60, deadline=None)
@given(pairs=contents)
def test_checksum_does_not_depend_on_layout(pairs: dict[str, str]) -> None:
    """Whole-database checksums compare across shard counts (a transfer relies on it)."""
    sums = {filled(shape, pairs).checksum for shape in SHAPES}
    assert sums == {expected_checksum(pairs)}


@settings(max_examples=60, deadline=None)
@given(first=contents, second=contents)
def test_different_contents_give_different_checksums(
    first: dict[str, str], second: dict[str, str]
) -> None:
    if first != second:
        assert filled(("sharded", 4), first).checksum != filled(("sharded", 4), second).checksum


def test_pair_checksum_separates_key_from_value() -> None:
    assert pair_checksum("ab", "c") != pair_checksum("a", "bc")
    assert pair_checksum("", "abc") != pair_checksum("abc", "")
    assert pair_checksum("k", "v") != pair_checksum("v", "k")
    assert pair_checksum("k", "v") == pair_checksum("k", "v")
    assert 0 <= pair_checksum("k", "v") < CHECKSUM_MODULUS
    one = ShardedStore(1)
    one.put("ab", "c")
    other = ShardedStore(1)
    other.put("a", "bc")
    assert one.checksum != other.checksum


def test_checksum_wraps_modulo_2_128() -> None:
    assert combine([]) == 0
    assert combine([CHECKSUM_MODULUS - 1, 1]) == 0
    assert combine([CHECKSUM_MODULUS - 1, 2]) == 1


# -- (c) shard checksums -------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_checksum_is_combine_of_shards(shape: tuple[str, int], ops: list) -> None:
    store = new_store(shape)
    model: dict[str, str] = {}
    for op, key, value in ops:
        if op == "put":
            store.put(key, value)
            model[key] = value
        else:
            store.remove(key)
            model.pop(key, None)
    shard_sums = [store.shard_checksum(i) for i in range(store.shard_count)]
    assert store.checksum == combine(shard_sums)
    for index in range(store.shard_count):
        mine = {k: v for k, v in model.items() if shard_of(k, store.shard_count) == index}
        assert store.shard_checksum(index) == expected_checksum(mine)
        assert store.shard_len(index) == len(mine)


# -- (d) chunks ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(pairs=contents, chunk_size=st.integers(1, 50))
def test_shard_chunks_cover_each_shard_once(
    shape: tuple[str, int], pairs: dict[str, str], chunk_size: int
) -> None:
    store = filled(shape, pairs)
    seen: list[tuple[str, str]] = []
    for index in range(store.shard_count):
        chunks = list(store.shard_chunks(index, chunk_size))
        assert all(0 < len(chunk) <= chunk_size for chunk in chunks)
        # Only the last chunk of a shard may be short.
        assert all(len(chunk) == chunk_size for chunk in chunks[:-1])
        flat = [pair for chunk in chunks for pair in chunk]
        assert len(flat) == store.shard_len(index)
        assert all(shard_of(key, store.shard_count) == index for key, _ in flat)
        seen.extend(flat)
    assert len(seen) == len(pairs)
    assert dict(seen) == pairs


# -- (e) load_chunk ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(pairs=contents, chunk_size=st.integers(1, 20))
def test_load_chunk_matches_put(
    shape: tuple[str, int], pairs: dict[str, str], chunk_size: int
) -> None:
    source = filled(shape, pairs)
    loaded = new_store(shape)
    for index in range(source.shard_count):
        for chunk in source.shard_chunks(index, chunk_size):
            loaded.load_chunk(index, chunk)
    assert loaded.checksum == source.checksum
    assert len(loaded) == len(source)
    for index in range(source.shard_count):
        assert loaded.shard_checksum(index) == source.shard_checksum(index)
        assert loaded.shard_len(index) == source.shard_len(index)
    assert_matches(loaded, pairs)

    # Loading the same pairs again overwrites: nothing changes.
    for index in range(source.shard_count):
        for chunk in source.shard_chunks(index, chunk_size):
            loaded.load_chunk(index, chunk)
    assert_matches(loaded, pairs)


def test_load_chunk_overwrites_with_new_values() -> None:
    store = ShardedStore(1)
    store.load_chunk(0, [("a", "1"), ("b", "2")])
    store.load_chunk(0, [("a", "3"), ("a", "4")])
    assert_matches(store, {"a": "4", "b": "2"})


# -- (e') load_pairs: a base's chunks at start ---------------------------------------------
def flat_of(pairs: list[tuple[str, str]]) -> list[str]:
    return [item for pair in pairs for item in pair]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=60, deadline=None)
@given(pairs=contents, chunk_size=st.integers(1, 20), by_shard=st.booleans())
def test_load_pairs_matches_put(
    shape: tuple[str, int], pairs: dict[str, str], chunk_size: int, by_shard: bool
) -> None:
    """Chunks of one shard each (as a base writes them) or of pairs in any order."""
    source = filled(shape, pairs)
    if by_shard:
        chunks = [
            chunk
            for index in range(source.shard_count)
            for chunk in source.shard_chunks(index, chunk_size)
        ]
    else:
        items = list(pairs.items())
        chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    loaded = new_store(shape)
    for chunk in chunks:
        loaded.load_pairs(flat_of(chunk))
    assert_matches(loaded, pairs)
    assert loaded.memory_bytes == source.memory_bytes
    for index in range(source.shard_count):
        assert loaded.shard_checksum(index) == source.shard_checksum(index)

    # Pairs already there are overwritten, and the sums counted again.
    for chunk in chunks:
        loaded.load_pairs(flat_of([(key, value + "!") for key, value in chunk]))
    changed = {key: value + "!" for key, value in pairs.items()}
    assert_matches(loaded, changed)
    assert loaded.memory_bytes == filled(shape, changed).memory_bytes


def test_load_pairs_refuses_what_is_not_strings_before_changing_anything() -> None:
    store = ShardedStore(4)
    store.put("kept", "1")
    before = (dict(store.items()), store.checksum, store.memory_bytes)
    with pytest.raises(TypeError):
        store.load_pairs(["a", "1", "b", 2])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        store.load_pairs(["a", "1", "b"])
    store.load_pairs([])
    assert (dict(store.items()), store.checksum, store.memory_bytes) == before


batch_op = st.tuples(keys, st.one_of(st.none(), values))
batch_lists = st.lists(st.lists(batch_op, max_size=12), max_size=8)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=80, deadline=None)
@given(pairs=contents, batches=batch_lists)
def test_apply_all_is_apply_of_each_batch(
    shape: tuple[str, int], pairs: dict[str, str], batches: list[list[tuple[str, str | None]]]
) -> None:
    """Batches of new keys, overwrites, deletes and keys written twice, on any store."""
    ops_lists: list[list[str | None]] = [[item for op in batch for item in op] for batch in batches]
    store, same = filled(shape, pairs), filled(shape, pairs)
    store.apply_all(ops_lists)
    for ops in ops_lists:
        same.apply(ops)
    assert_matches(store, dict(same.items()))
    assert (len(store), store.memory_bytes) == (len(same), same.memory_bytes)
    for index in range(store.shard_count):
        assert store.shard_checksum(index) == same.shard_checksum(index)


def test_apply_all_of_distinct_keys_overwrites_what_was_there() -> None:
    store, same = ShardedStore(4), ShardedStore(4)
    for target in (store, same):
        target.apply(["kept", "1", "there", "old", "é", "ü"])
    batch: list[str | None] = ["new", "x", "there", "newer", "é", "", "😀", "\0"]
    store.apply_all([batch])
    same.apply(batch)
    assert dict(store.items()) == dict(same.items())
    assert (store.checksum, len(store), store.memory_bytes) == (
        same.checksum,
        len(same),
        same.memory_bytes,
    )


# -- (f) clear -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=40, deadline=None)
@given(pairs=contents)
def test_clear(shape: tuple[str, int], pairs: dict[str, str]) -> None:
    store = filled(shape, pairs)
    store.clear()
    assert_matches(store, {})
    assert store.checksum == 0
    assert all(store.shard_checksum(i) == 0 for i in range(store.shard_count))

    # Still usable afterwards.
    for key, value in pairs.items():
        store.put(key, value)
    assert_matches(store, pairs)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@settings(max_examples=40, deadline=None)
@given(ours=contents, theirs=contents)
def test_take_pairs_of_another_store(shape, ours: dict[str, str], theirs: dict[str, str]) -> None:
    store, other = filled(shape, ours), filled(shape, theirs)
    expected = (other.checksum, other.memory_bytes)
    old = store.take_pairs_of(other)
    assert_matches(store, theirs)
    assert (store.checksum, store.memory_bytes) == expected
    assert_matches(other, {})  # left empty, and still usable
    assert dict(pair for shard in old for pair in shard.items()) == ours
    released = store.release()
    assert_matches(store, {})
    assert store.memory_bytes == 0
    assert dict(pair for shard in released for pair in shard.items()) == theirs


def test_take_pairs_of_needs_the_same_layout() -> None:
    with pytest.raises(ValueError, match="layouts"):
        ShardedStore(4).take_pairs_of(ShardedStore(8))


# -- shard_of ------------------------------------------------------------------------------
# Both servers must place a key in the same shard, whatever their hash seeds and versions:
# changing these numbers breaks transfers between old and new servers.
KNOWN_SHARDS = {"a": 15, "key": 3, "user:42": 10, "😀": 14, "": 2}


def test_shard_of_known_values() -> None:
    assert {key: shard_of(key, 16) for key in KNOWN_SHARDS} == KNOWN_SHARDS
    assert shard_of("key", 7) == 5
    assert all(shard_of(key, 1) == 0 for key in KNOWN_SHARDS)


@settings(max_examples=100, deadline=None)
@given(key=st.text(), count=st.integers(1, 64))
def test_shard_of_in_range(key: str, count: int) -> None:
    assert 0 <= shard_of(key, count) < count
    assert shard_of(key, count) == shard_of(key, count)


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_shard_of_ignores_pythonhashseed(seed: str) -> None:
    script = (
        "from pbkv.store import shard_of\n"
        f"print(' '.join(str(shard_of(k, 16)) for k in {list(KNOWN_SHARDS)!a}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert [int(n) for n in result.stdout.split()] == list(KNOWN_SHARDS.values())


@pytest.mark.parametrize("shards", [1, 4])
def test_lookup_gives_each_keys_value_and_shard(shards: int) -> None:
    store = ShardedStore(shards)
    store.apply(["kept", "1", "there", "old"])
    keys = ["a", "there", "emoji 😀", "kept"]
    values, indices = store.lookup(keys)
    assert values == [None, "old", None, "1"]
    assert indices == store.shards_of(keys) == [shard_of(key, shards) for key in keys]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=4),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=8),
    st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3)), max_size=10),
)
def test_add_absent_writes_a_pair_only_where_its_key_holds_no_value(shards, held, pairs) -> None:
    store, model = ShardedStore(shards), ShardedStore(shards)
    for target in (store, model):
        target.apply([item for pair in held.items() for item in pair])
    ops: list[str | None] = [item for pair in pairs for item in pair]
    keys: list[str] = ops[0::2]  # type: ignore[assignment]
    left = store.add_absent(ops, store.shards_of(keys))
    expected_left = []
    for number, (key, value) in enumerate(pairs):
        if model.get(key) is None:
            model.put(key, value)
        else:
            expected_left.append(number)
    assert left == expected_left
    assert without_pairs(ops, left) == [
        item for number, pair in enumerate(pairs) if number not in left for item in pair
    ]
    assert dict(store.items()) == dict(model.items())
    assert (store.checksum, len(store), store.memory_bytes) == (
        model.checksum,
        len(model),
        model.memory_bytes,
    )
