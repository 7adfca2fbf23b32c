#!/usr/bin/env python3
"""Benchmark: `mmstore compact` (HDF5 export) against writing the same arrays with h5py directly.

A store of about --gib GiB is built once (not timed): 8 float64 (N, 64) matrices (3/32 of the
total each), a structured table ("chr" S10, "pos" i4, "pct" f4, "c" i4, "t" i4; 1/8), a 1-D
int32 index (1/8) and 100 small 1 KiB arrays in a group. Then, round-robin with the order
rotated every repeat, each method runs as its own subprocess writing a fresh .h5 file:

- compact (CLI):       the `mmstore --quiet compact STORE OUT.h5` executable (temp file, fsync, rename);
- export_hdf5 (API):   `python -c` calling mmstore.export_hdf5() - the same code without the CLI's
                       typer/rich start-up, and with an in-process timer;
- h5py + fsync:        `python -c` that reads each array with Store(path, "r").get(name) (a zero-copy
                       map) and writes it with h5.create_dataset(name, data=array), then fsyncs the
                       file and its directory - the fair comparison, since compact fsyncs;
- h5py (no fsync):     the same without the fsyncs (its data may still be in the page cache when the
                       clock stops).

With --lzf (the default, not with --quick), compact --compression lzf and h5py + fsync with
compression="lzf" are also timed, both with chunks=True (h5py's chunk guess); compression is
CPU-bound, so only those two. Before every run the outputs are deleted, os.sync() flushes any dirty
pages left by the previous run, and every store file is read once so that all methods start
with the store in the page cache. Wall time is spawn-to-exit of the subprocess (interpreter
start-up and imports included); peak RSS is GNU time's %M (the child's max RSS), or the
child's own VmHWM when /usr/bin/time is missing. Each method's first output is checked byte
for byte against the store (not timed).

    python scripts/bench_compact.py                  # 2 GiB store, 3 repeats (about 5 minutes)
    python scripts/bench_compact.py --no-lzf         # the same without compression (about 2 minutes)
    python scripts/bench_compact.py --quick          # smoke run, 0.25 GiB, no lzf (under 30 s)
    python scripts/bench_compact.py --json out.json  # also dump every sample as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import h5py
import numpy as np

import mmstore
from mmstore._filesystems import mount_of

MIB = 2**20
GIB = 2**30
BLOCK_BYTES = 16 * MIB  # rows generated / compared per block
SEED = 20240607
RSS_LIMIT_MIB = 256.0
SPEED_LIMIT = 1.2
STRUCT_DTYPE = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])
MATRIX_COLUMNS = 64
SMALL_COUNT = 100
SMALL_BYTES = 1024
GNU_TIME = "/usr/bin/time"
TIME_FORMAT = "%M %e %U %S %x"  # max RSS KiB, elapsed s, user s, sys s, exit status

_CHILD_COMMON = r"""
import json, os, sys, time
def _hwm():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None
def _report(path, **fields):
    with open(path, "w") as out:
        json.dump({"vmhwm_kib": _hwm(), **fields}, out)
"""

# argv: RESULT STORE OUT COMPRESSION(none|lzf|gzip) FSYNC(0|1)
BASELINE_SCRIPT = (
    _CHILD_COMMON
    + r"""
started = time.perf_counter()
import h5py
import mmstore
result, store_path, out_path, compression, fsync = sys.argv[1:6]
imported = time.perf_counter()
store = mmstore.Store(store_path, "r")
with h5py.File(out_path, "w") as h5:
    for name in store.keys():
        array = store.get(name)
        options = {}
        if compression != "none" and array.ndim and array.size:
            options = {"compression": compression, "chunks": True}
        h5.create_dataset(name, data=array, **options)
if fsync == "1":
    for target in (out_path, os.path.dirname(os.path.abspath(out_path))):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
done = time.perf_counter()
store.close()
_report(result, work_s=done - imported, import_s=imported - started)
"""
)

# argv: RESULT STORE OUT COMPRESSION(none|lzf|gzip)
API_SCRIPT = (
    _CHILD_COMMON
    + r"""
started = time.perf_counter()
import h5py
import mmstore
result, store_path, out_path, compression = sys.argv[1:5]
imported = time.perf_counter()
with mmstore.Store(store_path, "r") as store:
    mmstore.export_hdf5(store, out_path, compression=None if compression == "none" else compression)
done = time.perf_counter()
_report(result, work_s=done - imported, import_s=imported - started)
"""
)

# Only without GNU time: runs the CLI in-process to report its VmHWM. argv: RESULT CLI-ARGS...
CLI_WRAPPER_SCRIPT = (
    _CHILD_COMMON
    + r"""
result = sys.argv[1]
sys.argv = ["mmstore", *sys.argv[2:]]
code = 0
try:
    from mmstore.cli import main
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    _report(result)
sys.exit(code)
"""
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "cli", "api" or "h5py"
    compression: str | None
    fsync: bool


@dataclass
class Sample:
    method: str
    compression: str | None
    repeat: int
    position: int  # place in this repeat's order (0 = first)
    wall_s: float
    rss_kib: int | None
    rss_source: str
    vmhwm_kib: int | None = None  # the child's own VmHWM (wrappers only)
    work_s: float | None = None  # in-process time after imports (wrappers only)
    import_s: float | None = None
    cpu_s: float | None = None  # user + sys from GNU time
    time_elapsed_s: float | None = None  # GNU time's own wall clock
    out_bytes: int = 0
    warm_s: float = 0.0  # untimed: reading the store into the page cache before this run
    sync_s: float = 0.0  # untimed: os.sync() before this run


@dataclass
class Env:
    workdir: Path
    store: Path
    outdir: Path
    metadir: Path
    mmstore_exe: str
    gnu_time: bool
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)


# --- building the store ------------------------------------------------------------------


def _row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    per_block = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, rows, per_block):
        yield start, min(rows, start + per_block)


def _matrix_blocks(rng: np.random.Generator, rows: int, index: int) -> Iterator[np.ndarray]:
    for start, stop in _row_blocks(rows, MATRIX_COLUMNS * 8):
        shape = (stop - start, MATRIX_COLUMNS)
        if index % 2 == 0:  # noise: barely compressible
            yield rng.standard_normal(shape)
        else:  # counts stored as float64: compressible
            yield rng.poisson(20.0, shape).astype(np.float64)


def _table_blocks(rng: np.random.Generator, rows: int) -> Iterator[np.ndarray]:
    chromosomes = np.array([f"chr{i}".encode() for i in [*range(1, 23), "X", "Y"]], dtype="S10")
    position = 0
    for start, stop in _row_blocks(rows, STRUCT_DTYPE.itemsize):
        n = stop - start
        block = np.empty(n, STRUCT_DTYPE)
        block["chr"] = chromosomes[(np.arange(start, stop) * len(chromosomes)) // rows]
        steps = rng.integers(1, 200, n, dtype=np.int32)
        block["pos"] = position + np.cumsum(steps, dtype=np.int64) % 2**31
        position = int(block["pos"][-1])
        coverage = rng.integers(0, 40, n, dtype=np.int32)
        methylated = rng.binomial(coverage, 0.7).astype(np.int32)
        block["c"] = methylated
        block["t"] = coverage - methylated
        block["pct"] = np.where(coverage > 0, 100.0 * methylated / np.maximum(coverage, 1), 0.0)
        yield block


def _index_blocks(rng: np.random.Generator, rows: int) -> Iterator[np.ndarray]:
    base = 0
    for start, stop in _row_blocks(rows, 4):
        steps = rng.integers(0, 8, stop - start, dtype=np.int32)
        block = (base + np.cumsum(steps, dtype=np.int64)) % 2**31
        base = int(block[-1])
        yield block.astype(np.int32)


def build_store(path: Path, gib: float) -> dict[str, Any]:
    """Write the benchmark store, one bounded block at a time. Returns a description."""
    total = int(gib * GIB)
    rng = np.random.default_rng(SEED)
    matrix_rows = max(1, (total * 3 // 32) // (MATRIX_COLUMNS * 8))
    table_rows = max(1, (total // 8) // STRUCT_DTYPE.itemsize)
    index_rows = max(1, (total // 8) // 4)
    with mmstore.Store(path, "w-") as store:
        for i in range(8):
            store.put_blocks(f"matrix/m{i:02d}", _matrix_blocks(rng, matrix_rows, i), dtype="<f8", attrs={"i": i})
        store.put_blocks("table/methylation", _table_blocks(rng, table_rows), dtype=STRUCT_DTYPE, attrs={"ref": "x"})
        store.put_blocks("index/positions", _index_blocks(rng, index_rows), dtype="<i4")
        for i in range(SMALL_COUNT):
            store.put(f"small/s{i:03d}", rng.standard_normal(SMALL_BYTES // 8), attrs={"n": i})
        names = store.keys()
        nbytes = sum(store.info(name)["nbytes"] for name in names)
    return {
        "datasets": len(names),
        "nbytes": nbytes,
        "layout": [
            f"8 x float64 ({matrix_rows:,}, {MATRIX_COLUMNS}) = {8 * matrix_rows * MATRIX_COLUMNS * 8 / MIB:,.0f} MiB "
            "(even: normal noise, odd: Poisson counts)",
            f"structured {STRUCT_DTYPE.itemsize}-byte rows x {table_rows:,} = "
            f"{table_rows * STRUCT_DTYPE.itemsize / MIB:,.0f} MiB",
            f"int32 1-D x {index_rows:,} = {index_rows * 4 / MIB:,.0f} MiB",
            f"{SMALL_COUNT} x {SMALL_BYTES} B float64 in small/",
        ],
    }


# --- one measured run --------------------------------------------------------------------


def warm_store(path: Path) -> tuple[int, float]:
    """Read every file of the store once (plain read(), no map) so it is in the page cache."""
    started = time.perf_counter()
    buffer = bytearray(BLOCK_BYTES)
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb", buffering=0) as stream:
                while count := stream.readinto(buffer):
                    total += count
    return total, time.perf_counter() - started


def clear_outputs(env: Env) -> None:
    for entry in os.scandir(env.outdir):  # includes compact's hidden temp files, if any
        os.unlink(entry.path)
    for entry in os.scandir(env.metadir):
        os.unlink(entry.path)


def command(env: Env, method: Method, out: Path, result: Path) -> list[str]:
    compression = method.compression or "none"
    if method.kind == "cli":
        # --quiet is a global option of the mmstore command: it must come before the subcommand.
        args = ["--quiet", "compact", str(env.store), str(out)]
        if method.compression:
            args += ["--compression", method.compression]
        if env.gnu_time:
            return [env.mmstore_exe, *args]
        return [sys.executable, "-c", CLI_WRAPPER_SCRIPT, str(result), *args]
    if method.kind == "api":
        return [sys.executable, "-c", API_SCRIPT, str(result), str(env.store), str(out), compression]
    fsync = "1" if method.fsync else "0"
    return [sys.executable, "-c", BASELINE_SCRIPT, str(result), str(env.store), str(out), compression, fsync]


def run_one(env: Env, method: Method, repeat: int, position: int) -> tuple[Sample, Path]:
    clear_outputs(env)
    started = time.perf_counter()
    os.sync()  # write back whatever the previous run left dirty, outside the clock
    synced = time.perf_counter() - started
    _bytes, warm = warm_store(env.store)
    out = env.outdir / f"{method.key}.h5"
    result = env.metadir / "result.json"
    timing = env.metadir / "time.txt"
    log = env.metadir / "log.txt"
    argv = command(env, method, out, result)
    if env.gnu_time:
        argv = [GNU_TIME, "-f", TIME_FORMAT, "-o", str(timing), *argv]
    with open(log, "wb") as log_stream:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_stream, stderr=log_stream)
        env.running.append(proc)
        code = proc.wait()
        wall = time.perf_counter() - started
        env.running.remove(proc)
    if code != 0:
        text = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{method.label} exited with status {code}: {shlex.join(argv)}\n{text}")
    sample = Sample(method.key, method.compression, repeat, position, wall, None, "", warm_s=warm, sync_s=synced)
    if result.exists():
        info = json.loads(result.read_text())
        sample.vmhwm_kib = info.get("vmhwm_kib")
        sample.work_s = info.get("work_s")
        sample.import_s = info.get("import_s")
    if env.gnu_time:
        fields = timing.read_text().strip().splitlines()[-1].split()  # the last line is our format
        sample.rss_kib, sample.time_elapsed_s = int(fields[0]), float(fields[1])
        sample.cpu_s = float(fields[2]) + float(fields[3])
        sample.rss_source = "GNU time %M"
    else:
        sample.rss_kib, sample.rss_source = sample.vmhwm_kib, "child VmHWM"
    sample.out_bytes = out.stat().st_size
    return sample, out


# --- checking an output ------------------------------------------------------------------


def verify_output(store_path: Path, out: Path, expect_attrs: bool) -> list[str]:
    """Compare every dataset of ``out`` with the store, byte for byte, in bounded blocks."""
    problems: list[str] = []
    found: list[str] = []
    with mmstore.Store(store_path, "r") as store, h5py.File(out, "r") as h5:
        h5.visititems(lambda key, obj: found.append(key) if isinstance(obj, h5py.Dataset) else None)
        names = store.keys()
        if sorted(found) != names:
            problems.append(f"dataset names differ: {len(found)} in the file, {len(names)} in the store")
        for name in names:
            if name not in h5:
                continue
            dataset, array = h5[name], store.get(name)
            if dataset.shape != array.shape or np.dtype(dataset.dtype).itemsize != array.dtype.itemsize:
                problems.append(f"{name}: {dataset.shape} {dataset.dtype} vs {array.shape} {array.dtype}")
                continue
            if expect_attrs and "mmstore.dtype" not in dataset.attrs:
                problems.append(f"{name}: no mmstore.dtype attribute")
            row_bytes = max(1, array.nbytes // max(1, len(array))) if array.ndim else 1
            for start, stop in _row_blocks(len(array) if array.ndim else 1, row_bytes):
                written = dataset[start:stop] if array.ndim else dataset[()]
                expected = array[start:stop] if array.ndim else array
                if np.ascontiguousarray(written).tobytes() != np.ascontiguousarray(expected).tobytes():
                    problems.append(f"{name}: rows {start}:{stop} differ")
                    break
            del array
    return problems


# --- report ------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def machine_lines(env: Env, args: argparse.Namespace, layout: dict[str, Any], build_s: float) -> list[str]:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    usage = shutil.disk_usage(env.workdir)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rss = "GNU time %M (max RSS of the child)" if env.gnu_time else "the child's /proc/self/status VmHWM"
    return [
        "# mmstore compact vs h5py benchmark",
        "",
        f"- Command: `{shlex.join(sys.orig_argv)}`",
        f"- Machine: {cpu}, nproc={nproc} (cpu_count={os.cpu_count()}), {memory:.1f} GiB RAM, {platform.platform()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, h5py {h5py.__version__} "
        f"(HDF5 {h5py.version.hdf5_version}), mmstore {mmstore.__version__} (git {_git_revision()})",
        f"- Temp dir: {env.workdir} on {_fs_type(env.workdir)} ({usage.free / GIB:.0f} GiB free)",
        f"- Load average at start: {load} (shared box: other jobs may be running); "
        f"started {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- Store: {layout['datasets']} datasets, {layout['nbytes'] / GIB:.3f} GiB, built in {build_s:.1f} s "
        "(not timed): " + "; ".join(layout["layout"]),
        f"- {args.repeats} repeats; order rotated every repeat; compact executable: {env.mmstore_exe}; "
        f"peak RSS from {rss}",
        "",
    ]


def _git_revision() -> str:
    """The commit of the mmstore checkout being measured, and whether its library code is modified."""
    package = Path(mmstore.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        changed = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if head.returncode != 0:
        return "not a git checkout"
    return head.stdout.strip() + (" + uncommitted changes in mmstore/" if changed.stdout.strip() else "")


def _fs_type(path: Path) -> str:
    mount = mount_of(str(path))
    return "?" if mount is None else f"{mount.type} ({mount.source} at {mount.point})"


def summarize(methods: list[Method], samples: list[Sample]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [s for s in samples if s.method == method.key]
        rss = [s.rss_kib for s in mine if s.rss_kib is not None]
        work = [s.work_s for s in mine if s.work_s is not None]
        cpu = [s.cpu_s for s in mine if s.cpu_s is not None]
        walls = [s.wall_s for s in mine]
        summary[method.key] = {
            "label": method.label,
            "compression": method.compression,
            "runs": len(mine),
            "median_s": _median(walls),
            "min_s": min(walls) if walls else float("nan"),
            "max_s": max(walls) if walls else float("nan"),
            "peak_rss_mib": max(rss) / 1024 if rss else None,
            "median_work_s": _median(work) if work else None,
            "median_cpu_s": _median(cpu) if cpu else None,
            "out_mib": mine[-1].out_bytes / MIB if mine else None,
        }
    return summary


def report(
    methods: list[Method], summary: dict[str, dict[str, Any]], problems: dict[str, list[str]], data_bytes: int
) -> tuple[list[str], list[dict[str, Any]]]:
    out: list[str] = []
    checks: list[dict[str, Any]] = []
    variants = sorted({m.compression or "" for m in methods})
    for variant in variants:
        group = [m for m in methods if (m.compression or "") == variant]
        ref = summary[f"h5py_fsync{_suffix(variant)}"]
        ref_nosync = summary.get(f"h5py{_suffix(variant)}")
        title = f"compression {variant}, chunks=True" if variant else "no compression (contiguous)"
        out.append(f"## {title}")
        out.append("")
        out.append(
            "| method | median s | min s | peak RSS MiB | ratio vs h5py (+fsync) | ratio vs h5py (no fsync) "
            "| MiB/s (median) | in-process s | CPU s | output MiB |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for method in group:
            s = summary[method.key]
            nosync = "-" if ref_nosync is None else f"{s['median_s'] / ref_nosync['median_s']:.2f}x"
            out.append(
                f"| {method.label} | {_fmt(s['median_s'])} | {_fmt(s['min_s'])} | {_fmt(s['peak_rss_mib'], 0)} "
                f"| {s['median_s'] / ref['median_s']:.2f}x | {nosync} "
                f"| {data_bytes / MIB / s['median_s']:.0f} | {_fmt(s['median_work_s'])} | {_fmt(s['median_cpu_s'])} "
                f"| {_fmt(s['out_mib'], 0)} |"
            )
        out.append("")
        compact = summary[f"compact{_suffix(variant)}"]
        what = f" (--compression {variant})" if variant else ""
        ratio, ratio_min = compact["median_s"] / ref["median_s"], compact["min_s"] / ref["min_s"]
        checks.append(
            {
                "target": f"compact{what} within {SPEED_LIMIT}x of h5py + fsync: median {compact['median_s']:.2f} s "
                f"vs {ref['median_s']:.2f} s = {ratio:.2f}x (min vs min {ratio_min:.2f}x)",
                "pass": ratio <= SPEED_LIMIT,
                "gating": True,
            }
        )
        if ref_nosync is None:
            continue
        ratio, ratio_min = compact["median_s"] / ref_nosync["median_s"], compact["min_s"] / ref_nosync["min_s"]
        checks.append(
            {
                "target": f"compact{what} vs h5py without fsync: median {compact['median_s']:.2f} s "
                f"vs {ref_nosync['median_s']:.2f} s = {ratio:.2f}x (min vs min {ratio_min:.2f}x; "
                f"within {SPEED_LIMIT}x: {'yes' if ratio <= SPEED_LIMIT else 'no'})",
                "pass": ratio <= SPEED_LIMIT,
                "gating": False,
            }
        )
    compact_rss = [s["peak_rss_mib"] for k, s in summary.items() if k.startswith("compact")]
    peak = max((r for r in compact_rss if r is not None), default=float("nan"))
    checks.append(
        {
            "target": f"compact peak RSS {peak:.0f} MiB < {RSS_LIMIT_MIB:.0f} MiB (max over all its runs)",
            "pass": peak < RSS_LIMIT_MIB,
            "gating": True,
        }
    )
    bad = {key: found for key, found in problems.items() if found}
    checks.append(
        {
            "target": "every method's first output matches the store byte for byte"
            + (f": {bad}" if bad else f" ({len(problems)} outputs checked)"),
            "pass": not bad,
            "gating": True,
        }
    )
    out.append("## Targets")
    out.append("")
    for check in checks:
        verdict = ("PASS" if check["pass"] else "FAIL") if check["gating"] else "info"
        out.append(f"- {verdict}: {check['target']}")
    out.append("")
    return out, checks


def _suffix(compression: str | None) -> str:
    return f"_{compression}" if compression else ""


NOTES = [
    "Notes:",
    "",
    "- Wall time is from spawning the subprocess to its exit: interpreter start-up and imports count for every "
    "method (the compact CLI also imports typer and rich; 'in-process s' is the wrappers' own timer after imports).",
    "- The fair comparison is h5py + fsync: compact always fsyncs its temp file, renames it into place and fsyncs "
    "the directory; h5py without fsync stops the clock with its data possibly still dirty in the page cache.",
    "- The h5py baseline writes each array with one create_dataset(name, data=mapped_array) call; compact streams "
    "16 MiB pread() blocks and also writes two JSON attributes (+ the native attrs) per dataset.",
    "- The h5py baseline reads the store through get()'s maps, so every page of the store it touches counts in its "
    "RSS (shared page cache, not private memory); the RSS target applies to compact only.",
    "- Untimed before every run: outputs deleted, os.sync(), store read once into the page cache.",
    "- Targets compare medians; on a noisy shared machine compare min vs min too. The lzf section times only "
    "compact and h5py + fsync (compression is CPU-bound, so fsync and start-up matter less there).",
]


# --- main --------------------------------------------------------------------------------


def make_methods(lzf: bool) -> list[Method]:
    methods: list[Method] = []
    for compression in [None, "lzf"] if lzf else [None]:
        tag = _suffix(compression)
        what = f", {compression}" if compression else ""
        methods.append(Method(f"compact{tag}", f"mmstore compact (CLI{what})", "cli", compression, True))
        if compression is None:  # compression is CPU-bound and slow: only the two methods that matter
            methods.append(Method(f"api{tag}", f"mmstore.export_hdf5 (python -c{what})", "api", compression, True))
        methods.append(Method(f"h5py_fsync{tag}", f"h5py + fsync{what}", "h5py", compression, True))
        if compression is None:
            methods.append(Method(f"h5py{tag}", f"h5py, no fsync{what}", "h5py", compression, False))
    return methods


def find_mmstore() -> str:
    """The console script next to this interpreter (skips pyenv-style shims on PATH, which add start-up time)."""
    beside = Path(sys.executable).parent / "mmstore"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mmstore")
    if found is None:
        raise SystemExit("bench_compact: no `mmstore` executable next to sys.executable or on PATH")
    return found


def _gnu_time_works() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        probe = subprocess.run([GNU_TIME, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "GNU" in probe.stdout + probe.stderr


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_children(env: Env) -> None:
    """Stop the subprocess we started, if one is running (it got the terminal's SIGINT too)."""
    for proc in list(env.running):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--gib", type=float, default=None, help="total store size in GiB (default 2; --quick 0.25)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per method (default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run, about 0.25 GiB (under 30 s)")
    parser.add_argument(
        "--lzf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time --compression lzf: compact vs h5py + fsync (default: on; off with --quick)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write every sample and the summary as JSON")
    parser.add_argument("--tmpdir", default="/tmp", help="where the store and outputs go (default /tmp)")
    args = parser.parse_args(argv)
    args.gib = args.gib if args.gib is not None else (0.25 if args.quick else 2.0)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    args.lzf = args.lzf if args.lzf is not None else not args.quick
    if args.repeats < 1 or not 0.001 <= args.gib <= 3.0:
        parser.error("--repeats must be >= 1 and --gib between 0.001 and 3 (disk use is about 2.1 x --gib)")
    free = shutil.disk_usage(args.tmpdir).free
    if free < 2.3 * args.gib * GIB + GIB:
        parser.error(f"{args.tmpdir} has {free / GIB:.1f} GiB free; need about {2.3 * args.gib + 1:.1f} GiB")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="mmstore-compact-", dir=args.tmpdir))
    env = Env(workdir, workdir / "store", workdir / "out", workdir / "meta", find_mmstore(), _gnu_time_works())
    env.outdir.mkdir()
    env.metadir.mkdir()
    methods = make_methods(args.lzf)
    samples: list[Sample] = []
    problems: dict[str, list[str]] = {}
    started = time.perf_counter()
    results: dict[str, Any] = {"argv": sys.orig_argv, "config": {k: v for k, v in vars(args).items()}}
    try:
        began = time.perf_counter()
        layout = build_store(env.store, args.gib)
        build_s = time.perf_counter() - began
        head = machine_lines(env, args, layout, build_s)
        print("\n".join(head), flush=True)
        # Untimed warm-up: the CLI's and the baseline's modules into the page cache.
        subprocess.run([env.mmstore_exe, "--help"], capture_output=True, check=True)
        subprocess.run([sys.executable, "-c", "import h5py, mmstore"], check=True)
        for repeat in range(args.repeats):
            for compression in [None, "lzf"] if args.lzf else [None]:
                group = [m for m in methods if m.compression == compression]
                shift = repeat % len(group)
                order = group[shift:] + group[:shift]
                for position, method in enumerate(order):
                    sample, out = run_one(env, method, repeat, position)
                    samples.append(sample)
                    rss = "-" if sample.rss_kib is None else f"{sample.rss_kib / 1024:.0f} MiB"
                    print(f"  repeat {repeat + 1}/{args.repeats}  {method.label:40s} {sample.wall_s:7.2f} s  {rss}")
                    if method.key not in problems:
                        problems[method.key] = verify_output(env.store, out, expect_attrs=method.kind != "h5py")
        print(flush=True)
        summary = summarize(methods, samples)
        body, checks = report(methods, summary, problems, layout["nbytes"])
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        stop_children(env)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.perf_counter() - started
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    body += [*NOTES, "", f"Total run time {elapsed:.1f} s; load average at end: {load}."]
    if args.quick:
        body.append("(--quick: a small store and few repeats; not the figures to quote.)")
    print("\n".join(body), flush=True)
    if args.json:
        results.update(
            header=head,
            store=layout,
            samples=[asdict(s) for s in samples],
            summary=summary,
            verification=problems,
            targets=checks,
            report=body,
            total_seconds=elapsed,
        )
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
