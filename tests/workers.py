"""Functions run in child processes by the multi-process tests (importable under spawn)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import mmstore


def pattern(seed: int, n: int, dtype: Any = np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def put_one(path: str, name: str, seed: int, n: int) -> None:
    with mmstore.Store(path) as store:
        store.put(name, pattern(seed, n), attrs={"seed": seed})


def delete_one(path: str, name: str) -> None:
    with mmstore.Store(path) as store:
        store.delete(name)


def put_then_hang_holding_the_lock(path: str, name: str, value: int, committed: Any) -> None:
    """Put ``name`` but stop before releasing its writer lock (the test SIGKILLs us there):
    the commit is done, its change counter still odd."""
    from mmstore import _locks

    def hang(self: Any) -> None:
        committed.set()
        time.sleep(3600)

    store = mmstore.Store(path)  # (its recovery takes and releases locks: patch after it)
    _locks.DatasetLock.release = hang  # type: ignore[method-assign]
    store.put(name, np.full(4, value, dtype=np.int64))


def get_and_report(path: str, name: str, queue: Any) -> None:
    with mmstore.Store(path, "r") as store:
        array = store.get(name)
        queue.put((array.dtype.str, array.shape, array.tobytes(), store.attrs(name)))


def replace_many(path: str, name: str, count: int, started: Any, n: int, pack_small: bool = False) -> None:
    """Replace ``name`` ``count`` times; value k is the constant array k."""
    with mmstore.Store(path, pack_small=pack_small) as store:
        for k in range(1, count + 1):
            store.put(name, np.full(n, k, dtype=np.int64))
            if k == 1:
                started.set()


def put_many(path: str, writer: int, count: int, barrier: Any, pack_small: bool = False) -> None:
    """One of several concurrent writers: its own names plus one shared name."""
    with mmstore.Store(path, pack_small=pack_small) as store:
        barrier.wait()
        for i in range(count):
            store.put(f"w{writer}/d{i}", np.full(16, writer * 1000 + i, dtype=np.int64))
            store.put("shared", np.full(16, writer * 1000 + i, dtype=np.int64), attrs={"writer": writer})


def put_forever(path: str, name: str, n: int, ready: Any) -> None:
    """Keep replacing ``name`` with constant arrays until killed (crash tests)."""
    store = mmstore.Store(path)
    k = int(store.attrs(name)["k"]) if name in store else 0
    while True:
        k += 1
        store.put(name, np.full(n, k, dtype=np.int64), attrs={"k": k})
        ready.set()


def hold_lock(path: str, name: str, locked: Any, release: Any) -> None:
    """Hold a dataset's writer lock (as a writer handle would) until told to release."""
    store = mmstore.Store(path)
    lock = store._lock(name)
    lock.acquire(10)
    locked.set()
    release.wait(120)
    lock.release()
    store.close()


def rss_after_get(path: str, name: str, queue: Any) -> None:
    """Report RSS (bytes) before and after get() + summing one row."""

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    store = mmstore.Store(path, "r")
    before = rss()
    start = time.perf_counter()
    array = store.get(name)
    total = float(array[len(array) // 2].sum())
    elapsed = time.perf_counter() - start
    after = rss()
    queue.put((before, after, total, array.shape, elapsed))


TICK = np.dtype([("seq", "<u8"), ("value", "<f8"), ("check", "<u8")])


def ticks(start: int, count: int) -> np.ndarray:
    rows = np.zeros(count, TICK)
    rows["seq"] = np.arange(start, start + count, dtype=np.uint64)
    rows["value"] = rows["seq"] * 0.5
    rows["check"] = rows["seq"] * np.uint64(2654435761) + np.uint64(12345)
    return rows


def follow_rows(path: str, name: str, total: int, ready: Any, results: Any) -> None:
    """Follow ``name`` until ``total`` rows were seen; report what was seen."""
    with mmstore.Store(path, "r") as store, store.open_reader(name) as reader:
        ready.set()
        expected = 0
        blocks = 0
        problems = 0
        for block in reader.follow(idle_timeout=120):
            blocks += 1
            seq = block["seq"]
            problems += int((seq != np.arange(expected, expected + len(block), dtype=np.uint64)).sum())
            problems += int((block["check"] != seq * np.uint64(2654435761) + np.uint64(12345)).sum())
            expected += len(block)
            if expected >= total:
                break
        results.put((expected, blocks, problems))


def wait_for_rows(path: str, name: str, min_length: int, waiting: Any, results: Any) -> None:
    with mmstore.Store(path, "r") as store, store.open_reader(name) as reader:
        waiting.set()
        woke = reader.wait(min_length, timeout=120)
        results.put((woke, len(reader), reader.array["seq"].tolist()[-3:]))


def hold_writer(path: str, name: str, opened: Any, release: Any) -> None:
    with mmstore.Store(path) as store, store.open_writer(name) as writer:
        writer.append(ticks(len(writer), 5))
        opened.set()
        release.wait(120)


def export_forever(path: str, out: str, started: Any) -> None:
    """Export the store again and again until killed (crash test for compact)."""
    store = mmstore.Store(path, "r")
    started.set()
    while True:
        mmstore.export_hdf5(store, out)


def memo_worker(path: str, log: str, keys: list[int], barrier: Any, results: Any) -> None:
    """Call a memoized function on overlapping keys; log every real computation."""
    cache = mmstore.Cache(path)

    @cache.memoize
    def expensive(k: int, scale: np.ndarray) -> np.ndarray:
        with open(log, "a") as out:  # one O_APPEND line per real computation
            out.write(f"{k}\n")
        time.sleep(0.01)  # widen the window in which others miss the same key
        return np.arange(1000, dtype=np.float64) * k + scale

    barrier.wait()
    digests = {}
    for k in keys:
        value = expensive(k, np.ones(1000))
        digests[k] = (value.tobytes() == (np.arange(1000, dtype=np.float64) * k + 1).tobytes(), value.flags.writeable)
    results.put(digests)


def fill_cache(path: str, max_bytes: int, seed: int, count: int, barrier: Any) -> None:
    rng = np.random.default_rng(seed)
    cache = mmstore.Cache(path, max_bytes=max_bytes)
    barrier.wait()
    for i in range(count):
        size = int(rng.integers(1, 40_000))
        cache.set(f"{seed}-{i}", np.zeros(size, np.uint8))
        if i % 3 == 0:
            cache.get(f"{seed}-{i // 2}")


def watch_cache(path: str, max_bytes: int, stop: Any, results: Any) -> None:
    """Observe the committed bytes of the cache until told to stop; report the maximum."""
    store = mmstore.Store(path, "r")
    cache_bytes = 0
    highest = 0
    observations = 0
    while not stop.is_set():
        total = 0
        for name in store.keys("e"):
            try:
                total += int(store.header(name).attrs.get("nbytes", 0))
            except mmstore.MmstoreError:
                continue
        highest = max(highest, total)
        cache_bytes = max(cache_bytes, mmstore.Cache(path).stats()["bytes"]) if observations % 10 == 0 else cache_bytes
        observations += 1
    results.put((highest, cache_bytes, observations))


def slow_compute(path: str, started: Any) -> None:
    """Start computing a key and hang (the test kills us mid-compute)."""
    cache = mmstore.Cache(path)

    def compute() -> np.ndarray:
        started.set()
        time.sleep(3600)
        return np.zeros(1)

    cache.get_or_compute("slow", compute)


def compute_after_wait(path: str, results: Any) -> None:
    cache = mmstore.Cache(path, lock_timeout=120)
    value = cache.get_or_compute("slow", lambda: np.full(3, 7.0))
    results.put(value.tolist())


def lock_stress(path: str, rounds: int, barrier: Any, results: Any) -> None:
    """Take the writer lock of one dataset ``rounds`` times; detect overlap two ways."""
    store = mmstore.Store(path, timeout=120)
    marker = os.path.join(path, "inside.marker")
    counter = os.path.join(path, "counter.txt")
    overlaps = 0
    barrier.wait()
    for _ in range(rounds):
        with store.open_writer("x") as writer:
            # Way 1: an O_EXCL marker file that only one holder can create.
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                overlaps += 1
                fd = -1
            # Way 2: a read-modify-write counter that loses updates under overlap,
            # plus the dataset itself, edited in place through the writer handle.
            with open(counter) as handle:
                value = int(handle.read())
            with open(counter, "w") as handle:
                handle.write(str(value + 1))
            writer[0] = writer[0] + 1
            if fd >= 0:
                os.close(fd)
                os.unlink(marker)
    store.close()
    results.put(overlaps)


def cache_reader_rounds(path: str, rounds: int, ready: Any, changed: Any, seen: Any, results: Any) -> None:
    """Keep hitting one key; after each change is announced, the next get must show it."""
    cache = mmstore.Cache(path)
    stale = 0
    for round_ in range(rounds):
        for _ in range(200):  # warm the hit path (no system call once hot)
            cache.get("k")
        ready.set()
        assert changed.wait(120)
        changed.clear()
        value = cache.get("k")
        expected = round_ + 1
        if expected % 5 == 0:
            stale += value is not None  # that round deleted the key
        elif value is None or int(value[0]) != expected:
            stale += 1
        seen.set()
    results.put(stale)


def model_reader(connection: Any) -> None:
    """tests/test_model.py's second process: answers ("read", store) with every dataset's
    (dtype, shape, bytes, attrs) through a read-only Store kept open between requests."""
    stores: dict[str, mmstore.Store] = {}
    while True:
        request = connection.recv()
        if request is None:
            break
        command, path = request
        try:
            if command == "forget":
                store = stores.pop(path, None)
                if store is not None:
                    store.close()
                connection.send("ok")
                continue
            store = stores.get(path) or stores.setdefault(path, mmstore.Store(path, "r"))
            seen = {}
            for name in store:
                array = store.get(name)
                seen[name] = (array.dtype.str, array.shape, array.tobytes(), store.attrs(name))
            connection.send(seen)
        except Exception as exc:  # reported to the test, which fails with it
            connection.send(("error", repr(exc)))
    for store in stores.values():
        store.close()


def export_pausing(path: str, out: str, after: str, reached: Any, release: Any, timeout: float) -> None:
    """Export the store, pausing once dataset ``after`` is written (the temp file then holds it)
    until ``release`` is set: where a test kills the exporter or races a second export."""
    store = mmstore.Store(path, "r")

    def pause(name: str, done: int, total: int) -> None:
        if name == after and done == total:
            reached.set()
            if not release.wait(timeout):
                raise TimeoutError("the test never released the paused export")

    mmstore.export_hdf5(store, out, progress=pause)


def cache_counts_without_close(path: str) -> None:
    """One miss and two hits, then exit without closing the cache (its counts must still show)."""
    cache = mmstore.Cache(path)
    cache.get("nope")
    cache.set("k", np.zeros(1))
    cache.get("k")
    cache.get("k")


def edit_in_place_many(path: str, name: str, sessions: int, started: Any) -> None:
    """Open a writer on ``name``, change element 0 to k, close; for k = 1..sessions."""
    with mmstore.Store(path, pack_small=True) as store:
        for k in range(1, sessions + 1):
            with store.open_writer(name) as writer:
                writer[0] = k
            if k == 1:
                started.set()


def open_writer_and_report(path: str, name: str, results: Any) -> None:
    """Open ``name``'s writer (waiting at most 10 s) and report its length, or the error's type."""
    with mmstore.Store(path, timeout=10) as store:
        try:
            with store.open_writer(name) as writer:
                results.put(len(writer))
        except mmstore.MmstoreError as exc:
            results.put(type(exc).__name__)


def set_large_pausing_before_commit(path: str, key: str, value: float, paused: Any, go: Any) -> None:
    """Set ``key`` to a 2.4 MB array (written as a part outside the cache lock), pausing after
    its part is written and before its marker is committed, until ``go`` is set (crash tests
    SIGKILL us there instead)."""
    from mmstore import _cache

    commit = _cache.Cache._commit_entry

    def pausing(self: Any, name: str, array: np.ndarray, attrs: dict[str, Any]) -> Any:
        paused.set()
        if not go.wait(120):
            raise TimeoutError("the test never let the paused set commit")
        return commit(self, name, array, attrs)

    _cache.Cache._commit_entry = pausing  # type: ignore[method-assign]
    with mmstore.Cache(path) as cache:
        cache.set(key, np.full(300_000, value))


def large_value(k: int, n: int = 300_000) -> np.ndarray:
    """Value k of a large cache key (2.4 MB by default: written as a part): element 0 is k."""
    return np.arange(n, dtype=np.float64) * 3.0 + k


def read_large_while_replaced(path: str, key: str, ready: Any, done: Any, results: Any) -> None:
    """Hold the arrays of ``key`` (a large_value) read while another process replaces and
    deletes it, checking each bit-exact as read; once ``done`` (every part and directory of
    them is gone by then), check every held one again. Reports (reads, held, problems)."""
    held: dict[int, np.ndarray] = {}
    problems = reads = 0
    with mmstore.Cache(path) as cache:
        first = cache.get(key)
        held[int(first[0])] = first
        ready.set()
        while not done.is_set():
            value = cache.get(key)
            reads += 1
            if value is None:
                continue  # deleted at this instant
            k = int(value[0])
            problems += not np.array_equal(value, large_value(k))
            if k not in held and len(held) < 64:
                held[k] = value
        problems += sum(not np.array_equal(array, large_value(k)) for k, array in held.items())
    results.put((reads, len(held), problems))
