"""Instructions and system calls of a 1 KiB put that replaces a dataset, under callgrind and strace.

Wall-clock figures of a ~100 us operation move by 2x on a shared machine; instruction
counts do not. This counts, with valgrind's callgrind, the user-space instructions of a
loop of puts that replace existing datasets (the steady state of a cache or a producer),
divided by the number of puts, and with strace the system calls of one such put:

- ``mmstore``: ``Store.put(name, array)`` (a new data file per generation);
- ``mmstore-packed``: the same through ``Store(path, pack_small=True)``;
- ``floor`` and ``floor-packed``: bench_share.py's bare system calls of the same two
  designs (no lock, no checks, no checksum).

Only the loop is counted (``--toggle-collect`` on the C function that runs it), so the
interpreter's start, the imports and the store's creation are not. Counts are
deterministic for a given build (PYTHONHASHSEED=0, one BLAS thread), so two versions
of mmstore compare exactly. The store lives in /dev/shm when it exists (the count does
not depend on the file system; it only runs faster there).

    python scripts/count_put_instructions.py            # needs valgrind (strace optional)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from count_get_instructions import callgrind_instructions, deterministic_env  # (scripts/ is sys.path[0])

HERE = os.path.dirname(os.path.abspath(__file__))

PUTS = 400
KEYS = 20

# itertools.starmap runs the loop; callgrind collects only inside starmap_next.
CHILD = """
import itertools, sys
import numpy as np
root, kind, here, puts, keys = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
values = [rng.random(128) for _ in range(keys)]
if kind.startswith("floor"):
    sys.path.insert(0, here)
    from bench_share import _small_floor
    names, put, _get, _close = _small_floor(root, keys, packed=kind == "floor-packed")
else:
    import mmstore
    store = mmstore.Store(root + "/store", "w-", pack_small=kind == "mmstore-packed")
    names, put = [f"k{i:03d}" for i in range(keys)], store.put
for i in range(2 * keys):  # create every dataset, then replace each once: the steady state
    put(names[i % keys], values[i % keys])
if len(sys.argv) > 6:  # strace mode: mark the one put to count
    import os
    os.access("/mmstore-count-start", os.F_OK)
    put(names[0], values[0])
    os.access("/mmstore-count-end", os.F_OK)
else:
    list(itertools.starmap(lambda i: put(names[i % keys], values[i % keys]), ((i,) for i in range(puts))))
"""


def _scratch() -> str:
    return tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def instructions(kind: str) -> float:
    root = _scratch()
    try:
        return callgrind_instructions([CHILD, root, kind, HERE, str(PUTS), str(KEYS)], kind, timeout=900) / PUTS
    finally:
        shutil.rmtree(root, ignore_errors=True)


def system_calls(kind: str) -> list[str] | None:
    """The system calls of one replacing put, by name, or None without strace."""
    if shutil.which("strace") is None:
        return None
    root = _scratch()
    try:
        with tempfile.TemporaryDirectory() as out:
            trace = f"{out}/trace"
            command = ["strace", "-o", trace, sys.executable, "-c", CHILD, root, kind, HERE, "0", str(KEYS), "one"]
            subprocess.run(command, capture_output=True, env=deterministic_env(), check=True, timeout=300)
            with open(trace) as lines:
                text = lines.read()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    inside = text.split("mmstore-count-start", 1)[1].split("\n", 1)[1].split("mmstore-count-end", 1)[0]
    return [line.split("(", 1)[0] for line in inside.splitlines()[:-1] if "(" in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    kinds = ("mmstore", "floor", "mmstore-packed", "floor-packed")
    counts = {kind: instructions(kind) for kind in kinds}
    calls = {kind: system_calls(kind) for kind in kinds}
    print(f"| 1 KiB put replacing a dataset ({PUTS} puts over {KEYS} datasets) | instructions per put | system calls |")
    print("|---|---:|---|")
    for kind in kinds:
        listed = calls[kind]
        described = "(no strace)" if listed is None else f"{len(listed)}: {' '.join(listed)}"
        print(f"| {kind} | {counts[kind]:,.0f} | {described} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
