#!/usr/bin/env python3
"""Crash torture for growable datasets: SIGKILL a producer at random instants.

The producer appends self-checking rows in random batches, flushes at random points
(some durable), and now and then replaces a second dataset with put(). It is killed
with SIGKILL at a random instant: mid-append, mid-flush, mid-growth of the data file,
mid-replace. After every kill the store is reopened for writing (recovery runs) and
checked:

- every row the producer had flushed (acknowledged) is present and intact;
- no row that was never flushed is visible (committed length <= rows handed to flush);
- no torn row: every visible row passes its self-check, in sequence;
- the replaced dataset is one whole generation; verify() reports no problem;
- the next producer continues appending where the last one was killed.

    python scripts/crash_torture.py --trials 1000    # the full run reported in docs/
    python scripts/crash_torture.py --trials 30      # about what CI runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mmstore

LOG = "torture/log"
SIDE = "torture/side"
TIMEOUT = 120.0
MAX_ROWS = 2_000_000  # 128 MB of rows, then the log starts over as a new generation
ROW = np.dtype([("seq", "<u8"), ("payload", "<u8", (6,)), ("check", "<u8")])  # 64-byte rows


def make_rows(start: int, count: int) -> np.ndarray:
    """Rows start..start+count-1; each carries a check word derived from its contents."""
    seq = np.arange(start, start + count, dtype=np.uint64)
    rows = np.zeros(count, ROW)
    rows["seq"] = seq
    rows["payload"] = (seq[:, None] * np.uint64(0x9E3779B97F4A7C15)) ^ np.arange(1, 7, dtype=np.uint64)
    rows["check"] = _check_word(rows)
    return rows


def _check_word(rows: np.ndarray) -> np.ndarray:
    word = rows["seq"] * np.uint64(0xBF58476D1CE4E5B9)
    for column in range(6):
        word = (word ^ rows["payload"][:, column]) * np.uint64(0x94D049BB133111EB)
    return word


def bad_rows(rows: np.ndarray, start: int = 0) -> int:
    """How many rows fail their self-check or are out of sequence."""
    expected_seq = np.arange(start, start + len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        ok = (rows["seq"] == expected_seq) & (rows["check"] == _check_word(rows))
    return int(len(rows) - ok.sum())


def producer(path: str, seed: int, started: Any, appended: Any, handed: Any, acknowledged: Any) -> None:
    """Append and flush until killed; report rows handed to flush and rows acknowledged."""
    rng = random.Random(seed)
    store = mmstore.Store(path)
    writer = store.open_writer(LOG)
    position = len(writer)
    started.set()
    while True:
        action = rng.random()
        if action < 0.05:
            k = rng.randrange(1 << 30)
            store.put(SIDE, np.full(rng.choice([10, 100_000, 1_000_000]), k, dtype=np.int64), attrs={"k": k})
            continue
        count = rng.choice([1, 1, 7, 100, 1000, 20_000])
        writer.append(make_rows(position, count))
        position += count
        appended.value = position
        if action < 0.6:
            handed.value = position  # set before flush: the most that may become visible
            writer.flush(durable=rng.random() < 0.02)
            acknowledged.value = position  # set after flush returned: must never be lost


@dataclass
class Report:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    rows: int = 0  # rows committed over all trials
    kills_mid_flush: int = 0
    kills_with_unflushed_rows: int = 0
    verify_runs: int = 0


def setup(path: str) -> None:
    with mmstore.Store(path) as store:
        # Small initial capacity: the file grows often, so kills land mid-growth too.
        store.create(LOG, ROW, (0,), growable=True, capacity=16).close()
        store.put(SIDE, np.full(10, 0, dtype=np.int64), attrs={"k": 0})


def check(
    path: str, appended: int, handed: int, acknowledged: int, last_length: int, report: Report, verify: bool
) -> int:
    problems = []
    with mmstore.Store(path) as store:
        reader = store.open_reader(LOG)
        length = len(reader)
        if length < acknowledged:
            problems.append(f"lost flushed rows: committed {length} < acknowledged {acknowledged}")
        if length > max(handed, last_length):
            problems.append(f"unflushed rows visible: committed {length} > handed to flush {handed}")
        if length < last_length:
            problems.append(f"committed length went back from {last_length} to {length}")
        new = reader.array[last_length:]
        if bad_rows(new, last_length):
            problems.append(f"{bad_rows(new, last_length)} torn or out-of-sequence rows after row {last_length}")
        reader.close()
        side = store.get(SIDE)
        k = store.attrs(SIDE)["k"]
        if not (side == k).all():
            problems.append(f"{SIDE} is not one whole generation (k={k})")
        leftovers = [f for d, _, fs in os.walk(path) for f in fs if f.endswith(".tmp")]
        if leftovers:
            problems.append(f"temp files left after recovery: {leftovers}")
        if verify:
            report.verify_runs += 1
            result = store.verify()
            if not result.ok:
                problems.append(f"verify: {result.problems}")
        # The next producer must be able to continue.
        with store.open_writer(LOG) as writer:
            if len(writer) != length:
                problems.append(f"reopened writer sees {len(writer)} rows, readers {length}")
    if problems:
        report.failures.append(f"trial {report.trials}: " + "; ".join(problems))
    report.kills_mid_flush += handed > acknowledged
    report.kills_with_unflushed_rows += appended > length
    return length


def run_trials(trials: int, seed: int = 0, path: str | None = None, max_delay: float = 0.15) -> Report:
    rng = random.Random(seed)
    context = multiprocessing.get_context("spawn")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mmstore-torture-") as temp:
        store_path = path or os.path.join(temp, "store")
        setup(store_path)
        length = 0
        for trial in range(trials):
            report.trials = trial + 1
            previous = length
            started = context.Event()
            # lock=False: a producer SIGKILLed inside a locked Value's setter would hold its
            # lock forever and hang the parent's next read. An aligned 8-byte store is atomic.
            appended, handed, acknowledged = (context.Value("q", length, lock=False) for _ in range(3))
            arguments = (store_path, rng.randrange(1 << 30), started, appended, handed, acknowledged)
            child = context.Process(target=producer, args=arguments)
            child.start()
            if not started.wait(TIMEOUT):
                child.kill()
                report.failures.append(f"trial {trial}: producer never started")
                continue
            time.sleep(rng.uniform(0, max_delay))
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(TIMEOUT)
            length = check(
                store_path, appended.value, handed.value, acknowledged.value, length, report, verify=trial % 10 == 9
            )
            report.rows += length - previous
            if length > MAX_ROWS:  # keep the run's disk use bounded: start a fresh generation
                with mmstore.Store(store_path) as store:
                    store.create(LOG, ROW, (0,), growable=True, capacity=16, exist_ok=True).close()
                length = 0
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    report = run_trials(args.trials, args.seed)
    elapsed = time.perf_counter() - start
    print(
        f"trials: {report.trials}  failures: {len(report.failures)}  rows committed: {report.rows}  "
        f"kills with unflushed rows: {report.kills_with_unflushed_rows}  kills mid-flush: {report.kills_mid_flush}  "
        f"verify runs: {report.verify_runs}  "
        f"({elapsed:.0f} s)"
    )
    for failure in report.failures:
        print("  FAIL", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
