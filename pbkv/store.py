"""The in-memory database: a map of str to str with an always-current checksum.

Two implementations share one interface:

* ``ShardedStore`` splits keys over N dicts by a stable hash of the key.  The
  shard is also the unit of a full transfer and of the warm-start rule "this
  part of the key space has arrived, so a miss there is certain".
* ``HashStore`` is one dict; for transfers it is a single shard.

Callers need no locks: pbkv runs every store operation on the one event loop
that owns the store (the Redis way), so each call is atomic.

The checksum is order independent: the sum, modulo 2**128, of xxh3_128 over
each (key, value) pair.  Adding and removing a pair adjusts it in O(1), so two
databases compare in O(1) and a transfer can be verified shard by shard.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import xxhash

from pbkv.idempotency import IdempotencyTable

CHECKSUM_MODULUS = 1 << 128
_MASK = CHECKSUM_MODULUS - 1
# 0xFF never occurs in UTF-8, so "key 0xFF value" is unambiguous.
_SEPARATOR = b"\xff"

# Approximate bytes a pair costs beyond its characters: two str headers and a
# dict entry with its share of the table (CPython 3.11, 64-bit).
PAIR_OVERHEAD = 140

_pair_digest = xxhash.xxh3_128_intdigest
_key_digest = xxhash.xxh3_64_intdigest


def pair_checksum(key: str, value: str) -> int:
    """The checksum contribution of one pair."""
    return _pair_digest(key.encode() + _SEPARATOR + value.encode())


def shard_of(key: str, shard_count: int) -> int:
    """Stable across processes (unlike ``hash()``), so both servers agree."""
    if shard_count == 1:
        return 0
    return _key_digest(key.encode()) % shard_count


def combine(checksums: Iterable[int]) -> int:
    return sum(checksums) & _MASK


class ShardedStore:
    """N dicts, each with its own running checksum."""

    kind = "sharded"

    def __init__(self, shard_count: int = 16) -> None:
        if shard_count < 1:
            raise ValueError("shard_count must be at least 1")
        self.shard_count = shard_count
        self._shards: list[dict[str, str]] = [{} for _ in range(shard_count)]
        self._sums: list[int] = [0] * shard_count
        self._size = 0
        self._memory = 0  # approximate bytes held: characters plus PAIR_OVERHEAD per pair
        # The remembered replies of keyed writes: replicated and transferred with the pairs.
        self.idempotency = IdempotencyTable()

    # -- reads ---------------------------------------------------------------
    def get(self, key: str) -> str | None:
        return self._shards[shard_of(key, self.shard_count)].get(key)

    def lookup(self, keys: list[str]) -> tuple[list[str | None], list[int]]:
        """Each key's value (None: absent) and shard: a bulk load's chunk in upsert mode
        checks its keys at once, and ``add_absent`` then reuses the shards."""
        shards = self._shards
        if self.shard_count == 1:
            return list(map(shards[0].get, keys)), [0] * len(keys)
        # map() chains: the loops run in C (a load looks up every key it writes).
        indices = self.shards_of(keys)
        return list(map(dict.get, map(shards.__getitem__, indices), keys)), indices

    def shards_of(self, keys: list[str]) -> list[int]:
        """The shard of each key (``shard_of``, in a C loop)."""
        return self._indices_of(map(str.encode, keys), len(keys))

    def add_absent(self, ops: list[str | None], indices: list[int]) -> list[int]:
        """Write each of the first ``len(indices)`` pairs of ``ops`` (``indices``: their
        keys' shards) whose key holds no value, and leave a key that holds one as it
        is: a bulk load's chunk, each key looked up once, by the write itself.  Returns
        the numbers of the pairs left out (none when every key was new).  The values
        must be strings; the digests are taken in C loops."""
        count = len(indices)
        keys: list[str] = ops[0 : 2 * count : 2]  # type: ignore[assignment]  # even: keys
        values: list[str] = ops[1 : 2 * count : 2]  # type: ignore[assignment]  # str here
        shards = self._shards
        held = sum(map(len, shards))
        left: list[int] = []
        for number in range(count):
            shard = shards[indices[number]]
            size = len(shard)
            shard.setdefault(keys[number], values[number])
            if len(shard) == size:
                left.append(number)
        if left:
            keys, values = _pairs_kept(keys, left), _pairs_kept(values, left)
            indices = _pairs_kept(indices, left)
        encoded = zip(map(str.encode, keys), map(str.encode, values), strict=True)
        digests = map(_pair_digest, map(_SEPARATOR.join, encoded))
        sums = self._sums
        for index, digest in zip(indices, digests, strict=True):
            sums[index] += digest
        self._count_added(held, len(keys), sum(map(len, keys)) + sum(map(len, values)))
        return left

    def _count_added(self, held: int, count: int, chars: int) -> None:
        """``count`` new pairs of ``chars`` characters were stored (``held`` pairs
        before) and their digests added to the sums: the sums back to their modulus,
        the size and memory counted; or, should a key have been there already (what
        it held is gone from the sums), everything counted again."""
        if sum(map(len, self._shards)) - held != count:
            self._recount()
            return
        sums = self._sums
        for index, total in enumerate(sums):
            sums[index] = total & _MASK
        self._size += count
        self._memory += chars + PAIR_OVERHEAD * count

    def _recount(self) -> None:
        """The sums, size and memory counted again from the pairs."""
        self._sums = [
            combine(itertools.starmap(pair_checksum, shard.items())) for shard in self._shards
        ]
        self._size = sum(map(len, self._shards))
        self._memory = sum(_memory_of(shard.items()) for shard in self._shards)

    def __contains__(self, key: str) -> bool:
        return key in self._shards[shard_of(key, self.shard_count)]

    def __len__(self) -> int:
        return self._size

    @property
    def checksum(self) -> int:
        """Of the pairs and of the idempotency table (0 when it is empty)."""
        return (sum(self._sums) + self.idempotency.checksum) & _MASK

    @property
    def pairs_checksum(self) -> int:
        return combine(self._sums)

    def shard_checksum(self, shard: int) -> int:
        return self._sums[shard] & _MASK

    def shard_len(self, shard: int) -> int:
        return len(self._shards[shard])

    @property
    def memory_bytes(self) -> int:
        """Approximate memory held by the pairs and the idempotency table, kept current
        in O(1) per write."""
        return self._memory + self.idempotency.memory

    def shard_copy(self, shard: int) -> dict[str, str]:
        """A copy of one shard's pairs (a dump's snapshot of that shard)."""
        return self._shards[shard].copy()

    def items(self) -> Iterator[tuple[str, str]]:
        for shard in self._shards:
            yield from shard.items()

    def shard_chunks(
        self, shard: int, chunk_size: int, max_chars: int = 1 << 62
    ) -> Iterator[list[tuple[str, str]]]:
        """The pairs of one shard in lists of at most ``chunk_size`` pairs, each closed
        once its keys and values pass ``max_chars`` characters.

        The caller must not write to the store while iterating (a transfer
        runs in a stage that refuses writes).
        """
        chunk: list[tuple[str, str]] = []
        chars = 0
        for pair in self._shards[shard].items():
            chunk.append(pair)
            chars += len(pair[0]) + len(pair[1])
            if len(chunk) >= chunk_size or chars >= max_chars:
                yield chunk
                chunk = []
                chars = 0
        if chunk:
            yield chunk

    def copy(self) -> ShardedStore:
        """A copy of the pairs and the table as of now, for a follower's snapshot (a
        dict copy per shard: about 60 ms per million pairs here, on the loop, so it is
        consistent with the seq it is taken at)."""
        store = self.empty_like()
        store._shards = [shard.copy() for shard in self._shards]
        store._sums = list(self._sums)
        store._size, store._memory = self._size, self._memory
        store.idempotency = self.idempotency.copy()
        return store

    def empty_like(self) -> ShardedStore:
        """A new empty store of the same kind and layout (and table bounds)."""
        store = type(self)(self.shard_count)
        store.idempotency = self.idempotency.empty_like()
        return store

    # -- writes --------------------------------------------------------------
    def put(self, key: str, value: str) -> str | None:
        """Insert or overwrite; returns the previous value."""
        index = shard_of(key, self.shard_count)
        shard = self._shards[index]
        old = shard.get(key)
        delta = pair_checksum(key, value)
        if old is None:
            self._size += 1
            self._memory += len(key) + len(value) + PAIR_OVERHEAD
        else:
            delta -= pair_checksum(key, old)
            self._memory += len(value) - len(old)
        shard[key] = value
        self._sums[index] = (self._sums[index] + delta) & _MASK
        return old

    def remove(self, key: str) -> str | None:
        """Delete if present; returns the removed value."""
        index = shard_of(key, self.shard_count)
        old = self._shards[index].pop(key, None)
        if old is not None:
            self._size -= 1
            self._memory -= len(key) + len(old) + PAIR_OVERHEAD
            self._sums[index] = (self._sums[index] - pair_checksum(key, old)) & _MASK
        return old

    def write(self, key: str, value: str | None) -> None:
        """Upsert, or delete when ``value`` is None."""
        if value is None:
            self.remove(key)
        else:
            self.put(key, value)

    def apply(self, ops: Sequence[str | None]) -> None:
        """A replicated batch: key, value-or-None, key, ... in order."""
        self._apply(ops, None)

    def apply_recording(self, ops: list[str | None]) -> list[str | None]:
        """``apply``, returning each key's previous value (None: absent), for an undo."""
        olds: list[str | None] = []
        self._apply(ops, olds)
        return olds

    def _apply(self, ops: Sequence[str | None], olds: list[str | None] | None) -> None:
        """``put`` and ``remove`` inlined, each old value added to ``olds`` (when given):
        a bulk load's batches make this both servers' busiest loop (each key is encoded
        once, for its shard and its checksum, and the sums are reduced once a batch)."""
        shards, sums, count = self._shards, self._sums, self.shard_count
        key_digest, pair_digest, separator = _key_digest, _pair_digest, _SEPARATOR
        record = None if olds is None else olds.append
        size = memory = 0
        for i in range(0, len(ops), 2):
            key: str = ops[i]  # type: ignore[assignment]  # even slots hold keys
            value = ops[i + 1]
            encoded = key.encode()
            index = key_digest(encoded) % count if count > 1 else 0
            shard = shards[index]
            if value is None:
                old = shard.pop(key, None)
                if old is not None:
                    size -= 1
                    memory -= len(key) + len(old) + PAIR_OVERHEAD
                    sums[index] -= pair_digest(encoded + separator + old.encode())
            else:
                # One dict operation for a new key (the common case of a load).
                held = len(shard)
                old = shard.setdefault(key, value)
                delta = pair_digest(encoded + separator + value.encode())
                if len(shard) != held:
                    old = None
                    size += 1
                    memory += len(key) + len(value) + PAIR_OVERHEAD
                else:
                    shard[key] = value
                    delta -= pair_digest(encoded + separator + old.encode())
                    memory += len(value) - len(old)
                sums[index] += delta
            if record is not None:
                record(old)
        for index, total in enumerate(sums):
            sums[index] = total & _MASK
        self._size += size
        self._memory += memory

    def undo(self, ops: Sequence[str | None], olds: Sequence[str | None]) -> None:
        """Reverse ``apply_recording(ops)``: each key back to its old value, newest first."""
        write = self.write
        for i in range(len(olds) - 1, -1, -1):
            write(ops[2 * i], olds[i])  # type: ignore[arg-type]  # even slots hold keys (str)

    def release(self) -> list[dict[str, str]]:
        """Empty the store without freeing its pairs: returns the shards that hold
        them, for the caller to drop one at a time (dropping millions of pairs at
        once takes the loop a second or more)."""
        shards = self._shards
        self._shards = [{} for _ in range(self.shard_count)]
        self._sums = [0] * self.shard_count
        self._size = 0
        self._memory = 0
        self.idempotency.clear()
        return shards

    def take_pairs_of(self, other: ShardedStore) -> list[dict[str, str]]:
        """Hold ``other``'s pairs in place of ours, leaving ``other`` empty; returns
        our old shards, as ``release`` does. The store stays the same object, so a
        dump under way goes on with the new pairs from the next shard it reaches."""
        if other.shard_count != self.shard_count:
            raise ValueError("stores of different layouts")
        old = self._shards
        self._shards, self._sums = other._shards, other._sums
        self._size, self._memory = other._size, other._memory
        self.idempotency.take_from(other.idempotency)
        other.release()
        return old

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()
        self._sums = [0] * self.shard_count
        self._size = 0
        self._memory = 0
        self.idempotency.clear()

    def load_pairs(self, flat: list[str]) -> None:
        """Add the pairs of ``flat`` (key, value, key, value, ...): a base's chunk, read
        at start.  The hashing runs in C loops (``map``), and a chunk whose keys all
        fall in one shard (a base is written shard by shard) goes in with one
        ``dict.update``.  Raises TypeError, before changing anything, when an item is
        not a str; should a key be there already, the sums are counted again."""
        if len(flat) % 2:
            raise ValueError("flat holds key, value pairs")
        if not flat:
            return
        encoded = list(map(str.encode, flat))  # TypeError: not a str
        count = len(flat) // 2
        indices = self._indices_of(itertools.islice(encoded, 0, None, 2), count)
        both = iter(encoded)  # zip(both, both): (key, value) pairs
        digests = list(map(_pair_digest, map(_SEPARATOR.join, zip(both, both, strict=True))))
        shards, sums = self._shards, self._sums
        held = sum(map(len, shards))
        first = indices[0]
        items = iter(flat)
        if indices.count(first) == count:
            shards[first].update(zip(items, items, strict=True))
            sums[first] += sum(digests)
        else:
            for index, key, value, digest in zip(indices, items, items, digests, strict=True):
                shards[index][key] = value
                sums[index] += digest
        self._count_added(held, count, sum(map(len, flat)))

    def apply_all(self, batches: Iterable[list[str | None]]) -> None:
        """``apply`` of each batch in turn (a restart's batches after its base); a batch
        that writes distinct keys and deletes none has its hashing done in C loops."""
        for ops in batches:
            keys: list[str] = ops[0::2]  # type: ignore[assignment]  # even slots hold keys
            values = ops[1::2]
            if None in values or len(set(keys)) != len(keys):
                self.apply(ops)  # deletes, or a key written twice: one write at a time
            else:
                self._put_distinct(keys, values)  # type: ignore[arg-type]  # no None

    def _put_distinct(self, keys: list[str], values: list[str]) -> None:
        """``put`` of each pair, the keys all different."""
        count = len(keys)
        encoded = list(map(str.encode, keys))
        indices = self._indices_of(encoded, count)
        shards, sums = self._shards, self._sums
        targets = list(map(shards.__getitem__, indices))
        olds = list(map(dict.get, targets, keys))
        collections.deque(map(dict.__setitem__, targets, keys, values), maxlen=0)
        pairs = zip(encoded, map(str.encode, values), strict=True)
        for index, digest in zip(
            indices, map(_pair_digest, map(_SEPARATOR.join, pairs)), strict=True
        ):
            sums[index] += digest
        added = olds.count(None)
        memory = sum(map(len, keys)) + sum(map(len, values)) + PAIR_OVERHEAD * count
        if added != count:  # overwrites: the pairs they replace leave the sums
            for index, key, encoded_key, old in zip(indices, keys, encoded, olds, strict=True):
                if old is not None:
                    sums[index] -= _pair_digest(encoded_key + _SEPARATOR + old.encode())
                    memory -= len(key) + len(old) + PAIR_OVERHEAD
        for index, total in enumerate(sums):
            sums[index] = total & _MASK
        self._size += added
        self._memory += memory

    def _indices_of(self, encoded_keys: Iterable[bytes], count: int) -> list[int]:
        """The shard of each of ``count`` encoded keys (``shard_of``, in a C loop)."""
        if self.shard_count == 1:
            return [0] * count
        return list(map(self.shard_count.__rmod__, map(_key_digest, encoded_keys)))

    def load_chunk(self, shard: int, pairs: Iterable[tuple[str, str]]) -> None:
        """Add pairs received for ``shard`` during a transfer."""
        target = self._shards[shard]
        total = self._sums[shard]
        added = 0
        memory = 0
        for key, value in pairs:
            old = target.get(key)
            if old is None:
                added += 1
                memory += len(key) + len(value) + PAIR_OVERHEAD
            else:
                total -= pair_checksum(key, old)
                memory += len(value) - len(old)
            target[key] = value
            total += pair_checksum(key, value)
        self._sums[shard] = total & _MASK
        self._size += added
        self._memory += memory


class HashStore(ShardedStore):
    """A single hash map: the sharded store with one shard."""

    kind = "hash"

    def __init__(self, shard_count: int = 1) -> None:
        super().__init__(1)


def _pairs_kept(items: list[Any], left: list[int]) -> list[Any]:
    """``items`` without those at the positions in ``left``."""
    skip = set(left)
    return [item for number, item in enumerate(items) if number not in skip]


def without_pairs(ops: list[Any], left: list[int]) -> list[Any]:
    """``ops`` (key, value, ...) without the pairs numbered in ``left``."""
    skip = set(left)
    kept: list[Any] = []
    for number in range(len(ops) // 2):
        if number not in skip:
            kept.append(ops[2 * number])
            kept.append(ops[2 * number + 1])
    return kept


def _memory_of(pairs: Iterable[tuple[str, str]]) -> int:
    return sum(len(key) + len(value) + PAIR_OVERHEAD for key, value in pairs)


def make_store(kind: str, shard_count: int) -> ShardedStore:
    if kind == "sharded":
        return ShardedStore(shard_count)
    if kind == "hash":
        return HashStore()
    raise ValueError(f"unknown store kind {kind!r} (expected 'sharded' or 'hash')")
