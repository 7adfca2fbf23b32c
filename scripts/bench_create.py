#!/usr/bin/env python3
"""The floor under every commit: creating a file, on a quiet volume and after many deletes.

A put creates at least one file (the new sidecar) and frees one inode (the old
sidecar), a put that is not packed two of each. On ext4 *without a journal*, the
inode allocator skips inodes freed in the last 60 s (360 s while their inode-table
block is dirty) and checks each of them on every allocation, so a workload that
creates and deletes files quickly makes its own creations slower and slower. With a
journal (ext4's default) and on tmpfs, creation cost stays flat. This script shows
which kind of volume a directory is on: rounds of N x (create, write 300 bytes,
close, unlink) in a fresh directory, median per round.

    python scripts/bench_create.py                      # in the temp directory
    python scripts/bench_create.py --dir /some/volume   # elsewhere
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench_share import _fs_type  # scripts/ is on sys.path when a script runs


def rounds(directory: str, count: int, per_round: int) -> list[float]:
    """Median microseconds of create + write + close + unlink, per round."""
    medians = []
    payload = b"x" * 300
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for round_ in range(count):
        samples = []
        for i in range(per_round):
            path = os.path.join(directory, f".r{round_}.{i}.tmp")
            start = time.perf_counter()
            fd = os.open(path, flags, 0o600)
            os.write(fd, payload)
            os.close(fd)
            os.unlink(path)
            samples.append((time.perf_counter() - start) * 1e6)
        medians.append(statistics.median(samples))
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help="where to create the files (default: tempfile's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2000)
    args = parser.parse_args()
    if args.rounds < 1 or args.per_round < 1:
        parser.error("--rounds and --per-round must be >= 1")
    directory = tempfile.mkdtemp(prefix="mmstore-create-", dir=args.dir)
    try:
        medians = rounds(directory, args.rounds, args.per_round)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{directory} on {_fs_type(directory)}")
    print(f"create + write + close + unlink, {args.per_round} per round, median per round (us):")
    print("  " + "  ".join(f"{m:.1f}" for m in medians))
    print(f"last round / first round: {medians[-1] / medians[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
