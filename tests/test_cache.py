"""mmstore.Cache: values, memoize keys, TTL, LRU bound, stampedes, with real processes."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, collect_results, store_files


@pytest.fixture
def cache(tmp_path: Path):
    with mmstore.Cache(tmp_path / "cache") as opened:
        yield opened


def test_values_round_trip(cache: mmstore.Cache) -> None:
    cache.set("a", np.arange(5))
    got = cache.get("a")
    assert got.tolist() == [0, 1, 2, 3, 4] and not got.flags.writeable
    cache.set("t", (np.ones(2), np.float32(1.5), 3))
    first, second, third = cache.get("t")
    assert first.tolist() == [1, 1] and second == np.float32(1.5) and third == 3
    cache.set("l", [np.zeros(1)])
    assert isinstance(cache.get("l"), list)
    cache.set("d", {"x": np.arange(2), "y": np.int64(4)})
    assert cache.get("d")["x"].tolist() == [0, 1] and cache.get("d")["y"] == 4
    cache.set("j", {"not": "arrays"}) if False else cache.set("j", 42)
    assert cache.get("j") == 42
    cache.set(b"bytes-key", np.zeros(1))
    assert b"bytes-key" in cache and "bytes-key" not in cache
    assert cache.get("missing") is None and cache.get("missing", 7) == 7
    assert len(cache) == 6
    assert cache.delete("a") and not cache.delete("a") and "a" not in cache
    assert cache.clear() == 5 and len(cache) == 0
    with pytest.raises(TypeError):
        cache.set("bad", object())
    with pytest.raises(mmstore.ArgumentTypeError):
        cache.get(object())  # a key with no canonical value


def test_keys_of_any_value_memoize_can_key(cache: mmstore.Cache) -> None:
    keys = [42, ("model", 3), np.int64(7), 1.5, None, ("a", (1, 2.0)), [1, 2], np.arange(3)]
    for index, key in enumerate(keys):
        cache.set(key, np.full(2, index))
    for index, key in enumerate(keys):
        assert key in cache and cache.get(key).tolist() == [index, index]
    assert cache.get("42") is None and cache.get(b"42") is None  # a str, a bytes and an int differ
    assert cache.get(7) is None and cache.get(7.0) is None  # equal in Python, different keys here
    cache.set(1, np.zeros(1))
    assert cache.get(True) is None and cache.get(1.0) is None and cache.get(np.int64(1)) is None
    assert cache.get(("model", 4)) is None
    assert len(cache) == len(keys) + 1


def test_stats_count_one_hit_or_miss_per_call(cache: mmstore.Cache) -> None:
    calls = []

    @cache.memoize
    def f(x: np.ndarray, k: int) -> np.ndarray:
        calls.append(k)
        return x * k

    f(np.arange(10.0), 3)
    assert {k: cache.stats()[k] for k in ("hits", "misses")} == {"hits": 0, "misses": 1}
    f(np.arange(10.0), 3)
    assert {k: cache.stats()[k] for k in ("hits", "misses")} == {"hits": 1, "misses": 1}
    cache.get("absent")
    cache.get_or_compute("k", lambda: np.zeros(1))
    cache.get("k")
    assert {k: cache.stats()[k] for k in ("hits", "misses")} == {"hits": 2, "misses": 3}
    assert calls == [3]


def test_non_finite_float_results_are_cached(cache: mmstore.Cache) -> None:
    """Strict JSON has no NaN or infinity: such a result is cached all the same, and comes
    back as a Python float (a memoized function returning NaN is computed once)."""
    calls = []

    @cache.memoize
    def ratio(x: float) -> float:
        calls.append(x)
        return math.inf if x else math.nan

    for _ in range(3):
        assert math.isnan(ratio(0.0)) and ratio(1.0) == math.inf
    assert calls == [0.0, 1.0]
    cache.set("neg", float("-inf"))
    value = cache.get("neg")
    assert type(value) is float and value == -math.inf


def test_ttl_must_be_positive_per_entry_too(cache: mmstore.Cache) -> None:
    """A bad ttl is refused wherever it is given, before any computation: a memoized
    function with ttl=0 must not silently run on every call."""
    for ttl in (0, -1, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="ttl must be a positive"):
            cache.set("k", np.zeros(1), ttl=ttl)
        with pytest.raises(ValueError, match="ttl must be a positive"):
            cache.get_or_compute("k", lambda: np.zeros(1), ttl=ttl)
        with pytest.raises(ValueError, match="ttl must be a positive"):
            cache.memoize(ttl=ttl)
    assert "k" not in cache
    cache.set("k", np.zeros(1), ttl=np.int64(60))


def test_expired_entries_are_not_counted(cache: mmstore.Cache) -> None:
    cache.set("t", np.ones(100), ttl=0.05)
    cache.set("keep", np.ones(1))
    deadline = time.time() + 0.05
    while time.time() < deadline + 0.01:  # wait out the TTL (a clock, not a guess at scheduling)
        time.sleep(0.01)
    assert "t" not in cache and cache.get("t") is None
    assert len(cache) == 1
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["bytes"] == 8


def test_ttl_expiry_is_exact(cache: mmstore.Cache) -> None:
    cache.set("short", np.zeros(1), ttl=0.2)
    cache.set("long", np.zeros(1))
    assert "short" in cache
    deadline = time.time() + 0.2
    while time.time() < deadline:
        time.sleep(0.05)
    assert "short" not in cache and cache.get("short") is None
    assert "long" in cache


def test_default_ttl(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c", ttl=0.1) as cache:
        cache.set("k", np.zeros(1))
        time.sleep(0.15)
        assert cache.get("k") is None


def test_memoize_keys_by_value(cache: mmstore.Cache) -> None:
    calls = []

    @cache.memoize
    def f(x: np.ndarray, k: int = 1) -> np.ndarray:
        calls.append((x.dtype.str, x.shape, k))
        return x * k

    a = np.arange(6.0)
    f(a)
    f(a.copy())  # same value: a hit
    f(a.reshape(2, 3))  # same bytes, other shape: a miss
    f(a.astype(np.float32))  # other dtype: a miss
    f(a, k=2)
    f(a, 2)  # the same call, bound to the signature: a hit
    f(a, k=1)  # k's default, as f(a) above: a hit
    assert len(calls) == 4
    assert not f(a).flags.writeable
    with pytest.raises(TypeError, match="cannot make a cache key"):
        f(object())

    @cache.memoize(key=lambda x, label: label, version=2)
    def g(x: object, label: str) -> np.ndarray:
        return np.full(2, len(label))

    assert g(object(), "abc").tolist() == [3, 3]
    assert g.key_for(None, "abc") != f.key_for(a)


def test_memoize_keys_of_keyword_and_positional_calls_never_collide(cache: mmstore.Cache) -> None:
    """f(1, 2, k=3) and f((1, 2), {"k": 3}) are different calls: neither gets the other's
    result. Calls that bind to the same arguments (defaults applied) share one."""
    calls = []

    @cache.memoize
    def f(*args: Any, **kwargs: Any) -> np.ndarray:
        calls.append((args, kwargs))
        return np.array([len(args), len(kwargs)])

    assert f(1, 2, k=3).tolist() == [2, 1]
    assert f((1, 2), {"k": 3}).tolist() == [2, 0]
    assert f(1, 2, k=3).tolist() == [2, 1] and len(calls) == 2

    @cache.memoize
    def g(x: int, k: int = 3, *, scale: float = 1.0) -> np.ndarray:
        calls.append((x, k, scale))
        return np.array([x, k, scale])

    for call in (lambda: g(1), lambda: g(1, 3), lambda: g(1, k=3), lambda: g(x=1), lambda: g(1, scale=1.0)):
        assert call().tolist() == [1, 3, 1.0]
    assert g(1, 4).tolist() == [1, 4, 1.0] and g(1, scale=2.0).tolist() == [1, 3, 2.0]
    assert len(calls) == 5
    assert g.key_for(1, 3) != g.key_for((1, 3))
    from mmstore import _keys

    positional = cache.memoize(lambda x, k=3: np.array([x, k]))
    assert positional.key_for(1, 3).endswith(":" + _keys.digest((1, 3)))  # by position: the key it always had
    assert positional.key_for(1) == positional.key_for(x=1, k=3) == positional.key_for(1, 3)
    sentinel = object()

    @cache.memoize
    def h(x: int, option: object = sentinel) -> np.ndarray:  # a default with no canonical value
        return np.array([x])

    assert h(2).tolist() == [2] and h(x=2).tolist() == [2]
    with pytest.raises(TypeError, match="cannot make a cache key"):
        h(2, sentinel)


def test_memoize_keys_records_whose_fields_are_out_of_order(cache: mmstore.Cache) -> None:
    """A record dtype whose fields lie out of order in memory (offsets [4, 0]) has no
    NumPy descr: such an argument is keyed all the same, apart from the in-order layout."""
    reordered = np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]})
    in_order = np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 4]})
    calls = []

    @cache.memoize
    def total(x: np.ndarray) -> np.ndarray:
        calls.append(x.dtype)
        return np.asarray(x["a"].sum() * 10 + x["b"].sum())

    values = np.zeros(3, reordered)
    values["a"], values["b"] = 1, 2
    assert int(total(values)) == 36 and int(total(values.copy())) == 36
    assert int(total(values.view(in_order))) == 63  # the same bytes, other fields: another key
    assert len(calls) == 2
    nested = np.dtype([("r", reordered), ("c", "<f8")])
    length = cache.memoize(lambda x: np.asarray(len(x)), version="nested")
    assert int(length(np.zeros(2, [("a", nested), ("b", "<i2")]))) == 2
    assert length.key_for(np.zeros(1, nested)) != length.key_for(np.zeros(1, [("r", in_order), ("c", "<f8")]))


def test_memoize_returns_tuples_and_dicts(cache: mmstore.Cache) -> None:
    @cache.memoize
    def stats(x: np.ndarray) -> tuple[np.ndarray, np.float64]:
        return x.cumsum(), x.sum()

    for _ in range(2):
        cumulative, total = stats(np.arange(4))
        assert cumulative.tolist() == [0, 1, 3, 6] and total == 6


def test_python_scalars_inside_results_keep_their_types(cache: mmstore.Cache) -> None:
    """A result (arr, 3, 2.5, True ...) comes back with Python ints, floats, bools, str and
    None on every path (the computing call, a hit, another handle), NumPy scalars as NumPy
    scalars; an int too large for int64 is cached too."""
    calls = []

    @cache.memoize
    def mixed(n: int) -> tuple[Any, ...]:
        calls.append(n)
        return (np.arange(n), n, 2.5, True, None, "text", 2**70, math.nan, np.float32(1.5))

    expected_types = [np.ndarray, int, float, bool, type(None), str, int, float, np.float32]
    with mmstore.Cache(cache.path) as other:
        for value in (mixed(3), mixed(3), mixed(3), other.get(mixed.key_for(3))):
            assert [type(item) for item in value] == expected_types
            assert value[1:4] == (3, 2.5, True) and value[3] is True and value[6] == 2**70
            assert math.isnan(value[7]) and value[8] == np.float32(1.5)
    assert calls == [3]
    cache.set("d", {"flag": False, "n": 7, "x": np.arange(2)})
    got = cache.get("d")
    assert got["flag"] is False and type(got["n"]) is int and got["x"].tolist() == [0, 1]
    cache.set("l", [1, 2.0])
    assert [type(item) for item in cache.get("l")] == [int, float]


def test_memoize_raises_for_results_it_cannot_cache(tmp_path: Path) -> None:
    """Only a result too large for the cache is handed back uncached; one that cannot be
    stored (an object array, alone or in a tuple) raises as cache.set does, not silently."""
    calls = []
    with mmstore.Cache(tmp_path / "c", max_bytes=1000) as cache:

        @cache.memoize
        def result(kind: str) -> Any:
            calls.append(kind)
            if kind == "large":
                return np.zeros(2000, np.uint8)
            objects = np.array([1, "a"], dtype=object)
            return objects if kind == "objects" else (np.zeros(2), objects)

        for kind in ("objects", "tuple"):
            with pytest.raises(mmstore.UnsupportedDtypeError, match="holds Python objects"):
                result(kind)
            with pytest.raises(mmstore.UnsupportedDtypeError):
                cache.set("k", result.__wrapped__(kind))
        assert len(result("large")) == 2000 and len(result("large")) == 2000
        assert calls == ["objects", "objects", "tuple", "tuple", "large", "large"]  # (set got __wrapped__)
        assert len(cache) == 0 and list(cache.store.keys("p")) == []


def test_lru_eviction_and_byte_bound(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c", max_bytes=3000) as cache:
        cache.set("a", np.zeros(1000, np.uint8))
        time.sleep(0.002)
        cache.set("b", np.zeros(1000, np.uint8))
        time.sleep(0.002)
        cache.set("c", np.zeros(1000, np.uint8))
        time.sleep(0.002)
        held = cache.get("a")  # "a" is now the most recently used; a reader holds it
        cache.set("d", np.zeros(1000, np.uint8))
        assert "b" not in cache and "a" in cache and "c" in cache and "d" in cache
        assert cache.stats()["bytes"] <= 3000 and cache.stats()["evictions"] == 1
        cache.set("e", np.zeros(2500, np.uint8))
        assert cache.stats()["bytes"] <= 3000
        assert held.sum() == 0 and len(held) == 1000  # evicted or not, the reader's map stays valid
        with pytest.raises(ValueError, match="cannot fit"):
            cache.set("huge", np.zeros(4000, np.uint8))
        assert cache.resync() <= 3000


def test_cache_cli(tmp_path: Path) -> None:
    from tests.test_cli import mmstore_cli

    with mmstore.Cache(tmp_path / "c", max_bytes=2**20) as cache:
        cache.set("k", np.zeros(10))
    shown = mmstore_cli("cache", "info", str(tmp_path / "c")).stdout
    # (max_bytes belongs to each handle, not to the cache: the CLI's would read "None")
    assert b"entries: 1" in shown and b"max_bytes" not in shown
    mmstore_cli("cache", "clear", str(tmp_path / "c"))
    with mmstore.Cache(tmp_path / "c") as cache:
        assert len(cache) == 0
    result = mmstore_cli("cache", "info", str(tmp_path / "nope"), check=False)
    assert result.returncode == 1 and not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_eight_processes_compute_each_key_exactly_once(tmp_path: Path, spawn) -> None:
    path, log = str(tmp_path / "cache"), str(tmp_path / "computations.log")
    barrier, results = spawn.Barrier(8), spawn.Queue()
    key_sets = [[(w + i) % 12 for i in range(8)] for w in range(8)]  # heavy overlap
    processes = [
        spawn.Process(target=workers.memo_worker, args=(path, log, keys, barrier, results)) for keys in key_sets
    ]
    for process in processes:
        process.start()
    outcomes = collect_results(processes, results)
    computed = Path(log).read_text().split()
    assert sorted(computed, key=int) == [str(k) for k in range(12)], "each key computed exactly once"
    for outcome in outcomes:
        assert all(correct and not writeable for correct, writeable in outcome.values())


@pytest.mark.slow
def test_size_bound_holds_under_concurrent_inserts(tmp_path: Path, spawn) -> None:
    path, max_bytes = str(tmp_path / "cache"), 200_000
    mmstore.Cache(path, max_bytes=max_bytes).close()
    barrier, stop, results = spawn.Barrier(4), spawn.Event(), spawn.Queue()
    watcher = spawn.Process(target=workers.watch_cache, args=(path, max_bytes, stop, results))
    watcher.start()
    fillers = [spawn.Process(target=workers.fill_cache, args=(path, max_bytes, s, 60, barrier)) for s in range(4)]
    for process in fillers:
        process.start()
    for process in fillers:
        process.join(PROCESS_TIMEOUT)
        assert process.exitcode == 0
    stop.set()
    highest, reserved, observations = results.get(timeout=PROCESS_TIMEOUT)
    watcher.join(PROCESS_TIMEOUT)
    assert observations > 0
    assert highest <= max_bytes and reserved <= max_bytes
    with mmstore.Cache(path, max_bytes=max_bytes) as cache:
        stats = cache.stats()
        assert stats["evictions"] > 0 and stats["bytes"] <= max_bytes
        assert cache.resync() <= max_bytes


@pytest.mark.slow
def test_killed_computer_does_not_block_others(tmp_path: Path, spawn) -> None:
    path = str(tmp_path / "cache")
    mmstore.Cache(path).close()
    started, results = spawn.Event(), spawn.Queue()
    computer = spawn.Process(target=workers.slow_compute, args=(path, started))
    computer.start()
    assert started.wait(PROCESS_TIMEOUT)
    waiter = spawn.Process(target=workers.compute_after_wait, args=(path, results))
    waiter.start()
    computer.kill()  # SIGKILL mid-compute: its compute lock dies with it
    computer.join(PROCESS_TIMEOUT)
    assert results.get(timeout=PROCESS_TIMEOUT) == [7.0, 7.0, 7.0]
    waiter.join(PROCESS_TIMEOUT)
    assert waiter.exitcode == 0
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


LOW_FD_SCRIPT = """
import resource, sys, tempfile
import numpy as np
import mmstore
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
root = sys.argv[1]
cache = mmstore.Cache(root + "/one")
f = cache.memoize(lambda i: np.zeros(2) + i)
for i in range(1500):  # many distinct misses: compute locks and datasets must not pile up descriptors
    assert f(i)[0] == i
caches = [mmstore.Cache(root + f"/many{j}") for j in range(4)]
for c in caches:  # several caches in one process share one descriptor budget
    for i in range(150):
        c.set(f"k{i}", np.zeros(1))
        assert c.get(f"k{i}") is not None
print("OK")
"""


def test_many_keys_and_caches_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", LOW_FD_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_memoize_keys_ignore_main_versus_mp_main(cache: mmstore.Cache) -> None:
    def f(x: int) -> np.ndarray:
        return np.zeros(x)

    f.__module__ = "__main__"
    g_key = cache.memoize(f).key_for(3)
    f.__module__ = "__mp_main__"
    assert cache.memoize(f).key_for(3) == g_key


@pytest.mark.slow
def test_hits_are_never_stale_after_another_process_changes_the_key(tmp_path: Path, spawn) -> None:
    path, rounds = str(tmp_path / "cache"), 30
    with mmstore.Cache(path) as cache:
        cache.set("k", np.full(4, 0))
        ready, changed, seen, results = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
        reader = spawn.Process(target=workers.cache_reader_rounds, args=(path, rounds, ready, changed, seen, results))
        reader.start()
        for round_ in range(1, rounds + 1):
            assert ready.wait(PROCESS_TIMEOUT)
            ready.clear()
            if round_ % 5 == 0:
                cache.delete("k")
            else:
                cache.set("k", np.full(4, round_))  # same size, so the sidecar looks alike
            changed.set()
            assert seen.wait(PROCESS_TIMEOUT)
            seen.clear()
        assert results.get(timeout=PROCESS_TIMEOUT) == 0
        reader.join(PROCESS_TIMEOUT)
        assert reader.exitcode == 0


def test_two_handles_see_each_others_changes(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c") as first, mmstore.Cache(tmp_path / "c") as second:
        first.set("k", np.full(4, 1))
        for _ in range(3):
            assert second.get("k")[0] == 1  # hot in the second handle now
        first.set("k", np.full(4, 2))
        assert second.get("k")[0] == 2
        first.delete("k")
        assert second.get("k") is None
        first.set("k", (np.full(2, 3), 4))
        value = second.get("k")
        assert value[0][0] == 3 and value[1] == 4
        mutable = second.get("k")
        assert isinstance(mutable, tuple)
        first.set("l", [np.zeros(1)])
        got = second.get("l")
        got.append("mine")  # a caller's container is its own
        assert len(second.get("l")) == 1


def test_another_processes_counts_show_after_it_exits(tmp_path: Path, spawn: Any) -> None:
    path = str(tmp_path / "cache")
    child = spawn.Process(target=workers.cache_counts_without_close, args=(path,))
    child.start()
    child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0
    with mmstore.Cache(path) as cache:
        stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)


# --- deterministic interleavings of two writers (children pause at the racy point) ---


class _ReportingLock:
    """A cache lock that reports a contended acquire (then waits for it as usual)."""

    def __init__(self, lock: Any, contended: threading.Event) -> None:
        self.lock = lock
        self.contended = contended

    def acquire(self, timeout: float) -> None:
        if not self.lock.try_acquire():
            self.contended.set()
            self.lock.acquire(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lock, name)


def _set_pausing_in_change(path: str, paused: Any, go: Any) -> None:
    """Child: set "k", pausing between the read and the write of its first change-counter bump."""
    cache = mmstore.Cache(path)
    counters = cache._changes

    class PausingCounters:
        first = True

        def __getitem__(self, slot: int) -> int:
            value = counters[slot]
            if self.first:
                self.first = False
                paused.set()
                assert go.wait(PROCESS_TIMEOUT)
            return value

        def __setitem__(self, slot: int, value: int) -> None:
            counters[slot] = value

    cache._changes = PausingCounters()
    cache.set("k", np.full(4, 2))
    cache.close()


def test_change_counter_bumps_are_atomic_across_processes(tmp_path: Path, spawn: Any) -> None:
    """A writer paused between reading and writing the key's change counter while another
    process completes a set must not bring the counter back to a value a reader has seen
    (the reader would keep serving its stale in-memory value)."""
    path = str(tmp_path / "cache")
    with mmstore.Cache(path) as writer, mmstore.Cache(path) as reader:
        writer.set("k", np.full(4, 0))
        assert reader.get("k")[0] == 0
        paused, go = spawn.Event(), spawn.Event()
        child = spawn.Process(target=_set_pausing_in_change, args=(path, paused, go))
        child.start()
        assert paused.wait(PROCESS_TIMEOUT)  # the child has read the counter, not written it
        progressed, done = threading.Event(), threading.Event()
        writer._lock = _ReportingLock(writer._lock, progressed)

        def set_in_thread() -> None:
            writer.set("k", np.full(4, 1))
            done.set()
            progressed.set()

        thread = threading.Thread(target=set_in_thread)
        thread.start()
        assert progressed.wait(PROCESS_TIMEOUT)  # our set is done, or waits for the child's lock
        if done.is_set():
            assert reader.get("k")[0] == 1  # hot again, with the counter our set left
        go.set()
        thread.join(PROCESS_TIMEOUT)
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0 and done.is_set()
        with mmstore.Cache(path) as fresh:
            committed = int(fresh.get("k")[0])
        assert int(reader.get("k")[0]) == committed


def _set_pausing_before_reserve(path: str, max_bytes: int, paused: Any, go: Any) -> None:
    """Child: set "K" small, pausing just before it reserves its bytes."""
    from mmstore import _cache

    reserve = _cache.Cache._reserve

    def pausing(self: Any, nbytes: int) -> None:
        paused.set()
        assert go.wait(PROCESS_TIMEOUT)
        reserve(self, nbytes)

    _cache.Cache._reserve = pausing  # type: ignore[method-assign]
    with mmstore.Cache(path, max_bytes=max_bytes) as cache:
        cache.set("K", np.zeros(8, np.uint8))


def _committed_bytes(path: str) -> int:
    store = mmstore.Store(path, "r")
    try:
        return sum(int(store.attrs(name).get("nbytes", 0)) for name in store.keys("e"))
    finally:
        store.close()


def test_two_processes_replacing_one_key_release_its_bytes_once(tmp_path: Path, spawn: Any) -> None:
    """Two processes set the same key at once: the replaced entry's bytes are released once,
    so the byte count matches the committed entries and the bound holds afterwards."""
    path, max_bytes = str(tmp_path / "cache"), 2000
    with mmstore.Cache(path, max_bytes=max_bytes) as cache:
        cache.set("L", np.zeros(900, np.uint8))
        cache.set("K", np.zeros(1000, np.uint8))
        paused, go = spawn.Event(), spawn.Event()
        child = spawn.Process(target=_set_pausing_before_reserve, args=(path, max_bytes, paused, go))
        child.start()
        assert paused.wait(PROCESS_TIMEOUT)  # the child has seen the 1000-byte "K"
        cache.set("K", np.zeros(8, np.uint8))
        go.set()
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
        assert cache.stats()["bytes"] == _committed_bytes(path) == 908
        cache.set("M", np.zeros(1500, np.uint8))
        assert _committed_bytes(path) <= max_bytes
        assert cache.stats()["bytes"] == _committed_bytes(path)


def test_large_arrays_are_committed_through_a_part(tmp_path: Path) -> None:
    """An array over the direct-commit size is written as a part outside the cache lock;
    it comes back the same, read-only, and its bytes are counted and released once."""
    with mmstore.Cache(tmp_path / "c", max_bytes=8 << 20) as cache, mmstore.Cache(tmp_path / "c") as other:
        big = np.arange((2 << 20) // 8, dtype=np.int64)
        cache.set("big", big)
        for handle in (cache, other, cache):
            got = handle.get("big")
            assert np.array_equal(got, big) and not got.flags.writeable
        cache.set("big", big[:10])
        assert cache.stats()["bytes"] == 80 and other.get("big").tolist() == list(range(10))
        cache.set("big", big)
        assert cache.delete("big") and cache.stats()["bytes"] == 0
        assert list(cache.store.keys("p")) == []


def test_memoize_keys_a_wrapped_function_by_the_wrapper_s_own_signature(cache: mmstore.Cache) -> None:
    # functools.wraps sets __wrapped__; binding a call to the inner function's signature
    # applied its defaults, which the wrapper overrides: f(2) and f(2, scale=1) shared a key.
    import functools

    def scale_ten_by_default(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(x: int, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("scale", 10)
            return func(x, *args, **kwargs)

        return wrapper

    @cache.memoize
    @scale_ten_by_default
    def scaled(x: int, scale: int = 1) -> np.ndarray:
        return np.array(x * scale)

    assert int(scaled(2, scale=1)) == 2
    assert int(scaled(2)) == 20
    assert int(scaled(2, scale=1)) == 2


def test_a_get_racing_the_replace_of_a_large_array_sees_the_old_or_the_new(tmp_path: Path) -> None:
    # An array over 1 MiB is a marker entry plus a part; a replacing set() deletes the old
    # part after its commit. A get that read the old marker found its part gone and
    # returned the default, although the key was there all along.
    old, new = np.full(300_000, 1.0), np.full(300_000, 2.0)  # 2.4 MB each
    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        cache.set("k", old)
        real_get = cache.store.get
        replaced: list[bool] = []

        def get_after_a_replace(name: str, *default: Any) -> Any:
            if name.startswith("p/") and not replaced:  # between our reading the marker and its part
                replaced.append(True)
                other.set("k", new)
            return real_get(name, *default)

        cache.store.get = get_after_a_replace  # type: ignore[method-assign]
        value = cache.get("k", "DEFAULT")
        assert replaced == [True]
        assert isinstance(value, np.ndarray) and (value == 2.0).all()


def test_a_set_that_times_out_at_its_commit_leaves_no_part_behind(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c", timeout=0.2) as cache, mmstore.Cache(tmp_path / "c") as other:
        real_put = cache.store.put

        def put_then_lose_the_lock(name: str, *args: Any, **kwargs: Any) -> None:
            real_put(name, *args, **kwargs)
            if name.startswith("p/"):  # the part is written: another process takes the cache lock
                other._lock.acquire(10)

        cache.store.put = put_then_lose_the_lock  # type: ignore[method-assign]
        try:
            with pytest.raises(mmstore.LockTimeout):
                cache.set("k", np.zeros(300_000))
        finally:
            other._lock.release()
        assert cache.store.keys("p") == []  # the part of the failed set is gone
        assert _part_directories(tmp_path / "c") == []  # and its directory
        assert "k" not in cache


def test_nested_computations_in_two_threads_never_wait_on_each_other(tmp_path: Path) -> None:
    # Thread A computes key a (holding a's compute stripe) and needs key b; thread B
    # computes key c, whose stripe is b's, and needs key d, whose stripe is a's. Each held
    # a stripe while waiting for the other's: both stalled for lock_timeout, then one
    # raised LockTimeout (across processes alike). A nested computation now takes its
    # stripe only if it is free, else computes without it.
    with mmstore.Cache(tmp_path / "c", lock_timeout=5) as cache:

        def stripe(key: str) -> int:
            return int(cache._locate(key)[0][-8:], 16) % 4096

        def find(wanted: int, exclude: set[str]) -> str:
            return next(k for k in (f"k{i}" for i in range(10**6)) if stripe(k) == wanted and k not in exclude)

        a, b = "a", "b"
        c = find(stripe(b), {a, b})
        d = find(stripe(a), {a, b, c})
        both_inside = threading.Barrier(2, timeout=PROCESS_TIMEOUT)
        results: dict[str, Any] = {}

        def outer(key: str, inner: str) -> None:
            def compute() -> np.ndarray:
                both_inside.wait()  # each holds its outer stripe now
                return cache.get_or_compute(inner, lambda: np.array([1.0])) + 1

            try:
                results[key] = cache.get_or_compute(key, compute)
            except BaseException as exc:
                results[key] = exc

        threads = [threading.Thread(target=outer, args=(a, b)), threading.Thread(target=outer, args=(c, d))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PROCESS_TIMEOUT)
        assert [results[a].tolist(), results[c].tolist()] == [[2.0], [2.0]], results
        assert cache.get(b).tolist() == [1.0] and cache.get(d).tolist() == [1.0]


def _liveness_files(path: str) -> list[str]:
    """The part directories' liveness files left in a cache (a set holds one only while it writes)."""
    return [name for name in store_files(Path(path)) if name.endswith("/.writing")]


def _kill_a_set_before_its_commit(
    spawn: Any, path: str, cache: mmstore.Cache, while_alive: Callable[[], Any]
) -> list[str]:
    """Start a process setting "lost" to a 2.4 MB array, SIGKILL it once its part is written
    and before its marker is committed; return the part it left. ``while_alive`` runs
    while it is paused there, and (as each sweep must) leaves its part alone."""
    before = set(cache.store.keys("p"))
    paused, go = spawn.Event(), spawn.Event()
    child = spawn.Process(target=workers.set_large_pausing_before_commit, args=(path, "lost", 2.0, paused, go))
    child.start()
    try:
        assert paused.wait(PROCESS_TIMEOUT)
        lost = sorted(set(cache.store.keys("p")) - before)
        assert len(lost) == 1
        while_alive()
        assert sorted(set(cache.store.keys("p")) - before) == lost  # its writer is alive: kept
    finally:
        child.kill()
        child.join(PROCESS_TIMEOUT)
    assert child.exitcode == -9
    return lost


@pytest.mark.parametrize("sweep", ["resync", "reopen"])
def test_parts_of_a_set_killed_before_its_commit_are_swept(tmp_path: Path, spawn: Any, sweep: str) -> None:
    # A set killed between writing a large value's part and committing its marker left the
    # part for good: eviction and resync() only walk the entries, and none names it.
    path = str(tmp_path / "cache")
    with mmstore.Cache(path) as cache:
        kept = np.full(300_000, 1.0)
        cache.set("kept", kept)
        kept_parts = cache.store.keys("p")
        lost = _kill_a_set_before_its_commit(spawn, path, cache, lambda: (cache.resync(), mmstore.Cache(path).close()))
        assert lost[0] in cache.store.keys("p")
        if sweep == "resync":
            assert cache.resync() == kept.nbytes
        else:
            mmstore.Cache(path).close()  # opening for writing sweeps, as the store's recovery does
        assert cache.store.keys("p") == kept_parts and _liveness_files(path) == []
        assert "lost" not in cache and np.array_equal(cache.get("kept"), kept)
        _check_part_directories(path, cache)  # the killed set's directory is gone too


def test_parts_of_a_killed_set_are_swept_when_eviction_cannot_make_room(tmp_path: Path, spawn: Any) -> None:
    path, max_bytes = str(tmp_path / "cache"), 5 << 20
    with mmstore.Cache(path, max_bytes=max_bytes) as cache:
        # (no resync() while it is alive: that would forget the bytes it reserved)
        lost = _kill_a_set_before_its_commit(spawn, path, cache, lambda: mmstore.Cache(path).close())
        big = np.full(375_000, 3.0)  # 3 MB: with the killed set's 2.4 MB still reserved, over the bound
        cache.set("big", big)
        assert lost[0] not in cache.store.keys("p") and len(cache.store.keys("p")) == 1
        assert np.array_equal(cache.get("big"), big) and cache.stats()["bytes"] == big.nbytes
        assert _liveness_files(path) == []
        _check_part_directories(path, cache)


def test_parts_left_by_a_delete_killed_before_deleting_them_are_swept(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c") as cache:
        cache.set("t", (np.arange(3), np.full(300_000, 1.0)))
        cache.set("k", np.full(300_000, 2.0))
        name, _slot = cache._locate("t")
        assert cache._remove_entry(name) is not None  # what a delete killed before its parts leaves
        assert len(cache.store.keys("p")) == 3
        assert cache.resync() == 2_400_000
        assert len(cache.store.keys("p")) == 1 and np.array_equal(cache.get("k"), np.full(300_000, 2.0))
        _check_part_directories(tmp_path / "c", cache)


def test_a_set_racing_clear_in_another_process_keeps_its_parts(tmp_path: Path, spawn: Any) -> None:
    # clear() deleted every part, those of a set in flight too: the set then committed a
    # marker naming nothing, which read as a miss but counted in len() and in the bytes.
    path = str(tmp_path / "cache")
    with mmstore.Cache(path) as cache:
        cache.set("old", np.full(300_000, 1.0))
        paused, go = spawn.Event(), spawn.Event()
        child = spawn.Process(target=workers.set_large_pausing_before_commit, args=(path, "new", 2.0, paused, go))
        child.start()
        try:
            assert paused.wait(PROCESS_TIMEOUT)  # its part is written, its marker not committed
            assert cache.clear() == 1
        finally:
            go.set()
            child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
        value = cache.get("new")
        assert isinstance(value, np.ndarray) and (value == 2.0).all() and "old" not in cache
        assert len(cache) == 1 and cache.stats()["bytes"] == value.nbytes == _committed_bytes(path)
        assert len(cache.store.keys("p")) == 1 and _liveness_files(path) == []
        _check_part_directories(path, cache)


def test_a_set_racing_clear_in_this_process_keeps_its_parts(tmp_path: Path) -> None:
    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        other.set("old", (np.zeros(2), 1))
        commit = cache._commit_entry

        def clear_first(name: str, array: np.ndarray, attrs: dict[str, Any]) -> Any:
            assert other.clear() == 1  # between the parts and the marker of our set
            return commit(name, array, attrs)

        cache._commit_entry = clear_first  # type: ignore[method-assign]
        cache.set("t", (np.arange(3), np.full(300_000, 2.0), "x"))
        value = other.get("t", "MISSING")
        assert value != "MISSING", "the marker names parts that clear() deleted"
        small, large, text = value
        assert small.tolist() == [0, 1, 2] and (large == 2.0).all() and text == "x"
        assert len(other) == 1 and other.stats()["bytes"] == _committed_bytes(str(tmp_path / "c"))
        assert len(cache.store.keys("p")) == 2 and _liveness_files(str(tmp_path / "c")) == []
        _check_part_directories(tmp_path / "c", cache)


def _part_directories(path: str | Path) -> list[str]:
    """The part directories ``p/<h2>/<h>/<token>`` of a cache, relative to its root."""
    return sorted(os.path.relpath(d, path) for d in Path(path).glob("p/*/*/*") if d.is_dir())


def _check_part_directories(path: str | Path, cache: mmstore.Cache) -> None:
    """Each part directory is a live entry's and holds exactly its parts' files."""
    named = {}
    for name in cache.store.keys("e"):
        for part in cache.store.attrs(name).get("parts", ()):
            named.setdefault(part.rpartition("/")[0], []).append(part.rpartition("/")[2])
    assert _part_directories(path) == sorted(base for base, parts in named.items() if parts)
    for base, parts in named.items():
        expected = sorted(name for index in parts for name in (f"{index}.json", f".{index}.lock"))
        files = sorted(os.listdir(os.path.join(path, base)))
        assert [name for name in files if not name.endswith(".dat")] == expected
        assert len(files) == len(expected) + len(parts)  # (and one data file per part)


def test_replaced_and_removed_values_leave_no_part_directory_behind(tmp_path: Path) -> None:
    # Deleting a value's parts left their directory and lock files for good: a cache that
    # kept replacing a large value grew by a directory per set, which every open walked.
    path = tmp_path / "c"
    with mmstore.Cache(path) as cache:
        for k in range(20):
            cache.set("big", workers.large_value(k))
            cache.set("t", (np.full(2, k), np.float32(k), "x"))
            cache.set("no arrays", (k, "x"))  # a directory of no parts (none is named)
        assert len(_part_directories(path)) == 2
        _check_part_directories(path, cache)
        assert np.array_equal(cache.get("big"), workers.large_value(19)) and cache.get("no arrays") == (19, "x")
        assert cache.delete("big") and len(_part_directories(path)) == 1
        _check_part_directories(path, cache)
        cache.set("big", workers.large_value(0))
        assert cache.clear() == 3 and _part_directories(path) == []
        assert [name for name in store_files(path) if name.startswith("p/")] == []
    with mmstore.Cache(path, max_bytes=5 << 20) as cache:
        for k in range(6):  # 2.4 MB each: every set from the third evicts the oldest
            cache.set(f"k{k}", workers.large_value(k))
        assert cache.stats()["evictions"] == 4 and len(_part_directories(path)) == len(cache) == 2
        _check_part_directories(path, cache)


def test_a_value_replaced_before_its_set_lets_go_of_its_directory(tmp_path: Path) -> None:
    # Another process may replace (or delete, or evict) a value between its commit and its
    # set's letting go: the replacer then deletes its parts but must leave the directory,
    # held by a live set, to that set.
    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        commit = cache._commit_entry

        def commit_then_be_replaced(name: str, array: np.ndarray, attrs: dict[str, Any]) -> Any:
            old = commit(name, array, attrs)
            other.set("k", workers.large_value(2))
            assert len(_part_directories(tmp_path / "c")) == 2  # ours (parts gone, still held) and other's
            return old

        cache._commit_entry = commit_then_be_replaced  # type: ignore[method-assign]
        cache.set("k", workers.large_value(1))
        assert np.array_equal(cache.get("k"), workers.large_value(2))
        _check_part_directories(tmp_path / "c", cache)
        assert len(_part_directories(tmp_path / "c")) == 1


def test_a_second_deleter_of_the_same_parts_finds_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    from mmstore._cache_values import _delete_parts

    path = tmp_path / "c"
    with mmstore.Cache(path) as cache, mmstore.Cache(path) as other:
        cache.set("k", (workers.large_value(1), np.arange(3)))
        held = other.get("k")  # other's store maps the parts and has their change counters
        name, _slot = cache._locate("k")
        parts = cache.store.attrs(name)["parts"]
        cache.set("k", workers.large_value(2))  # our store's locks of the old parts stay open (parked)
        assert len(_part_directories(path)) == 1
        # A late deleter of parts already gone: through its own parked lock files, and through
        # a store that never locked them. Taking a part's lock recreates its directory.
        _delete_parts(cache.store, parts)
        _delete_parts(other.store, parts)
        assert len(_part_directories(path)) == 1
        assert all(other.store.get(part, None) is None for part in parts)
        _check_part_directories(path, cache)
        assert np.array_equal(held[0], workers.large_value(1)) and held[1].tolist() == [0, 1, 2]
        assert np.array_equal(other.get("k"), workers.large_value(2))


def test_part_directories_left_by_older_versions_or_killed_deleters_are_removed(tmp_path: Path) -> None:
    # What deletes used to leave (lock files), a deleter killed before removing the
    # directory, a dead set's liveness file: removed when the cache opens. A directory
    # holding a file that is not ours stays, as do the <h2> and <h> levels.
    path = tmp_path / "c"
    with mmstore.Cache(path) as cache:
        cache.set("live", workers.large_value(0))
        cache.set("deleted", (np.arange(2), np.arange(3)))
        name, _slot = cache._locate("deleted")
        parts = cache.store.attrs(name)["parts"]
        assert cache._remove_entry(name) is not None
        for part in parts:
            cache.store.delete(part)  # a deleter killed before it removed the directory
    left = Path(path, "p", "ab", "ab" * 16)
    for token, files in {"1" * 16: [".0.lock", ".1.lock"], "2" * 16: [".writing", ".0.lock"], "3" * 16: []}.items():
        (left / token).mkdir(parents=True)
        for file_name in files:
            (left / token / file_name).touch()
    (left / ("4" * 16)).mkdir()
    (left / ("4" * 16) / ".0.lock").touch()
    (left / ("4" * 16) / "notes.txt").touch()
    assert len(_part_directories(path)) == 6
    with mmstore.Cache(path) as cache:
        kept = [f"p/ab/{'ab' * 16}/{'4' * 16}", *_part_directories_of(cache, "live")]
        assert _part_directories(path) == sorted(kept)
        assert left.is_dir() and np.array_equal(cache.get("live"), workers.large_value(0))


def _part_directories_of(cache: mmstore.Cache, key: str) -> list[str]:
    name, _slot = cache._locate(key)
    return sorted({part.rpartition("/")[0] for part in cache.store.attrs(name)["parts"]})


def test_a_sweep_that_removes_a_new_part_directory_makes_its_set_start_over(tmp_path: Path) -> None:
    # A sweep may list a set's new directory before the set creates its liveness file in
    # it, find it empty and remove it: the set must start over, not fail.
    from mmstore import _durable
    from mmstore._cache_values import _sweep_part_sets

    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        make_directories = _durable.make_directories
        swept: list[str] = []

        def make_then_sweep(path: str, permissions: int | None = None) -> None:
            make_directories(path, permissions)
            if "/p/" in path and not swept:
                swept.append(path)
                _sweep_part_sets(other.store)  # finds the new directory empty and removes it

        _durable.make_directories = make_then_sweep  # type: ignore[assignment]
        try:
            cache.set("k", workers.large_value(1))
        finally:
            _durable.make_directories = make_directories  # type: ignore[assignment]
        assert swept and not os.path.exists(swept[0])
        assert np.array_equal(other.get("k"), workers.large_value(1))
        _check_part_directories(tmp_path / "c", cache)


@pytest.mark.slow
def test_a_reader_keeps_its_arrays_while_another_process_replaces_and_deletes_them(tmp_path: Path, spawn: Any) -> None:
    path = str(tmp_path / "cache")
    with mmstore.Cache(path) as cache:
        cache.set("big", workers.large_value(0))
        ready, done, results = spawn.Event(), spawn.Event(), spawn.Queue()
        reader = spawn.Process(target=workers.read_large_while_replaced, args=(path, "big", ready, done, results))
        reader.start()
        try:
            assert ready.wait(PROCESS_TIMEOUT)  # it holds value 0
            for k in range(1, 121):
                if k % 10 == 0:
                    assert cache.delete("big")
                cache.set("big", workers.large_value(k))
            assert cache.delete("big")
            assert _part_directories(path) == []  # every file it maps is unlinked now
        finally:
            done.set()
        reads, held, problems = results.get(timeout=PROCESS_TIMEOUT)
        reader.join(PROCESS_TIMEOUT)
        assert reader.exitcode == 0
        assert problems == 0 and held >= 1 and reads >= 1


def test_flush_after_another_handle_removes_a_part_directory_it_wrote(tmp_path: Path) -> None:
    """A directory gone since the commit holds nothing to make durable: no FsyncError (which
    would make the store refuse every later commit)."""
    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        cache.set("k", workers.large_value(1))
        other.set("k", workers.large_value(2))  # removes the part directory cache's store wrote into
        cache.store.flush()
        cache.set("j", workers.large_value(3))


def _key_directories(path: str | Path) -> list[str]:
    """The key directories ``p/<h2>/<h>`` of a cache, relative to its root."""
    return sorted(os.path.relpath(d, path) for d in Path(path).glob("p/*/*") if d.is_dir())


def _key_directory_of(cache: mmstore.Cache, key: str) -> str:
    name, _slot = cache._locate(key)
    return "p/" + name[2:]


def test_keys_whose_values_had_parts_leave_no_key_directory_behind(tmp_path: Path) -> None:
    # Every key ever stored with parts left its empty p/<h2>/<h> for good once its value was
    # deleted, replaced by one without parts, evicted or cleared: a long-lived cache of
    # distinct keys grew by a directory per key under any max_bytes, and every open walked them.
    path = tmp_path / "c"
    with mmstore.Cache(path, max_bytes=5 << 20) as cache:
        for k in range(4):  # 2.4 MB each: every set from the third evicts the oldest
            cache.set(f"large{k}", workers.large_value(k))
        assert cache.stats()["evictions"] == 2
        assert _key_directories(path) == sorted(_key_directory_of(cache, f"large{k}") for k in (2, 3))
        cache.set("t", (np.arange(3), "x"))
        cache.set("d", {"a": np.arange(2)})
        assert cache.delete("large2") and cache.delete("t")
        cache.set("d", np.arange(2))  # replaced by a value without parts
        assert _key_directories(path) == [_key_directory_of(cache, "large3")]
        _check_part_directories(path, cache)
        cache.set("t", (np.arange(4), "y"))
        assert cache.clear() == 3
        assert _key_directories(path) == []
        assert [name for name in store_files(path) if name.startswith("p/")] == []


def test_a_sweep_removes_empty_key_directories_left_by_older_versions(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with mmstore.Cache(path) as cache:
        cache.set("live", (np.arange(2), np.arange(3)))
        live = _key_directory_of(cache, "live")
    for h2 in ("ab", "cd"):
        Path(path, "p", h2, h2 * 16).mkdir(parents=True)  # what deletes used to leave
    assert len(_key_directories(path)) == 3
    with mmstore.Cache(path) as cache:  # opening sweeps
        assert _key_directories(path) == [live]
        assert cache.get("live")[1].tolist() == [0, 1, 2]


def test_a_set_whose_key_directory_is_removed_as_it_makes_its_part_directory_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The remover of a key's last part directory removes the key's directory too: a set of
    # the same key that has just made that directory (not yet its own part directory in it)
    # then meets ENOENT, and must start over rather than fail or lose its value.
    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        other.set("k", workers.large_value(0))
        key_directory = os.path.join(cache.path, _key_directory_of(cache, "k"))
        mkdir = os.mkdir
        raced: list[str] = []

        def mkdir_after_the_key_directory_went(target: Any, *args: Any, **kwargs: Any) -> None:
            if os.path.dirname(str(target)) == key_directory and not raced:
                raced.append(str(target))
                assert other.delete("k")  # its part directory was the last: the key's goes too
                assert not os.path.exists(key_directory)
            mkdir(target, *args, **kwargs)

        # (os.makedirs finds the key's directory there and makes only the part directory in it)
        monkeypatch.setattr(os, "mkdir", mkdir_after_the_key_directory_went)
        cache.set("k", workers.large_value(1))
        monkeypatch.undo()
        assert raced, "the interleaving was not reached"
        assert np.array_equal(other.get("k"), workers.large_value(1))
        _check_part_directories(tmp_path / "c", cache)
        assert _key_directories(tmp_path / "c") == [_key_directory_of(cache, "k")]


def _set_and_delete_keys_with_parts(path: str, writer: int, rounds: int, barrier: Any, results: Any) -> None:
    """Set, read and delete a few keys whose values have parts, as other processes do the
    same keys: report (problems, errors) (a torn value; any exception)."""
    problems, errors = 0, []
    with mmstore.Cache(path) as cache:
        barrier.wait(PROCESS_TIMEOUT)
        for round_ in range(rounds):
            key, seed = f"k{round_ % 3}", writer * 100_000 + round_
            try:
                cache.set(key, (np.full(3, seed), np.full(2, seed), "s"))
                value = cache.get(key)
                if value is not None and not (
                    (value[0] == value[0][0]).all() and (value[1] == value[0][0]).all() and value[2] == "s"
                ):
                    problems += 1
                if round_ % 4 == writer % 4:
                    cache.delete(key)
                if round_ % 50 == 49:
                    cache.clear()
            except Exception as exc:
                errors.append(repr(exc))
    results.put((problems, errors[:3]))


@pytest.mark.slow
def test_processes_setting_and_deleting_the_same_keys_with_parts_never_fail(tmp_path: Path, spawn: Any) -> None:
    # Key directories now go with their last part directory: sets of the same keys in other
    # processes race those removals (and the sweeps of clear()), and must never fail or tear.
    path, count, rounds = str(tmp_path / "c"), 3, 140  # (the last clear() at round 99: keys are left)
    mmstore.Cache(path).close()
    barrier, results = spawn.Barrier(count), spawn.Queue()
    processes = [
        spawn.Process(target=_set_and_delete_keys_with_parts, args=(path, writer, rounds, barrier, results))
        for writer in range(count)
    ]
    for process in processes:
        process.start()
    assert collect_results(processes, results) == [(0, [])] * count
    with mmstore.Cache(path) as cache:
        _check_part_directories(path, cache)
        entries = len(cache)
        assert entries >= 1 and len(_key_directories(path)) == len(_part_directories(path)) == entries
        assert cache.clear() == entries and _key_directories(path) == []


def test_a_late_deleter_whose_lock_creation_meets_a_vanishing_key_directory_finds_the_parts_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A late deleter of parts already deleted (a sweep, say) takes a part's lock, which
    # recreates its directories; a remover of the key's directory may remove the key's
    # directory between the two mkdirs: the lock's creation fails with ENOENT. The parts are
    # gone all the same: that is no error of the user's delete.
    from mmstore import _locks
    from mmstore._cache_values import _delete_parts

    with mmstore.Cache(tmp_path / "c") as cache, mmstore.Cache(tmp_path / "c") as other:
        cache.set("k", (np.arange(3), np.arange(4)))
        name, _slot = cache._locate("k")
        parts = cache.store.attrs(name)["parts"]
        assert cache._remove_entry(name) is not None
        lstat = os.lstat
        make_directories = _locks.make_directories
        raced: list[str] = []
        overtaken: list[str] = []

        def found_then_overtaken(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            # The late deleter finds a part's sidecar (so it goes on to take the part's
            # lock), and the other deleter then removes everything before it locks.
            found = lstat(path, *args, **kwargs)
            if not overtaken and isinstance(path, str) and "/p/" in path and path.endswith(".json"):
                overtaken.append(path)
                _delete_parts(cache.store, parts)  # parts, part directory and key directory go
            return found

        def make_directories_racing_a_remover(path: str, permissions: int | None = None) -> None:
            raced.append(path)
            make_directories(os.path.dirname(path), permissions)  # the key's directory
            os.rmdir(os.path.dirname(path))  # a remover finds it empty
            os.mkdir(path)  # FileNotFoundError, as os.makedirs would raise it

        monkeypatch.setattr(os, "lstat", found_then_overtaken)
        monkeypatch.setattr(_locks, "make_directories", make_directories_racing_a_remover)
        _delete_parts(other.store, parts)
        monkeypatch.undo()
        assert overtaken and raced, "the interleaving was not reached"
        assert _key_directories(tmp_path / "c") == [] and all(other.store.get(p, None) is None for p in parts)
        cache.set("k", (np.arange(5), np.arange(6)))
        assert other.get("k")[1].tolist() == list(range(6))
        _check_part_directories(tmp_path / "c", cache)


def test_a_failed_open_closes_the_store_it_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sweep at open (or the control file's check) raising left the Cache's store open,
    # with its descriptors and locks, for as long as anything held the failed Cache.
    from mmstore import _cache

    path = tmp_path / "c"
    mmstore.Cache(path).close()
    opened: list[mmstore.Store] = []

    class RecordingStore(mmstore.Store):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    def failing_sweep(store: mmstore.Store, thorough: bool = True) -> int:
        raise PermissionError(13, "Permission denied", os.path.join(store.path, "p", "ab"))

    monkeypatch.setattr(_cache, "Store", RecordingStore)
    monkeypatch.setattr(_cache, "_sweep_part_sets", failing_sweep)
    descriptors = len(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        mmstore.Cache(path)
    assert len(opened) == 1 and opened[0].closed
    assert len(os.listdir("/proc/self/fd")) == descriptors  # (the control file's map too)
    Path(path, ".mmstore-cache").write_bytes(b"not a cache")
    monkeypatch.undo()
    monkeypatch.setattr(_cache, "Store", RecordingStore)
    with pytest.raises(mmstore.FormatError):
        mmstore.Cache(path)
    assert len(opened) == 2 and opened[1].closed
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_memoize_refuses_ndarray_subclasses_it_would_key_by_data_alone(cache: mmstore.Cache) -> None:
    # A masked array was keyed by its data alone: a call with another mask (or a plain array,
    # or another subclass with state or behaviour of its own) hit the first call's result.
    calls: list[Any] = []

    @cache.memoize
    def total(x: np.ndarray) -> float:
        calls.append(x)
        return float(np.sum(x * x))

    values = np.array([[1.0, 2.0]])
    with pytest.raises(mmstore.ArgumentTypeError, match="MaskedArray"):
        total(np.ma.array(values, mask=[[False, True]]))
    with pytest.raises(mmstore.ArgumentTypeError, match="recarray"):
        total(values.view(np.recarray))
    assert calls == []
    assert total(values) == 5.0 and total(np.ma.getdata(np.ma.array(values, mask=[[True, False]]))) == 5.0
    memmap = np.memmap(cache.path + "/../m.bin", dtype="f8", mode="w+", shape=(1, 2))
    memmap[:] = values
    assert total(memmap) == 5.0 and len(calls) == 1  # a memmap is keyed by its data, as a plain array


def test_python_values_kept_beside_the_arrays_count_toward_max_bytes(tmp_path: Path) -> None:
    # A str result (or a tuple's strs and numbers) is kept in the entry's attrs: it counted
    # 0 bytes, so a cache of such results grew past max_bytes without ever evicting.
    path = str(tmp_path / "c")
    with mmstore.Cache(path, max_bytes=10_000) as cache:
        for k in range(30):
            cache.set(f"s{k}", f"{k:04d}" + "x" * 996)
            cache.set(f"t{k}", (np.zeros(1), "y" * 500, k))
        stats = cache.stats()
        assert stats["evictions"] > 0 and 0 < stats["bytes"] == _committed_bytes(path) <= 10_000
        assert cache.get("s29") == "0029" + "x" * 996 and cache.get("s0") is None
        assert cache.get("t29")[1:] == ("y" * 500, 29)
        with pytest.raises(mmstore.InvalidArgumentError, match="cannot fit"):
            cache.set("huge", "z" * 20_000)

        @cache.memoize
        def text(n: int) -> str:
            return "z" * n

        assert text(20_000) == "z" * 20_000 and "huge" not in cache  # returned uncached
        assert cache.stats()["bytes"] == _committed_bytes(path) <= 10_000


def test_close_lets_go_of_the_control_file_and_later_calls_raise_closed_error(tmp_path: Path) -> None:
    # close() left the control file's map (and its descriptor) open for as long as the
    # Cache object lived (a decorated function refers to it), and a get of a key this
    # handle had read before raised ValueError (a released memoryview), not ClosedError.
    path = tmp_path / "c"
    with mmstore.Cache(path) as cache:
        cache.set("k", np.arange(3))
        assert cache.get("k").tolist() == [0, 1, 2] and cache.get("k").tolist() == [0, 1, 2]  # (now hot)
    descriptors = len(os.listdir("/proc/self/fd"))
    closed = [mmstore.Cache(path) for _ in range(20)]
    for other in closed:
        other.close()
    assert len(os.listdir("/proc/self/fd")) == descriptors
    for call in (
        lambda: cache.get("k"),
        lambda: cache.get("missing"),
        lambda: cache.set("k", np.arange(4)),
        lambda: cache.delete("k"),
        lambda: "k" in cache,
        lambda: cache.stats(),
        lambda: cache.memoize(lambda x: x)(1),
    ):
        with pytest.raises(mmstore.ClosedError):
            call()
    with mmstore.Cache(path) as reopened:
        assert reopened.get("k").tolist() == [0, 1, 2] and reopened.stats()["bytes"] == 24


def _entry_lock_files(path: str | Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path, "e").glob("*/.*.lock"))


def _set_distinct_keys(path: str, first: int, count: int, barrier: Any, results: Any) -> None:
    """Set keys first..first+count-1 (each with an array entry of its own), then check them all."""
    try:
        with mmstore.Cache(path) as cache:
            barrier.wait(PROCESS_TIMEOUT)
            for key in range(first, first + count):
                cache.set(f"k{key}", np.full(4, key))
            wrong = [k for k in range(first, first + count) if cache.get(f"k{k}").tolist() != [k] * 4]
        results.put((0, wrong))
    except BaseException as exc:  # reported to the test, which fails on it
        results.put((1, repr(exc)))


def test_entries_of_one_directory_share_its_lock_file(tmp_path: Path) -> None:
    """A cache locks each entry through its e/<h2> directory's one lock file, so distinct
    keys, however many, leave at most 256 lock files (each takes a disk block) instead of
    one per key ever stored, even once their entries are evicted. Two processes setting
    600 keys each at once, in the same directories, lose none; every handle on the
    directory (a plain Store's too) locks and counts through the same files."""
    import multiprocessing

    path = str(tmp_path / "c")
    mmstore.Cache(path).close()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_set_distinct_keys, args=(path, first, 600, barrier, results)) for first in (0, 600)
    ]
    for process in processes:
        process.start()
    assert collect_results(processes, results) == [(0, [])] * 2
    locks = _entry_lock_files(path)
    assert 0 < len(locks) <= 256 and all(name.endswith("/..shared.lock") for name in locks)
    with mmstore.Cache(path, max_bytes=64 * 32) as cache:
        assert len(cache) == 1200
        cache.set("one more", np.zeros(4))  # evicts all but a few entries
        assert len(cache) <= 64
    assert _entry_lock_files(path) == locks
    with mmstore.Store(path) as store:  # a plain handle finds out from the control file
        name = next(n for n in store if n.startswith("e/"))
        assert store._locate(name).lock.path.endswith("/..shared.lock")


def test_a_cache_made_by_an_older_version_keeps_its_lock_file_per_entry(tmp_path: Path) -> None:
    """Caches of control-file version 2 lock every entry through a file of its own: an
    older mmstore still writing one would not see a shared file's locks or counters, so
    they are written as before (and their handles lock alike)."""
    from mmstore import _cache_control

    path = tmp_path / "c"
    mmstore.Cache(path).close()
    fd = os.open(path / _cache_control._CONTROL_NAME, os.O_WRONLY)
    try:
        os.pwrite(fd, (2).to_bytes(8, "little"), 8 * _cache_control._VERSION_SLOT)  # as version 2 made it
    finally:
        os.close(fd)
    with mmstore.Cache(path) as cache:
        cache.set("a", np.arange(3))
    with mmstore.Cache(path) as cache:
        cache.set("b", np.arange(4))
        assert cache.get("a").tolist() == [0, 1, 2] and cache.get("b").tolist() == [0, 1, 2, 3]
    locks = _entry_lock_files(path)
    assert len(locks) == 2 and not any(name.endswith("..shared.lock") for name in locks)
    with mmstore.Store(path) as store:
        assert store._shared_lock_groups == ()


def test_a_writable_store_refuses_a_cache_control_file_it_cannot_read(tmp_path: Path) -> None:
    """A writable handle on a cache directory must lock entries as the cache's handles do,
    which the control file says: one it cannot read is an error, not "no cache" (that
    handle would lock and count through files no other handle reads). A read-only handle
    opens all the same (a reader without a counter checks sidecars: never stale)."""
    from mmstore import _cache_control

    path = tmp_path / "c"
    with mmstore.Cache(path) as cache:
        cache.set("k", np.arange(3))
    control = path / _cache_control._CONTROL_NAME
    control.unlink()
    control.mkdir()  # (reading it fails with EISDIR, as root reads everything else)
    with pytest.raises(mmstore.StoreIOError, match="cache control file"):
        mmstore.Store(path, "a")
    with pytest.raises(mmstore.FormatError, match="cannot read"):
        mmstore.Cache(path)
    with mmstore.Store(path, "r") as reader:
        (name,) = [n for n in reader if n.startswith("e/")]
        assert reader.get(name).tolist() == [0, 1, 2]
