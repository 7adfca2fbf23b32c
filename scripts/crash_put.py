#!/usr/bin/env python3
"""Crash test for put: SIGKILL a writer at random instants while it replaces a dataset.

After every kill the store is reopened for writing (which runs recovery) and checked:
the dataset is exactly one committed generation (all elements equal, checksum matches the
header, attrs agree), never older than what was already seen, and no temp file or
unreferenced data file is left behind.

    python scripts/crash_put.py --trials 1000          # full run, figures in docs/
    python scripts/crash_put.py --trials 20 --mib 16   # what CI runs (tests/test_crash.py)
    python scripts/crash_put.py --trials 1000 --pack-small  # small puts appended to packed data files

With --pack-small the writer uses Store(pack_small=True) and replaces the dataset
with 8 KiB and 128-byte arrays: each put appends a generation to the dataset's
packed data file, which rolls over to a new file every few puts.
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
import xxhash

import mmstore

NAME = "crash/big"
TIMEOUT = 120.0


def put_forever(path: str, n: int, small_every: int, started: Any, pack_small: bool = False) -> None:
    """Replace NAME with constant arrays k = 1, 2, ... until killed."""
    store = mmstore.Store(path, pack_small=pack_small)
    k = int(store.attrs(NAME)["k"])
    started.set()
    while True:
        k += 1
        size = 16 if small_every and k % small_every == 0 else n
        store.put(NAME, np.full(size, k, dtype=np.int64), attrs={"k": k})


@dataclass
class Report:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    generations_seen: int = 0
    leftovers_cleaned: int = 0


def check(path: str, last_k: int, report: Report) -> int:
    """Reopen for writing (recovery) and verify; return the committed k."""
    before = _files(path)
    with mmstore.Store(path) as store:
        after = _files(path)
        report.leftovers_cleaned += len(before) - len(after)
        array = store.get(NAME)
        info = store.info(NAME)
        k = int(info["attrs"]["k"])
        problems = []
        if not (array == k).all():
            problems.append(f"data is not the constant {k} of its header")
        digest = f"xxh3_64:{xxhash.xxh3_64_hexdigest(array)}"
        if digest != info["checksum"]:
            problems.append(f"checksum {digest} != header {info['checksum']}")
        if k < last_k:
            problems.append(f"went back from k={last_k} to k={k}")
        data_files = [f for f in after if f.endswith(".dat")]
        temps = [f for f in after if f.endswith(".tmp")]
        if len(data_files) != 1 or temps:
            problems.append(f"leftovers after recovery: {sorted(data_files + temps)}")
        if problems:
            report.failures.append(f"trial {report.trials}: " + "; ".join(problems))
        return k


def _files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


PACKED_ELEMENTS = 1024  # 8 KiB of int64: packed, and a 64 KiB packed file holds 7 of them


def run_trials(trials: int, mib: int, seed: int = 0, path: str | None = None, pack_small: bool = False) -> Report:
    rng = random.Random(seed)
    n = PACKED_ELEMENTS if pack_small else mib * 2**20 // 8
    context = multiprocessing.get_context("spawn")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mmstore-crash-") as temp:
        store_path = path or os.path.join(temp, "store")
        with mmstore.Store(store_path, pack_small=pack_small) as store:
            store.put(NAME, np.zeros(n, dtype=np.int64), attrs={"k": 0})
        # Calibrate: how long does one put take here? Kill instants span ~3 puts.
        start = time.perf_counter()
        with mmstore.Store(store_path, pack_small=pack_small) as store:
            store.put(NAME, np.zeros(n, dtype=np.int64), attrs={"k": 0})
        span = 3 * (time.perf_counter() - start) + 0.005
        last_k = 0
        for trial in range(trials):
            report.trials = trial + 1
            started = context.Event()
            child = context.Process(
                target=put_forever, args=(store_path, n, rng.choice([0, 2, 3]), started, pack_small)
            )
            child.start()
            if not started.wait(TIMEOUT):
                child.kill()
                report.failures.append(f"trial {trial}: writer never started")
                continue
            time.sleep(rng.uniform(0, span))
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(TIMEOUT)
            k = check(store_path, last_k, report)
            report.generations_seen += k > last_k
            last_k = max(last_k, k)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--mib", type=int, default=64, help="size of the large array (MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack-small", action="store_true", help="small puts into packed data files")
    args = parser.parse_args()
    start = time.perf_counter()
    report = run_trials(args.trials, args.mib, args.seed, pack_small=args.pack_small)
    elapsed = time.perf_counter() - start
    print(
        f"trials: {report.trials}  failures: {len(report.failures)}  new generations seen: "
        f"{report.generations_seen}  leftover files cleaned: {report.leftovers_cleaned}  ({elapsed:.0f} s)"
    )
    for failure in report.failures:
        print("  FAIL", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
