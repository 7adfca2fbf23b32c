#!/usr/bin/env python3
"""Stress: several processes run random mixed operations on one store at once.

Each process puts, gets, deletes and replaces datasets from a small shared set of
overlapping names (so they collide constantly), appends and flushes its own growable
log, and reopens its store now and then. Every array it puts is self-describing (its
values encode the writer, a sequence number and a length), so any reader can tell a
whole value from a torn one. Checked while running: every get returns a whole value that
some process put, with the matching attrs. Checked at the end: `verify()` is clean,
every log holds exactly the rows its process saw flushed, in order, and every surviving
dataset is a whole value.

    python scripts/stress_mixed.py --processes 8 --ops 10000   # the full run in docs/
    python scripts/stress_mixed.py --processes 4 --ops 400     # about what CI runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
from typing import Any

import numpy as np

import mmstore

NAMES = ["a", "b", "g/a", "g/b", "g/h/c", "deep/x/y/z", "a.json", "v1.2"]
TIMEOUT = 600.0


def make_value(writer: int, seq: int, length: int) -> np.ndarray:
    value = np.empty(length + 3, dtype=np.int64)
    value[:3] = (writer, seq, length)
    value[3:] = writer * 1_000_003 + seq * 7 + np.arange(length)
    return value


def is_whole(value: np.ndarray, attrs: dict[str, Any] | None = None) -> bool:
    """True if ``value`` is exactly one value some writer put (and ``attrs``, if given, its attrs)."""
    if value.dtype != np.int64 or value.ndim != 1 or len(value) < 3:
        return False
    writer, seq, length = (int(v) for v in value[:3])
    expected = writer * 1_000_003 + seq * 7 + np.arange(length)
    whole = len(value) == length + 3 and bool((value[3:] == expected).all())
    return whole and (attrs is None or attrs == {"w": writer, "s": seq})


def worker(path: str, writer: int, ops: int, seed: int, barrier: Any, results: Any) -> None:
    rng = random.Random(seed)
    store = mmstore.Store(path, timeout=60)
    log_name = f"logs/w{writer}"
    log = store.create(log_name, np.int64, (0,), growable=True, exist_ok=True)
    appended = flushed = 0
    problems: list[str] = []
    counts = {"put": 0, "get": 0, "delete": 0, "append": 0, "reopen": 0}
    barrier.wait()
    for seq in range(ops):
        action = rng.random()
        name = rng.choice(NAMES)
        if action < 0.35:
            store.put(name, make_value(writer, seq, rng.choice([0, 1, 100, 10_000])), attrs={"w": writer, "s": seq})
            counts["put"] += 1
        elif action < 0.7:
            try:
                value = store.get(name)
            except KeyError:
                continue
            counts["get"] += 1
            if not is_whole(value):  # the value describes itself, so a torn one shows
                problems.append(f"torn or foreign value in {name!r}")
        elif action < 0.8:
            try:
                store.delete(name)
                counts["delete"] += 1
            except KeyError:
                pass
        elif action < 0.97:
            block = np.arange(appended, appended + rng.choice([1, 5, 300]), dtype=np.int64)
            log.append(block)
            appended += len(block)
            if rng.random() < 0.5:
                log.flush()
                flushed = appended
            counts["append"] += 1
        else:
            log.flush()
            flushed = appended
            log.close()
            store.close()
            store = mmstore.Store(path, timeout=60)
            log = store.open_writer(log_name)
            counts["reopen"] += 1
    log.flush()
    flushed = appended
    log.close()
    store.close()
    results.put((writer, flushed, counts, problems))


def run(processes: int, ops: int, seed: int = 0, path: str | None = None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mmstore-stress-") as temp:
        store_path = path or os.path.join(temp, "store")
        mmstore.Store(store_path).close()
        barrier, results = context.Barrier(processes), context.Queue()
        children = [
            context.Process(target=worker, args=(store_path, w, ops, seed * 1000 + w, barrier, results))
            for w in range(processes)
        ]
        start = time.perf_counter()
        for child in children:
            child.start()
        outcomes = [results.get(timeout=TIMEOUT) for _ in children]
        for child in children:
            child.join(TIMEOUT)
        elapsed = time.perf_counter() - start
        problems = [p for *_rest, found in outcomes for p in found]
        problems += [f"process exit code {c.exitcode}" for c in children if c.exitcode != 0]
        totals: dict[str, int] = {}
        with mmstore.Store(store_path) as store:
            report = store.verify()
            if not report.ok:
                problems.append(f"verify: {report.problems}")
            for writer, flushed, counts, _found in outcomes:
                for key, value in counts.items():
                    totals[key] = totals.get(key, 0) + value
                rows = store.get(f"logs/w{writer}")
                if rows.tolist() != list(range(flushed)):
                    problems.append(f"log of writer {writer}: {len(rows)} rows, expected 0..{flushed - 1}")
            for name in NAMES:  # nobody writes any more: value and attrs must agree
                if name in store and not is_whole(store.get(name), store.attrs(name)):
                    problems.append(f"final value of {name!r} is not whole or its attrs do not match")
        return {"processes": processes, "ops": ops, "elapsed": elapsed, "totals": totals, "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outcome = run(args.processes, args.ops, args.seed)
    print(
        f"processes: {outcome['processes']}  operations each: {outcome['ops']}  totals: {outcome['totals']}  "
        f"problems: {len(outcome['problems'])}  ({outcome['elapsed']:.0f} s)"
    )
    for problem in outcome["problems"]:
        print("  PROBLEM", problem)
    return 1 if outcome["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
