#!/usr/bin/env bash
# Sharing genomic records between processes with the mmstore CLI.
#
# 1. Generate a few text files of rows "chr pos pct c t".
# 2. `mmstore put` each one from its own process, in parallel.
# 3. Read them all back from another process.
# 4. `mmstore compact` the store to one HDF5 file and check with h5py that every record
#    matches the text it came from.
#
# Usage: scripts/example_genomics.sh [WORKDIR] [FILES] [ROWS]   (defaults: a temp dir, 4, 20000)
set -euo pipefail

WORK="${1:-$(mktemp -d)}"
FILES="${2:-4}"
ROWS="${3:-20000}"
PYTHON="${PYTHON:-python3}"
DTYPE="chr:S10,pos:i4,pct:f4,c:i4,t:i4"
STORE="$WORK/store"
mkdir -p "$WORK"

"$PYTHON" - "$WORK" "$FILES" "$ROWS" <<'PY'
import sys
import numpy as np
work, files, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(7)
for i in range(files):
    with open(f"{work}/sample{i}.txt", "w") as out:
        out.write("chr pos pct c t\n")
        chroms = rng.integers(1, 23, rows)
        for chrom, pos, pct, c, t in zip(chroms, rng.integers(1, 2**31 - 1, rows), rng.random(rows),
                                         rng.integers(0, 500, rows), rng.integers(0, 500, rows)):
            out.write(f"chr{chrom} {pos} {pct:.6f} {c} {t}\n")
PY

# One writer process per file, all at once, into one store.
pids=()
for ((i = 0; i < FILES; i++)); do
    mmstore --quiet put "$STORE" "samples/sample$i" "$WORK/sample$i.txt" --dtype "$DTYPE" --skip-rows 1 \
        --attr "source=sample$i.txt" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

mmstore ls "$STORE"

# Another process reads every dataset back (zero-copy) and checks it against the text.
"$PYTHON" - "$WORK" "$FILES" "$STORE" <<'PY'
import sys
import numpy as np
import mmstore
work, files, store_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dtype = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])
with mmstore.Store(store_path, "r") as store:
    for i in range(files):
        expected = np.loadtxt(f"{work}/sample{i}.txt", dtype=dtype, skiprows=1)
        got = store.get(f"samples/sample{i}")
        assert got.dtype == dtype and (got == expected).all(), f"sample{i} differs"
print(f"reader: {files} datasets match their text files")
PY

mmstore --quiet compact "$STORE" "$WORK/genomics.h5" --compression gzip
mmstore verify "$STORE"

"$PYTHON" - "$WORK" "$FILES" <<'PY'
import sys
import h5py
import numpy as np
work, files = sys.argv[1], int(sys.argv[2])
dtype = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])
total = 0
with h5py.File(f"{work}/genomics.h5", "r") as h5:
    for i in range(files):
        dataset = h5[f"samples/sample{i}"]
        expected = np.loadtxt(f"{work}/sample{i}.txt", dtype=dtype, skiprows=1)
        assert dataset.dtype == dtype, dataset.dtype
        assert (dataset[...] == expected).all(), f"sample{i} differs in HDF5"
        assert dataset.attrs["source"] == f"sample{i}.txt"
        total += len(expected)
print(f"h5py: all {total} records in genomics.h5 match the text files")
PY
