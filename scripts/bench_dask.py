#!/usr/bin/env python3
"""Benchmark: a Dask reduction over a large float64 dataset on a 2-worker LocalCluster.

One run, the same array fed to the same reduction (a sum) four ways:

- numpy (1 process):   ``array.sum()`` in this process over the array in memory: the baseline;
- mmstore to_dask:     ``mmstore.dask.to_dask(store, name).sum()`` on the cluster: tasks carry the
                       store path and header, each worker maps the data file and sums views of it;
- h5py from_array:     the dataset exported with ``mmstore.export_hdf5`` and read in the workers
                       through ``da.from_array`` over an h5py dataset (opened lazily in each worker,
                       since h5py objects do not pickle): every chunk is read (copied) out of the file;
- scatter:             the in-memory array cut into the same chunks and ``client.scatter``-ed to the
                       workers, then summed; the time includes the scatter (that is the cost of
                       feeding the cluster from the client), and the sum alone is reported too.

Each dask method builds a fresh graph every repeat; the cluster (2 worker processes, 1 thread
each) is started once. The store and the HDF5 file are read once before timing, so all start
from the page cache. Medians of --repeats runs after one untimed warm-up run per method; the
first (cold-worker) run of mmstore is reported separately. Every result is checked against the
numpy sum.

    python scripts/bench_dask.py                 # 4 GiB, 5 repeats (about 4 minutes; ~14 GiB of RAM)
    python scripts/bench_dask.py --gib 0.5       # smaller
    python scripts/bench_dask.py --quick         # smoke run (0.25 GiB, under a minute)
    python scripts/bench_dask.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20
GIB = 2**30
TARGET = 1.3  # mmstore-backed within this factor of the single-process numpy reduction


class H5Lazy:
    """An h5py dataset that opens itself in whichever process slices it (h5py objects do not pickle)."""

    def __init__(self, path: str, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path, self.name, self.shape, self.dtype, self.ndim = path, name, shape, dtype, len(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_dataset"}

    def __getitem__(self, key: Any) -> np.ndarray:
        if "_dataset" not in self.__dict__:
            import h5py

            self._dataset = h5py.File(self.path, "r")[self.name]
        return self._dataset[key]


def _timed(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def _read_through(path: str) -> None:
    with open(path, "rb", buffering=0) as file:
        while file.read(64 * MIB):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="dataset size in GiB (default 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-mib", type=int, default=128, help="chunk size in MiB (default 128)")
    parser.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.25 GiB, 2 repeats")
    parser.add_argument("--json", default=None, help="also write every sample to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.gib, args.repeats = 0.25, 2

    import dask
    import dask.array as da
    import distributed

    import mmstore
    from mmstore._filesystems import mount_of
    from mmstore.dask import to_dask

    columns = 1024
    rows = int(args.gib * GIB) // (8 * columns)
    chunk_rows = max(1, args.chunk_mib * MIB // (8 * columns))
    chunks = (chunk_rows, columns)
    workdir = tempfile.mkdtemp(prefix="bench_dask-", dir=args.dir)
    store_path, h5_path = os.path.join(workdir, "store"), os.path.join(workdir, "data.h5")
    print(
        f"# bench_dask: {rows:,} x {columns} float64 = {rows * columns * 8 / GIB:.2f} GiB, "
        f"chunks of {chunk_rows} rows ({chunk_rows * columns * 8 / MIB:.0f} MiB), {args.workers} workers"
    )
    print(
        f"# python {platform.python_version()}, numpy {np.__version__}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
        f"store on {mount_of(workdir)}"
    )

    rng = np.random.default_rng(7)
    array = np.empty((rows, columns))
    for start in range(0, rows, chunk_rows):
        array[start : start + chunk_rows] = rng.random((min(chunk_rows, rows - start), columns))
    with mmstore.Store(store_path) as store:
        store.put("x", array)
        mmstore.export_hdf5(store, h5_path)
        data_file = store.info("x")["data_file"]
    for path in (data_file, h5_path):
        _read_through(path)

    numpy_times = []
    expected = float(array.sum())
    for _ in range(args.repeats):
        seconds, total = _timed(array.sum)
        numpy_times.append(seconds)
        assert float(total) == expected

    samples: dict[str, list[float]] = {
        "mmstore to_dask": [],
        "h5py from_array": [],
        "scatter (incl. scatter)": [],
        "scatter (sum only)": [],
    }
    first_mmstore = 0.0
    with (
        distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):

        def mmstore_sum() -> float:
            return float(to_dask(store_path, "x", chunks=chunks).sum().compute())

        def h5_sum() -> float:
            lazy = H5Lazy(h5_path, "x", array.shape, array.dtype)
            return float(
                da.from_array(lazy, chunks=chunks, lock=False, asarray=True, meta=np.empty((0, 0))).sum().compute()
            )

        first_mmstore, total = _timed(mmstore_sum)
        assert np.isclose(total, expected, rtol=1e-9), (total, expected)
        for label, run in (("mmstore to_dask", mmstore_sum), ("h5py from_array", h5_sum)):
            _timed(run)  # warm-up (h5py: imports and opens the file in each worker)
            for _ in range(args.repeats):
                seconds, total = _timed(run)
                assert np.isclose(total, expected, rtol=1e-9), (label, total, expected)
                samples[label].append(seconds)

        blocks = [array[start : start + chunk_rows] for start in range(0, rows, chunk_rows)]
        for _ in range(args.repeats):
            start = time.perf_counter()
            futures = client.scatter(blocks)
            scattered = da.concatenate(
                [da.from_delayed(f, shape=b.shape, dtype=b.dtype) for f, b in zip(futures, blocks, strict=True)]
            )
            middle = time.perf_counter()
            total = float(scattered.sum().compute())
            end = time.perf_counter()
            assert np.isclose(total, expected, rtol=1e-9)
            samples["scatter (incl. scatter)"].append(end - start)
            samples["scatter (sum only)"].append(end - middle)
            del futures, scattered
            client.run(lambda: __import__("gc").collect())

    base = statistics.median(numpy_times)
    print("\n| method | median s | min s | vs numpy (1 process) |\n|---|---:|---:|---:|")
    print(f"| numpy sum, 1 process, in memory | {base:.3f} | {min(numpy_times):.3f} | 1.00x |")
    for label, values in samples.items():
        median = statistics.median(values)
        print(f"| {label} | {median:.3f} | {min(values):.3f} | {median / base:.2f}x |")
    print(
        f"| mmstore to_dask, first run (cold workers: map + page-table faults) | {first_mmstore:.3f} | | "
        f"{first_mmstore / base:.2f}x |"
    )
    ratio = statistics.median(samples["mmstore to_dask"]) / base
    scatter_ratio = statistics.median(samples["scatter (incl. scatter)"]) / statistics.median(
        samples["mmstore to_dask"]
    )
    print(
        f"\nmmstore/numpy {ratio:.2f}x (target <= {TARGET}x): {'met' if ratio <= TARGET else 'MISSED'}; "
        f"scatter takes {scatter_ratio:.1f}x as long as mmstore"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "numpy": numpy_times,
                    "first_mmstore": first_mmstore,
                    **samples,
                    "rows": rows,
                    "columns": columns,
                    "chunk_rows": chunk_rows,
                },
                indent=1,
            )
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
