"""`mmstore demo`: one writer process and several readers share arrays, against a pickling baseline.

Both paths are timed the same way: every process is started and has made its
arrays before the clock starts; the clock stops when the last reader has
summed the last array. Process start-up is excluded from both.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._store import Store

_TIMEOUT = 300.0


@dataclass(frozen=True)
class DemoResult:
    arrays: int
    array_bytes: int
    readers: int
    mmstore_seconds: float
    queue_seconds: float
    checksums_match: bool

    @property
    def speedup(self) -> float:
        return self.queue_seconds / self.mmstore_seconds if self.mmstore_seconds else float("inf")


def _make(index: int, rows: int) -> np.ndarray:
    return np.random.default_rng(index).standard_normal((rows, 1024))


def _writer(path: str, arrays: int, rows: int, ready: Any, go: Any, written: Any) -> None:
    data = [_make(index, rows) for index in range(arrays)]
    with Store(path) as store:
        ready.put(None)
        go.wait(_TIMEOUT)
        for index, array in enumerate(data):
            store.put(f"demo/array{index}", array, attrs={"index": index})
    written.set()


def _reader(path: str, arrays: int, ready: Any, written: Any, results: Any) -> None:
    ready.put(None)
    written.wait(_TIMEOUT)
    with Store(path, "r") as store:
        results.put([float(store.get(f"demo/array{index}").sum()) for index in range(arrays)])


def _queue_producer(arrays: int, rows: int, queues: list[Any], ready: Any, go: Any) -> None:
    data = [_make(index, rows) for index in range(arrays)]
    ready.put(None)
    go.wait(_TIMEOUT)
    for array in data:
        for queue in queues:
            queue.put(array)  # pickled once per consumer, as users do today


def _queue_consumer(arrays: int, queue: Any, ready: Any, results: Any) -> None:
    ready.put(None)
    results.put([float(queue.get(timeout=_TIMEOUT).sum()) for _ in range(arrays)])


def _run(
    context: Any, processes: list[Any], ready: Any, go: Any, results: Any, readers: int
) -> tuple[float, list[Any]]:
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=_TIMEOUT)
    start = time.perf_counter()
    go.set()
    collected = [results.get(timeout=_TIMEOUT) for _ in range(readers)]
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join(_TIMEOUT)
    return elapsed, collected


def run_demo(arrays: int = 8, megabytes_per_array: int = 16, readers: int = 3) -> DemoResult:
    """Run the demo in a temporary store and return its timings."""
    rows = max(1, megabytes_per_array * 2**20 // (1024 * 8))
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mmstore-demo-") as temp:
        store_path = os.path.join(temp, "store")
        ready, go, written, results = context.Queue(), context.Event(), context.Event(), context.Queue()
        processes = [context.Process(target=_writer, args=(store_path, arrays, rows, ready, go, written))]
        processes += [
            context.Process(target=_reader, args=(store_path, arrays, ready, written, results)) for _ in range(readers)
        ]
        mmstore_seconds, mmstore_sums = _run(context, processes, ready, go, results, readers)

    ready, go, results = context.Queue(), context.Event(), context.Queue()
    queues = [context.Queue() for _ in range(readers)]
    processes = [context.Process(target=_queue_producer, args=(arrays, rows, queues, ready, go))]
    processes += [context.Process(target=_queue_consumer, args=(arrays, q, ready, results)) for q in queues]
    queue_seconds, queue_sums = _run(context, processes, ready, go, results, readers)

    expected = [float(_make(index, rows).sum()) for index in range(arrays)]
    match = all(sums == expected for sums in mmstore_sums + queue_sums)
    return DemoResult(arrays, rows * 1024 * 8, readers, mmstore_seconds, queue_seconds, match)
