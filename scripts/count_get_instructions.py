"""Instructions executed by the first get of a dataset in a fresh process, under callgrind.

Wall-clock figures for one call of a few tens of microseconds move by 2x on a shared
machine; instruction counts do not. This counts, with valgrind's callgrind, the user-space
instructions of exactly one call in a fresh interpreter:

- ``mmstore``: ``store.get(name)`` right after ``Store(path, "r")`` (whose warm-up has run);
- ``floor``: the bare open/read/``json.loads``/open/fstat/mmap/``np.frombuffer`` of
  bench_share.py's ``_raw_get``, after one call on another dataset (its warm-up);
- ``mmstore-repeat``: the same ``store.get(name)`` a second time (the cached path).

Only the call is counted (``--toggle-collect`` on the C function that runs it), so the
interpreter's start, the imports and the Store open are not. Counts are deterministic for a
given build (PYTHONHASHSEED=0, one BLAS thread), so two versions of mmstore compare exactly.

    python scripts/count_get_instructions.py            # needs valgrind
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import mmstore

HERE = os.path.dirname(os.path.abspath(__file__))

# itertools.starmap runs the one call; callgrind collects only inside starmap_next.
CHILD = """
import itertools, sys
root, kind = sys.argv[1], sys.argv[2]
if kind == "floor":
    sys.path.insert(0, sys.argv[3])
    from bench_share import _raw_get
    _raw_get(root, "warm")
    call = lambda: _raw_get(root, "small")
else:
    import mmstore
    store = mmstore.Store(root, "r")
    if kind == "mmstore-repeat":
        store.get("small")
    call = lambda: store.get("small")
list(itertools.starmap(call, [()]))
"""


def deterministic_env() -> dict[str, str]:
    """The environment of a counted child: fixed hashing, one BLAS thread."""
    return {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def callgrind_instructions(child: list[str], what: str, timeout: float = 600) -> int:
    """User-space instructions that ``python -c *child`` runs inside itertools.starmap
    (the child wraps exactly what is to be counted in one)."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            "valgrind", "--tool=callgrind", "--toggle-collect=starmap_next",
            f"--callgrind-out-file={out}/callgrind.out", sys.executable, "-c", *child,
        ]  # fmt: skip
        env = deterministic_env()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({what}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def count(root: str, kind: str) -> int:
    return callgrind_instructions([CHILD, root, kind, HERE], kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        with mmstore.Store(root, "a") as store:
            store.put("warm", rng.random(128))
            store.put("small", rng.random(128))
        counts = {kind: count(root, kind) for kind in ("mmstore", "floor", "mmstore-repeat")}
    print("| one call in a fresh process | instructions | vs floor |")
    print("|---|---:|---:|")
    for kind, value in counts.items():
        print(f"| {kind} | {value:,} | {value / counts['floor']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
