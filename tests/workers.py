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


def get_and_report(path: str, name: str, queue: Any) -> None:
    with mmstore.Store(path, "r") as store:
        array = store.get(name)
        queue.put((array.dtype.str, array.shape, array.tobytes(), store.attrs(name)))


def replace_many(path: str, name: str, count: int, started: Any, n: int) -> None:
    """Replace ``name`` ``count`` times; value k is the constant array k."""
    with mmstore.Store(path) as store:
        for k in range(1, count + 1):
            store.put(name, np.full(n, k, dtype=np.int64))
            if k == 1:
                started.set()


def put_many(path: str, writer: int, count: int, barrier: Any) -> None:
    """One of several concurrent writers: its own names plus one shared name."""
    with mmstore.Store(path) as store:
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
