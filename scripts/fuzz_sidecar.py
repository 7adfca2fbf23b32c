#!/usr/bin/env python3
"""Fuzz the sidecar parser with many generated inputs (the bounded version is tests/test_fuzz.py).

Three generators, in turn: random bytes; a valid header with one field replaced by a random
JSON value; a valid header mutated byte by byte (flips, deletions, insertions, truncation).
Every input must give a valid Header or a FormatError naming the dataset: any other
exception, or a parsed header whose size or data file escapes the rules, is a failure.

    python scripts/fuzz_sidecar.py --inputs 100000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import numpy as np

from mmstore import _format
from mmstore._errors import FormatError

GOOD = _format.Header(
    name="x", dtype=np.dtype([("chr", "S10"), ("pos", "<i4")]), shape=(4, 2), data_file="x.0123456789abcdef.dat",
    offset=0, generation=3, created=1.0, modified=2.0, attrs={"a": [1, 2]}, checksum="xxh3_64:0123456789abcdef",
).to_json()  # fmt: skip


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63, -(2**64), 10**30, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-308, 3.0])
    if kind == 4:
        return "".join(rng.choice("<>|fiuSUVOMm0123456789[]/.,x\\u0000") for _ in range(rng.randrange(8)))
    if kind == 5:
        return rng.choice(["<f8", "|O", "<U2", "", "/etc/passwd", "../x.dat", ".hidden", "x" * 300])
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(5)): random_json(rng, depth + 1) for _ in range(rng.randrange(3))}


def generate(rng: random.Random, index: int) -> bytes:
    mode = index % 3
    if mode == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
    if mode == 1:
        record = json.loads(GOOD)
        record[rng.choice(sorted(record))] = random_json(rng)
        return json.dumps(record).encode()
    data = bytearray(GOOD)
    for _ in range(rng.randrange(1, 6)):
        action = rng.randrange(4)
        position = rng.randrange(len(data)) if data else 0
        if action == 0 and data:
            data[position] ^= 1 << rng.randrange(8)
        elif action == 1 and data:
            del data[position]
        elif action == 2:
            data.insert(position, rng.randrange(256))
        else:
            del data[position:]
    return bytes(data)


def check(raw: bytes) -> str | None:
    try:
        header = _format.parse_header("fuzzed", raw)
    except FormatError as exc:
        return None if "fuzzed" in str(exc) else f"FormatError without the dataset name: {exc}"
    except Exception as exc:  # anything else is exactly what this looks for
        return f"{type(exc).__name__}: {exc}"
    if not 0 <= header.nbytes <= _format.MAX_NBYTES:
        return f"parsed with nbytes {header.nbytes}"
    if "/" in header.data_file or header.data_file.startswith("."):
        return f"parsed with data_file {header.data_file!r}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    failures, parsed = [], 0
    for index in range(args.inputs):
        raw = generate(rng, index)
        problem = check(raw)
        if problem is not None:
            failures.append((raw[:120], problem))
        elif index % 3 == 2:
            try:
                _format.parse_header("fuzzed", raw)
                parsed += 1
            except FormatError:
                pass
    elapsed = time.perf_counter() - start
    print(f"inputs: {args.inputs}  failures: {len(failures)}  valid mutants parsed: {parsed}  ({elapsed:.0f} s)")
    for raw, problem in failures[:20]:
        print("  FAIL", problem, raw)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
