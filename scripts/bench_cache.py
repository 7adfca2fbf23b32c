#!/usr/bin/env python3
"""Benchmark: mmstore.Cache against diskcache.Cache and joblib.Memory, in one run.

1. Hit latency of a 1 KiB result (np.random.rand(128)): ``get`` (mmstore, diskcache; joblib has
   no get) and a memoized call whose argument is a 1 KiB array, over a hot set of 100 keys.
2. Hit latency of a 100 MiB float64 result: ``get`` and a memoized call with a small (int)
   argument. mmstore maps the file (zero-copy), diskcache unpickles a copy, joblib is shown
   twice: ``Memory(location)`` (default, loads a copy) and ``Memory(location, mmap_mode="r")``.
3. Miss + store of a 100 MiB result: the first memoized call with a fresh argument, where the
   function instantly returns a precomputed array (nothing subtracted).
4. Throughput of 4 worker processes (spawn) making memoized calls over a shared set of 200 keys
   with 1 KiB results (all hits after a warm-up), each library on its own, same workload.

Every measurement gives each library its own fresh cache directory under the temp root; the
libraries take turns (the order rotates every repeat) so that noise from other jobs on the
machine spreads over all of them. Each latency sample times a loop of many calls (calibrated so
that a sample lasts about --sample-seconds) with the garbage collector off, like timeit; the
tables show the median and the minimum of the per-call times of the samples. Memoized samples
count the calls that reached the function body: a "hit" figure with a miss in it is flagged.

    python scripts/bench_cache.py                  # full run (about 1-2 minutes)
    python scripts/bench_cache.py --quick          # smoke run (well under 30 s)
    python scripts/bench_cache.py --json out.json  # also dump every sample as JSON
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing
import os
import platform
import queue
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import diskcache
import joblib
import numpy as np
from _report import emit  # scripts/ is on sys.path when a script runs

import mmstore
import mmstore._store as mmstore_store
from mmstore._filesystems import mount_of

MiB = 2**20
SEED = 20240611
HOT_KEYS = 100  # keys of the 1 KiB hit measurements (cycled through)

# mmstore keeps a bounded, first-in first-out table of parsed headers and maps per Store (256 entries
# in early versions; since then RLIMIT_NOFILE // 8, 64..4096). The diagnostic cycles over more keys.
DATASET_CACHE = int(getattr(mmstore_store, "_MAX_CACHED_DATASETS", 256))
DIAGNOSTIC_KEYS = max(300, DATASET_CACHE * 6 // 5)
MAX_CALLS_PER_SAMPLE = 1_000_000
WORKER_TIMEOUT = 300.0

# Previous measurements of the other libraries on this machine (from the brief), to judge the noise.
REFERENCE = {
    "diskcache 1 KiB get hit": 8.8e-6,
    "joblib 1 KiB memoized hit": 133e-6,
    "joblib (mmap_mode='r') 100 MiB hit": 0.17e-3,
    "diskcache 100 MiB hit": 51e-3,
    "joblib 100 MiB miss+store": 278e-3,
    "diskcache 100 MiB miss+store": 467e-3,
}

# How many times each benchmarked function body ran (that is, how many misses), per process.
COMPUTED: dict[str, int] = {"one_kib": 0, "big": 0, "throughput": 0}
_BIG: dict[str, np.ndarray] = {}  # the precomputed large result, set by main()
_WORKER_PEAKS: list[float] = []  # peak RSS (MiB) the throughput workers reported

LIBRARIES = ("mmstore", "diskcache", "joblib", "joblib-mmap")
LABELS = {
    "mmstore": "mmstore.Cache",
    "diskcache": "diskcache.Cache",
    "joblib": "joblib.Memory (default, mmap_mode=None)",
    "joblib-mmap": "joblib.Memory(mmap_mode='r')",
}


# --- the functions being memoized (module level, so that spawned workers find them) -------------


def one_kib_result(x: np.ndarray) -> np.ndarray:
    """A 1 KiB result of a 1 KiB argument."""
    COMPUTED["one_kib"] += 1
    return np.random.rand(128)


def big_result(tag: int) -> np.ndarray:
    """The precomputed large array for tag >= 0 (instantly), a tiny one for warm-up tags < 0."""
    COMPUTED["big"] += 1
    return _BIG["array"] if tag >= 0 else np.zeros(4)


def throughput_result(key: int) -> np.ndarray:
    """A deterministic 1 KiB result per key (workers check it)."""
    COMPUTED["throughput"] += 1
    return np.random.default_rng(key).random(128)


def open_memoized(library: str, path: str, func: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(memoized func, close) for one library with its default settings, cache at ``path``."""
    if library == "mmstore":
        mm_cache = mmstore.Cache(path)
        return mm_cache.memoize(func), mm_cache.close
    if library == "diskcache":
        dc_cache = diskcache.Cache(path)
        return dc_cache.memoize()(func), dc_cache.close
    if library in ("joblib", "joblib-mmap"):
        memory = joblib.Memory(path, mmap_mode="r" if library == "joblib-mmap" else None, verbose=0)
        return memory.cache(func), lambda: None
    raise ValueError(f"unknown library {library!r}")


def open_plain(library: str, path: str) -> tuple[Any, Callable[[], None]]:
    """(cache object with set/get, close) for mmstore or diskcache."""
    if library == "mmstore":
        mm_cache = mmstore.Cache(path)
        return mm_cache, mm_cache.close
    if library == "diskcache":
        dc_cache = diskcache.Cache(path)
        return dc_cache, dc_cache.close
    raise ValueError(f"{library} has no get/set API")


# --- latency measurements -------------------------------------------------------------------------


@dataclass
class Row:
    """One timed method: ``call(arg)`` cycled over ``args``; ``counter`` names its COMPUTED entry."""

    key: str
    library: str
    label: str
    call: Callable[[Any], Any]
    args: list[Any]
    counter: str | None = None
    calls_per_sample: int = 0
    seconds: list[float] = field(default_factory=list)  # per-call seconds, one per sample
    misses_while_timed: int = 0
    note: str = ""


def _run(row: Row, calls: int) -> float:
    """Seconds for ``calls`` calls of the row (gc off, like timeit); counts misses."""
    sequence = list(itertools.islice(itertools.cycle(row.args), calls))
    call = row.call
    before = COMPUTED[row.counter] if row.counter else 0
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for arg in sequence:
            call(arg)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    if row.counter:
        row.misses_while_timed += COMPUTED[row.counter] - before
    return elapsed


def _calibrate(row: Row, sample_seconds: float) -> None:
    """Warm the row up and pick how many calls make a sample of about ``sample_seconds``."""
    calls = 1
    while True:
        elapsed = _run(row, calls)
        if elapsed >= sample_seconds / 5 or calls >= MAX_CALLS_PER_SAMPLE:
            break
        calls = min(MAX_CALLS_PER_SAMPLE, calls * 8 if elapsed < sample_seconds / 50 else calls * 2)
    per_call = max(elapsed / calls, 1e-9)
    row.calls_per_sample = max(1, min(MAX_CALLS_PER_SAMPLE, round(sample_seconds / per_call)))
    row.misses_while_timed = 0  # warm-up misses do not count


def measure(rows: list[Row], repeats: int, sample_seconds: float, what: str) -> None:
    for row in rows:
        _calibrate(row, sample_seconds)
    for repeat in range(repeats):
        shift = repeat % len(rows)
        for row in rows[shift:] + rows[:shift]:
            row.seconds.append(_run(row, row.calls_per_sample) / row.calls_per_sample)
        _progress(f"{what}: repeat {repeat + 1}/{repeats} done")


def _check_equal(row: Row, got: Any, expected: np.ndarray) -> None:
    if not isinstance(got, np.ndarray) or got.shape != expected.shape or not np.array_equal(got, expected):
        raise AssertionError(f"{row.label}: wrong value from the cache")


def _zero_copy_note(value: np.ndarray) -> str:
    """How the hit's array is backed (checked once per row, untimed)."""
    if isinstance(value, np.memmap):
        return "np.memmap (zero-copy)"
    base: Any = value
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if base is not value and not isinstance(base, (np.ndarray, bytes, bytearray)):
        kind = f"{type(base).__module__}.{type(base).__qualname__}"
        return f"read-only={not value.flags.writeable} view of a {kind} (zero-copy)"
    return "own memory (a copy)"


def section_small(root: str, repeats: int, sample_seconds: float, diagnostic: bool) -> dict[str, Any]:
    """1 KiB results: get hits and memoized hits with a 1 KiB array argument."""
    closers: list[Callable[[], None]] = []
    rng = np.random.default_rng(SEED)
    get_rows: list[Row] = []
    memo_rows: list[Row] = []
    diag_rows: list[Row] = []
    try:
        for library in ("mmstore", "diskcache"):
            for nkeys, rows in ((HOT_KEYS, get_rows), (DIAGNOSTIC_KEYS, diag_rows))[: 2 if diagnostic else 1]:
                cache, close = open_plain(library, _fresh_dir(root, f"get{nkeys}-{library}"))
                closers.append(close)
                keys = [f"bench-key-{i}" for i in range(nkeys)]
                values = {key: np.random.rand(128) for key in keys}
                for key in keys:
                    cache.set(key, values[key])
                row = Row(f"{library}-get", library, f"{LABELS[library]} get", cache.get, keys)
                for key in keys:
                    _check_equal(row, cache.get(key), values[key])
                rows.append(row)
        arguments = [rng.random(128) for _ in range(HOT_KEYS)]
        for library in ("mmstore", "diskcache", "joblib"):
            memoized, close = open_memoized(library, _fresh_dir(root, f"memo1k-{library}"), one_kib_result)
            closers.append(close)
            row = Row(f"{library}-memo", library, f"{LABELS[library]} memoized call", memoized, arguments, "one_kib")
            first = [memoized(arg) for arg in arguments]  # the misses, untimed
            before = COMPUTED["one_kib"]
            for arg, value in zip(arguments, first, strict=True):
                _check_equal(row, memoized(arg), np.asarray(value))
            if COMPUTED["one_kib"] != before:
                raise AssertionError(f"{row.label}: a second call with the same argument was not a hit")
            memo_rows.append(row)
        measure(get_rows, repeats, sample_seconds, "1 KiB get")
        measure(memo_rows, repeats, sample_seconds, "1 KiB memoized call")
        if diag_rows:
            measure(diag_rows, repeats, sample_seconds, f"1 KiB get over {DIAGNOSTIC_KEYS} keys (diagnostic)")
    finally:
        for close in closers:
            close()
    return {"get": _dump(get_rows), "memo": _dump(memo_rows), "diagnostic": _dump(diag_rows)}


def section_big_hits(root: str, repeats: int, sample_seconds: float) -> dict[str, Any]:
    """The large result: get hits, memoized hits, and memoized hits followed by .sum()."""
    big = _BIG["array"]
    closers: list[Callable[[], None]] = []
    get_rows: list[Row] = []
    memo_rows: list[Row] = []
    sum_rows: list[Row] = []
    try:
        for library in ("mmstore", "diskcache"):
            cache, close = open_plain(library, _fresh_dir(root, f"bigget-{library}"))
            closers.append(close)
            cache.set("big", big)
            row = Row(f"{library}-get", library, f"{LABELS[library]} get", cache.get, ["big"])
            value = cache.get("big")
            _check_equal(row, value, big)
            row.note = _zero_copy_note(value)
            del value
            get_rows.append(row)
        for library in LIBRARIES:
            memoized, close = open_memoized(library, _fresh_dir(root, f"bigmemo-{library}"), big_result)
            closers.append(close)
            memoized(0)  # the miss, untimed
            row = Row(f"{library}-memo", library, f"{LABELS[library]} memoized call", memoized, [0], "big")
            before = COMPUTED["big"]
            value = memoized(0)
            if COMPUTED["big"] != before:
                raise AssertionError(f"{row.label}: the second call was not a hit")
            _check_equal(row, value, big)
            row.note = _zero_copy_note(value)
            del value
            memo_rows.append(row)

            def call_and_sum(arg: int, memoized: Callable[[int], np.ndarray] = memoized) -> float:
                return float(memoized(arg).sum())

            sum_rows.append(
                Row(
                    f"{library}-memo-sum",
                    library,
                    f"{LABELS[library]} memoized call + .sum()",
                    call_and_sum,
                    [0],
                    "big",
                )
            )
        measure(get_rows, repeats, sample_seconds, "large get")
        measure(memo_rows, repeats, sample_seconds, "large memoized call")
        measure(sum_rows, repeats, sample_seconds, "large memoized call + sum")
    finally:
        for close in closers:
            close()
    return {"get": _dump(get_rows), "memo": _dump(memo_rows), "memo_sum": _dump(sum_rows)}


def open_raw_writer(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], None]]:
    """The floor for miss+store: call the function, os.write its bytes to a new file, nothing else."""
    os.makedirs(path, exist_ok=True)

    def compute_and_write(tag: int) -> np.ndarray:
        value = big_result(tag)
        fd = os.open(os.path.join(path, f"{tag}.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = value.reshape(-1).view(np.uint8).data
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)
        return value

    return compute_and_write, lambda: None


def section_miss_store(root: str, repeats: int) -> dict[str, Any]:
    """First call with a fresh argument: the function returns the precomputed array at once."""
    big = _BIG["array"]
    methods = (*LIBRARIES, "floor")
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    notes: dict[str, str] = {}
    for repeat in range(repeats):
        shift = repeat % len(methods)
        for library in methods[shift:] + methods[:shift]:
            path = _fresh_dir(root, f"miss-{library}-{repeat}")
            if library == "floor":
                memoized, close = open_raw_writer(path)
            else:
                memoized, close = open_memoized(library, path, big_result)
            try:
                memoized(-1 - repeat)  # untimed: the library's first-call work for this function (tiny result)
                before = COMPUTED["big"]
                gc.collect()
                gc.disable()
                try:
                    start = time.perf_counter()
                    value = memoized(1000 + repeat)  # a fresh argument: a miss, then the store
                    elapsed = time.perf_counter() - start
                finally:
                    gc.enable()
                if COMPUTED["big"] != before + 1:
                    raise AssertionError(f"{library}: the fresh call was not exactly one miss")
                if value.shape != big.shape or not np.array_equal(value[::4096], big[::4096]):
                    raise AssertionError(f"{library}: wrong value returned by the miss")
                notes.setdefault(library, "returns " + _zero_copy_note(value))
                del value
                seconds[library].append(elapsed)
            finally:
                close()
                shutil.rmtree(path, ignore_errors=True)  # untimed; before writeback, so no disk I/O piles up
        _progress(f"large miss+store: repeat {repeat + 1}/{repeats} done")
    results: dict[str, Any] = {
        library: {
            "label": f"{LABELS[library]} first memoized call",
            "seconds": seconds[library],
            "note": notes[library],
        }
        for library in LIBRARIES
    }
    results["floor"] = {
        "label": "floor, no library: os.write of the same bytes to a new file",
        "seconds": seconds["floor"],
        "context": True,
    }
    return results


# --- multi-process throughput ---------------------------------------------------------------------


def _worker_main(library: str, path: str, nkeys: int, index: int, commands: Any, outbox: Any) -> None:
    """A throughput worker: warm up, report ready, then run timed rounds on command."""
    try:
        memoized, close = open_memoized(library, path, throughput_result)
        order = list(range(nkeys))
        random.Random(SEED + index).shuffle(order)  # workers do not walk the keys in lockstep
        chunks = [order[start : start + 25] for start in range(0, nkeys, 25)]
        for key in order:  # warm-up: the first worker to get here computes, the others hit or wait
            memoized(key)
        for key in order:
            value = memoized(key)
            if not np.array_equal(value, np.random.default_rng(key).random(128)):
                raise AssertionError(f"{library} worker {index}: wrong value for key {key}")
        outbox.put(("ready", index, os.getpid(), None))
        while True:
            command = commands.get()
            if command is None:
                break
            start_at, duration = command
            before = COMPUTED["throughput"]
            delay = start_at - time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            if delay > 0:
                time.sleep(delay)
            calls = 0
            start = time.monotonic()
            stop = start + duration
            gc.disable()
            try:
                running = True
                while running:
                    for chunk in chunks:
                        for key in chunk:
                            memoized(key)
                        calls += len(chunk)
                        if time.monotonic() >= stop:
                            running = False
                            break
                elapsed = time.monotonic() - start
            finally:
                gc.enable()
            outbox.put(("round", index, (calls, elapsed, COMPUTED["throughput"] - before), None))
        close()
        outbox.put(("bye", index, _peak_rss_mib(), None))
    except BaseException:
        outbox.put(("error", index, None, traceback.format_exc()))


class Pool:
    """``workers`` spawned processes for one library, sharing one cache directory."""

    def __init__(self, context: Any, library: str, path: str, workers: int, nkeys: int) -> None:
        self.library = library
        self.outbox = context.Queue()
        self.commands = [context.Queue() for _ in range(workers)]
        self.processes = [
            context.Process(
                target=_worker_main,
                args=(library, path, nkeys, index, self.commands[index], self.outbox),
                name=f"bench-cache-{library}-{index}",
                daemon=True,
            )
            for index in range(workers)
        ]
        for process in self.processes:
            process.start()

    def expect(self, kind: str) -> list[Any]:
        """One ``kind`` message from every worker (raises on a worker's error or death)."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + WORKER_TIMEOUT
        while len(got) < len(self.processes):
            try:
                message, index, payload, error = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"{self.library}: worker(s) died: {', '.join(dead)}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.library}: workers did not answer {kind!r}") from None
                continue
            if message == "error":
                raise RuntimeError(f"{self.library} worker {index} failed:\n{error}")
            if message != kind:
                raise RuntimeError(f"{self.library} worker {index}: expected {kind!r}, got {message!r}")
            got[index] = payload
        return [got[index] for index in range(len(self.processes))]

    def round(self, seconds: float) -> tuple[float, int, int]:
        """(total calls/s, total calls, misses) of one timed round started by all workers together."""
        start_at = time.monotonic() + 0.05
        for commands in self.commands:
            commands.put((start_at, seconds))
        results = self.expect("round")
        return (
            sum(calls / elapsed for calls, elapsed, _misses in results),
            sum(r[0] for r in results),
            sum(r[2] for r in results),
        )

    def close(self) -> None:
        for commands in self.commands:
            try:
                commands.put(None)
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=10)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def section_throughput(root: str, repeats: int, workers: int, nkeys: int, round_seconds: float) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    libraries = ("mmstore", "diskcache", "joblib")
    pools: list[Pool] = []
    rates: dict[str, list[float]] = {library: [] for library in libraries}
    calls: dict[str, list[int]] = {library: [] for library in libraries}
    misses: dict[str, int] = dict.fromkeys(libraries, 0)
    peaks: list[float] = []
    try:
        started = time.perf_counter()
        for library in libraries:
            pools.append(Pool(context, library, _fresh_dir(root, f"throughput-{library}"), workers, nkeys))
        for pool in pools:
            pool.expect("ready")
        _progress(
            f"throughput: {len(pools) * workers} workers started and warm in {time.perf_counter() - started:.1f} s"
        )
        for pool in pools:
            pool.round(min(0.2, round_seconds))  # an untimed first round
        for repeat in range(repeats):
            shift = repeat % len(pools)
            for pool in pools[shift:] + pools[:shift]:
                rate, total, missed = pool.round(round_seconds)
                rates[pool.library].append(rate)
                calls[pool.library].append(total)
                misses[pool.library] += missed
            _progress(f"throughput: repeat {repeat + 1}/{repeats} done")
        for pool in pools:
            for commands in pool.commands:
                commands.put(None)
            peaks.extend(pool.expect("bye"))
    finally:
        for pool in pools:
            pool.close()
    results: dict[str, Any] = {
        library: {
            "label": f"{LABELS[library]} memoized call",
            "calls_per_second": rates[library],
            "calls": calls[library],
            "misses_while_timed": misses[library],
        }
        for library in libraries
    }
    _WORKER_PEAKS.extend(peaks)
    return results


# --- reporting ------------------------------------------------------------------------------------


def _dump(rows: list[Row]) -> dict[str, Any]:
    return {
        row.library: {
            "label": row.label,
            "seconds": row.seconds,
            "calls_per_sample": row.calls_per_sample,
            "misses_while_timed": row.misses_while_timed,
            "note": row.note,
        }
        for row in rows
    }


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _fresh_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def _format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _latency_table(title: str, entries: dict[str, Any], footnote: str = "") -> list[str]:
    """Markdown: method | median | min | ratio vs mmstore (median / mmstore median; > 1 is slower)."""
    reference = _median(entries["mmstore"]["seconds"])
    lines = [f"**{title}**", "", "| method | median | min | ratio vs mmstore |", "|---|---:|---:|---:|"]
    notes = []
    for library, entry in entries.items():
        median = _median(entry["seconds"])
        flag = f" (**{entry['misses_while_timed']} misses while timed**)" if entry.get("misses_while_timed") else ""
        lines.append(
            f"| {entry['label']}{flag} | {_format_time(median)} | {_format_time(min(entry['seconds']))} | "
            f"{median / reference:.2f}x |"
        )
        if entry.get("note"):
            notes.append(f"{LABELS.get(library, library)}: {entry['note']}")
        if entry.get("calls_per_sample"):
            notes.append(f"{LABELS.get(library, library)}: {entry['calls_per_sample']} calls per sample")
    lines.append("")
    if notes:
        lines.append("Per method: " + "; ".join(notes) + ".")
        lines.append("")
    if footnote:
        lines += [footnote, ""]
    return lines


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _ahead(entries: dict[str, Any], what: str, higher_is_better: bool = False) -> tuple[str, bool]:
    """'mmstore ahead of every other row of this table' as a target line."""
    key = "calls_per_second" if higher_is_better else "seconds"
    mine = _median(entries["mmstore"][key])
    others = {
        library: _median(entry[key])
        for library, entry in entries.items()
        if library != "mmstore" and not entry.get("context")
    }
    ok = all((mine > value) if higher_is_better else (mine < value) for value in others.values())
    shown = (lambda v: f"{v:,.0f} calls/s") if higher_is_better else _format_time
    text = f"{what}: mmstore {shown(mine)} ahead of " + ", ".join(
        f"{library} {shown(value)}" for library, value in others.items()
    )
    return text, ok


def report(results: dict[str, Any]) -> list[str]:
    small, big, miss, tput = results["small"], results["big"], results["miss"], results["throughput"]
    mib = results["config"]["big_mib"]
    out: list[str] = []
    out.append("## 1. Hit latency, 1 KiB result (np.random.rand(128))")
    out.append("")
    out.append(f"Hot set of {HOT_KEYS} keys, cycled; per-call time of a loop of calls; one cache directory per method.")
    out.append("")
    out += _latency_table(
        "1a. `cache.get(key)` hit (per call)",
        small["get"],
        "joblib.Memory has no get: see its memoized call in 1b. diskcache unpickles the 1 KiB value from SQLite.",
    )
    out += _latency_table(
        "1b. memoized call hit, argument a 1 KiB float64 array (per call)",
        small["memo"],
        "mmstore `@cache.memoize`, diskcache `@cache.memoize()`, joblib `Memory(location).cache(f)`; each hashes "
        "the argument on every call (mmstore: BLAKE2b + XXH3 of the bytes; diskcache: pickles the key tuple; "
        "joblib: its own pickling hasher).",
    )
    if small["diagnostic"]:
        out += _latency_table(
            f"Diagnostic (not a target): `get` hit cycling over {DIAGNOSTIC_KEYS} keys (per call)",
            small["diagnostic"],
            f"A hot set larger than the {DATASET_CACHE} datasets an mmstore Store remembers in this process (parsed "
            f"headers and maps, evicted first-in first-out; the bound is RLIMIT_NOFILE // 8 in this version): past it "
            f"every mmstore get re-opens, re-parses and re-maps. The {HOT_KEYS}-key figures above are the ones the "
            "targets use.",
        )
    out.append(f"## 2. Hit latency, {mib:g} MiB float64 result")
    out.append("")
    out += _latency_table(f"2a. `cache.get(key)` hit, {mib:g} MiB (per call)", big["get"])
    out += _latency_table(
        f"2b. memoized call hit, small (int) argument, {mib:g} MiB result (per call)",
        big["memo"],
        "joblib default = `Memory(location)` (mmap_mode=None: loads a private copy); joblib mmap = "
        "`Memory(location, mmap_mode='r')` (np.memmap of the stored .npy data).",
    )
    out += _latency_table(
        f"Context (not a target): memoized call hit + `.sum()` of the {mib:g} MiB result (per call)",
        big["memo_sum"],
        "Zero-copy hits only pay when the data are read: here every method reads all of it once per call.",
    )
    out.append(f"## 3. Miss + store, {mib:g} MiB result")
    out.append("")
    out += _latency_table(
        f"First memoized call with a fresh argument; the function returns a precomputed {mib:g} MiB array",
        miss,
        "Fresh cache directory per repeat and method (opened, and the function's first call made with a tiny result, "
        "before the clock); nothing subtracted; each directory is deleted (untimed) right after its repeat, so every "
        "method writes into recycled page-cache pages (on this VM a write needing new pages instead of recycled ones "
        "can take ~4x longer, for every method alike). The floor row is the same compute + one os.write of the bytes "
        "into a new file, without any library: every method pays at least that.",
    )
    floor = _median(miss["floor"]["seconds"])
    out.append(
        "Over the floor: "
        + ", ".join(f"{LABELS[lib]} {_median(miss[lib]['seconds']) / floor:.2f}x" for lib in LIBRARIES)
        + "."
    )
    out.append("")
    cfg = results["config"]
    out.append(f"## 4. Throughput, {cfg['workers']} processes, {cfg['throughput_keys']} keys with 1 KiB results")
    out.append("")
    out.append(
        f"{cfg['workers']} spawned workers per library share one cache directory; each warmed up (two passes over the "
        f"keys) before any clock; then {cfg['round_seconds']:g} s rounds started together; total calls/s = sum over "
        "workers of calls / own elapsed time. ratio = library's calls/s / mmstore's (< 1 is slower than mmstore). "
        f"The {cfg['throughput_keys']} keys {'fit in' if cfg['throughput_keys'] <= DATASET_CACHE else 'EXCEED'} "
        f"mmstore's per-process dataset cache of {DATASET_CACHE} (RLIMIT_NOFILE // 8; past it every hit re-reads)."
    )
    out.append("")
    reference = _median(tput["mmstore"]["calls_per_second"])
    out.append("| method | median | min | ratio vs mmstore |")
    out.append("|---|---:|---:|---:|")
    for entry in tput.values():
        median = _median(entry["calls_per_second"])
        flag = f" (**{entry['misses_while_timed']} misses while timed**)" if entry["misses_while_timed"] else ""
        out.append(
            f"| {entry['label']}{flag} | {median:,.0f} calls/s | {min(entry['calls_per_second']):,.0f} calls/s | "
            f"{median / reference:.2f}x |"
        )
    out.append("")

    # --- targets
    get_1k = _median(small["get"]["mmstore"]["seconds"])
    memo_1k = _median(small["memo"]["mmstore"]["seconds"])
    get_big = _median(big["get"]["mmstore"]["seconds"])
    memo_big = _median(big["memo"]["mmstore"]["seconds"])
    miss_mm = _median(miss["mmstore"]["seconds"])
    joblib_miss = {lib: _median(miss[lib]["seconds"]) for lib in ("joblib", "joblib-mmap")}
    best_joblib = min(joblib_miss, key=lambda lib: joblib_miss[lib])
    checks = [
        (f"1 KiB get hit: mmstore {_format_time(get_1k)} <= 3 us", get_1k <= 3e-6),
        (f"1 KiB memoized-call hit (1 KiB arg): mmstore {_format_time(memo_1k)} <= 10 us", memo_1k <= 10e-6),
        (f"{mib:g} MiB get hit: mmstore {_format_time(get_big)} <= 100 us", get_big <= 100e-6),
        (f"{mib:g} MiB memoized-call hit: mmstore {_format_time(memo_big)} <= 100 us", memo_big <= 100e-6),
        (
            f"{mib:g} MiB miss+store: mmstore {_format_time(miss_mm)} <= half of joblib's "
            f"(the faster joblib row, {LABELS[best_joblib]}: {_format_time(joblib_miss[best_joblib])})",
            miss_mm <= 0.5 * joblib_miss[best_joblib],
        ),
        _ahead(small["get"], "1 KiB get hit"),
        _ahead(small["memo"], "1 KiB memoized-call hit"),
        _ahead(big["get"], f"{mib:g} MiB get hit"),
        _ahead(big["memo"], f"{mib:g} MiB memoized-call hit"),
        _ahead(miss, f"{mib:g} MiB miss+store"),
        _ahead(tput, f"{cfg['workers']}-process throughput", higher_is_better=True),
    ]
    misses = [
        f"{section}/{library}"
        for section, entries in (
            ("1a", small["get"]), ("1b", small["memo"]), ("2a", big["get"]), ("2b", big["memo"]), ("4", tput)
        )
        for library, entry in entries.items()
        if entry.get("misses_while_timed")
    ]  # fmt: skip
    checks.append((f"no misses inside any timed hit loop ({', '.join(misses) or 'none'})", not misses))
    out.append("## Targets (medians of this run)")
    out.append("")
    for text, ok in checks:
        out.append(f"- {_verdict(ok)}: {text}")
    out.append("")
    out.append(f"{sum(ok for _t, ok in checks)}/{len(checks)} targets met.")
    results["targets"] = [{"target": text, "pass": ok} for text, ok in checks]

    # --- how noisy was the machine: the same figures as the earlier reference run
    now = {
        "diskcache 1 KiB get hit": _median(small["get"]["diskcache"]["seconds"]),
        "joblib 1 KiB memoized hit": _median(small["memo"]["joblib"]["seconds"]),
        "joblib (mmap_mode='r') 100 MiB hit": _median(big["memo"]["joblib-mmap"]["seconds"]),
        "diskcache 100 MiB hit": _median(big["get"]["diskcache"]["seconds"]),
        "joblib 100 MiB miss+store": _median(miss["joblib"]["seconds"]),
        "diskcache 100 MiB miss+store": _median(miss["diskcache"]["seconds"]),
    }
    out.append("")
    out.append("**Noise check: this run's figures for the others against the earlier reference measurements**")
    out.append("")
    out.append("| figure | reference | this run | this run / reference |")
    out.append("|---|---:|---:|---:|")
    for name, ref in REFERENCE.items():
        shown = name if mib == 100 else name.replace("100 MiB", f"{mib:g} MiB (reference at 100 MiB)")
        out.append(f"| {shown} | {_format_time(ref)} | {_format_time(now[name])} | {now[name] / ref:.2f}x |")
    out.append("")
    return out


def _speed_probe() -> str:
    """How fast this machine is right now: a Python call and a stat() system call (best of 5 loops)."""

    def noop() -> None:
        return None

    here = os.path.abspath(__file__)
    call = min(timeit.repeat(noop, number=200_000, repeat=5)) / 200_000
    stat = min(timeit.repeat(lambda: os.stat(here), number=20_000, repeat=5)) / 20_000
    return f"empty Python call {call * 1e9:.0f} ns, os.stat() {stat * 1e6:.2f} us"


def _mmstore_source() -> str:
    """Where mmstore was imported from, and its git commit (plus uncommitted changes) if it is a checkout."""
    package = os.path.dirname(os.path.abspath(mmstore.__file__))
    try:
        head = subprocess.run(
            ["git", "-C", package, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", package, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return package
    if not head:
        return package
    return f"{package} at git {head}" + (f" + uncommitted changes in {len(changed)} file(s)" if changed else "")


def _heavy_jobs() -> str:
    try:
        found = subprocess.run(["pgrep", "-af", "crash_torture"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (pgrep unavailable)"
    lines = [line for line in found.stdout.splitlines() if line.strip() and "pgrep" not in line]
    return "; ".join(lines) if lines else "none"


def header_lines(root: str) -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        "# mmstore.Cache vs diskcache.Cache vs joblib.Memory",
        "",
        f"- Command: `{shlex.join(sys.orig_argv)}`",
        f"- Machine: nproc={affinity} (cpu_count={os.cpu_count()}), {platform.platform()}, {platform.machine()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, mmstore {mmstore.__version__}, "
        f"diskcache {diskcache.__version__}, joblib {joblib.__version__}",
        f"- mmstore imported from {_mmstore_source()}",
        f"- Temp root: {root} ({_fs_type(root)}); open-file limit (RLIMIT_NOFILE) soft {soft}, hard {hard}: "
        f"mmstore sizes its per-Store dataset cache from it ({DATASET_CACHE} datasets here)",
        f"- Load average at start: {load}; started {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- Other heavy jobs at start (`pgrep -af crash_torture`): {_heavy_jobs()}",
        f"- Speed probe at start: {_speed_probe()} (the hit paths are made of such calls and one stat() each)",
        "- Defaults everywhere: mmstore.Cache(path) (no fsync, no byte bound), diskcache.Cache(path) (SQLite WAL, "
        "synchronous=NORMAL, 1 GiB size_limit, values > 32 KiB in files, pickled), joblib.Memory(path, verbose=0).",
        "",
    ]


def _fs_type(path: str) -> str:
    mount = mount_of(path)
    return "? on ?" if mount is None else f"{mount.type} on {mount.point}"


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM, which exec resets, unlike ru_maxrss), in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_lines() -> list[str]:
    own = _peak_rss_mib()
    if not _WORKER_PEAKS:
        return [f"Peak RSS: benchmark process {own:.0f} MiB."]
    return [
        f"Peak RSS: benchmark process {own:.0f} MiB; throughput workers {min(_WORKER_PEAKS):.0f}-"
        f"{max(_WORKER_PEAKS):.0f} MiB each, {sum(_WORKER_PEAKS):.0f} MiB summed over {len(_WORKER_PEAKS)} workers "
        f"(upper bound on everything at once: {own + sum(_WORKER_PEAKS):.0f} MiB)."
    ]


def _stages(args: argparse.Namespace, root: str, results: dict[str, Any]) -> Iterator[str]:
    """Run the sections in turn, each in its own subdirectory of ``root`` (removed after it)."""
    repeats, sample = args.repeats, args.sample_seconds
    sections: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
        ("small", "1 KiB hits", lambda where: section_small(where, repeats, sample, diagnostic=not args.quick)),
        ("big", "large hits", lambda where: section_big_hits(where, repeats, sample)),
        ("miss", "large miss+store", lambda where: section_miss_store(where, repeats)),
        (
            "throughput",
            "throughput",
            lambda where: section_throughput(where, repeats, args.workers, args.keys, args.round_seconds),
        ),
    ]
    for key, title, run in sections:
        where = os.path.join(root, key)
        os.makedirs(where)
        try:
            results[key] = run(where)
        finally:
            shutil.rmtree(where, ignore_errors=True)
        yield title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller sizes, fewer repeats (< 30 s)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 5; --quick 2)")
    parser.add_argument("--json", metavar="OUT", help="also write every sample and the summary as JSON")
    parser.add_argument("--big-mib", type=float, default=None, help="large result in MiB (default 100; --quick 32)")
    parser.add_argument(
        "--sample-seconds", type=float, default=None, help="target length of one latency sample (default 0.25)"
    )
    parser.add_argument(
        "--round-seconds", type=float, default=None, help="length of one throughput round (default 2; --quick 0.4)"
    )
    parser.add_argument("--workers", type=int, default=4, help="throughput worker processes per library (default 4)")
    parser.add_argument("--keys", type=int, default=200, help="keys of the throughput workload (default 200)")
    parser.add_argument("--tmpdir", default="/tmp", help="where the temp root goes (default /tmp)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    args.big_mib = args.big_mib if args.big_mib is not None else (32.0 if args.quick else 100.0)
    args.sample_seconds = args.sample_seconds if args.sample_seconds is not None else (0.04 if args.quick else 0.25)
    args.round_seconds = args.round_seconds if args.round_seconds is not None else (0.4 if args.quick else 2.0)
    if args.repeats < 1 or args.big_mib <= 0 or args.sample_seconds <= 0 or args.round_seconds <= 0:
        parser.error("--repeats must be >= 1 and sizes and durations > 0")
    if args.workers < 1 or args.keys < 1:
        parser.error("--workers and --keys must be >= 1")

    root = tempfile.mkdtemp(prefix="bench-cache-", dir=args.tmpdir)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "argv": sys.orig_argv,
        "config": {
            "repeats": args.repeats,
            "big_mib": args.big_mib,
            "sample_seconds": args.sample_seconds,
            "round_seconds": args.round_seconds,
            "workers": args.workers,
            "throughput_keys": args.keys,
            "hot_keys": HOT_KEYS,
        },
    }
    try:
        lines = header_lines(root)
        print("\n".join(lines), flush=True)
        results["header"] = lines
        count = int(args.big_mib * MiB) // 8
        _BIG["array"] = np.random.default_rng(SEED).random(count)
        _BIG["array"].flags.writeable = False
        for stage in _stages(args, root, results):
            _progress(f"{stage}: done ({time.perf_counter() - started:.0f} s so far)")
    finally:
        _BIG.clear()
        shutil.rmtree(root, ignore_errors=True)
    body = report(results)
    elapsed = time.perf_counter() - started
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    body += _peak_memory_lines()
    body += [
        f"Total run time {elapsed:.1f} s; load average at end: {load}; "
        f"other heavy jobs at end (`pgrep -af crash_torture`): {_heavy_jobs()}; speed probe at end: {_speed_probe()}.",
        f"Temp root {root} removed: {not os.path.exists(root)}.",
    ]
    if args.quick:
        body.append(f"(--quick: {args.big_mib:g} MiB instead of 100, fewer and shorter samples; not figures to quote.)")
    emit(body, results, args.json, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
