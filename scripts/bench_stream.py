#!/usr/bin/env python3
"""Benchmark: streaming 64-byte rows from a producer to followers: mmstore growable datasets
against h5py SWMR, multiprocessing.Queue and a raw memory-mapped floor, in one run.

Part 1 (append throughput) appends batches of 1, 100 and 10,000 rows and commits after every
batch, in the main process: mmstore Writer.append + flush (no reader; with capacity
preallocated; with one follower process attached), h5py SWMR (resize + write + ds.flush()),
multiprocessing.Queue (put per batch, timed until a consumer process has received every row)
and a raw floor (copy the rows into an np.memmap of a fresh posix_fallocate'd file and store the
new count in a mapped int64: no system calls), plus a memcpy floor (the same into a pre-faulted
ring). Rows/s is the median over repeats; the methods run round-robin in a shuffled order per
repeat, each with a fresh file (deleted afterwards).

Part 2 (flush-to-follower latency): the main process commits one row at a time with a random
0.2-2 ms sleep between commits; a follower process (spawned and ready before the clock
starts) stamps time.perf_counter_ns() when it holds the row. Latency = follower's stamp -
producer's stamp taken right before the commit call (CLOCK_MONOTONIC is system-wide on
Linux). The follower's CPU use is time.process_time() over wall time between the first and
the last row it saw. A multiprocessing.Pipe (send_bytes -> blocking recv_bytes) is measured
as the machine's reference cost of waking a blocked process.

    python scripts/bench_stream.py                  # full run (about 1.5-3 minutes)
    python scripts/bench_stream.py --quick          # smoke run (well under 30 s)
    python scripts/bench_stream.py --json out.json  # also dump every sample as JSON
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import h5py
import numpy as np
from _report import emit  # scripts/ is on sys.path when a script runs

import mmstore
from mmstore._filesystems import mount_of

ROW_DTYPE = np.dtype([("seq", "<u8"), ("t", "<f8"), ("payload", "<f8", (6,))])
ROW_BYTES = ROW_DTYPE.itemsize
assert ROW_BYTES == 64
BATCH_SIZES = (1, 100, 10_000)
STOP = np.uint64(np.iinfo(np.uint64).max)  # seq of the row that ends a follower's run (Part 1)
RAW_HEADER = 4096  # raw files: an int64 count at offset 0, rows from offset 4096
RING_ROWS = 1_000_000  # raw floor ring: 64 MB, a multiple of every batch size
QUEUE_MAXSIZE = 64  # batches in flight on the Queue (bounds the backlog, and the time past the deadline)
TIMEOUT = 120.0
SEED = 20240607


@dataclass
class Config:
    repeats: int
    seconds: float  # time budget of one throughput measurement
    max_rows: int  # row budget of one throughput measurement (bounds file sizes)
    samples: int  # latency samples per method (after warm-up), split over rounds
    rounds: int  # latency rounds: each method gets a fresh follower per round
    warmup: int  # latency samples discarded at the start of every round
    gap_ms: tuple[float, float]
    quick: bool


# --- child processes -----------------------------------------------------------------------


def _child_main(kind: str, conn: Connection, params: dict[str, Any], channel: Any) -> None:
    try:
        if kind == "queue_sink":
            _queue_sink(conn, channel)
        elif kind == "mmstore_sink":
            _mmstore_sink(conn, params)
        elif kind == "latency":
            _latency_follower(conn, params, channel)
        else:
            raise ValueError(f"unknown child kind {kind!r}")
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


def _queue_sink(conn: Connection, channel: Any) -> None:
    """Part 1 consumer: drain the Queue, report the rows received at every None."""
    get = channel.get
    conn.send(("ready",))
    rows = 0
    while True:
        item = get()
        if item is None:
            conn.send(("done", rows))
            rows = 0
        elif isinstance(item, str):
            return
        else:
            rows += 1 if item.ndim == 0 else len(item)


def _mmstore_sink(conn: Connection, params: dict[str, Any]) -> None:
    """Part 1 follower: for each dataset name received, follow() it until the STOP row."""
    store = mmstore.Store(params["path"], "r")
    conn.send(("ready",))
    while True:
        name = conn.recv()
        if name is None:
            store.close()
            return
        reader = store.open_reader(name)
        reader.wait(timeout=0.001)  # sets up the inotify watch before the producer starts
        conn.send(("ready",))
        rows = blocks = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for block in reader.follow():
            rows += len(block)
            blocks += 1
            if block["seq"][-1] == STOP:
                break
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        reader.close()
        conn.send(("done", rows, blocks, cpu, wall))


def _latency_follower(conn: Connection, params: dict[str, Any], channel: Any) -> None:
    method, total = params["method"], params["total"]
    seen = np.zeros(total, np.int64)
    clock = time.perf_counter_ns
    cpu = time.process_time_ns
    marks: list[int] = []  # cpu and wall at the first row, then at the last

    def mark() -> None:
        marks.extend((cpu(), clock()))

    if method in ("mmstore_follow", "mmstore_wait"):
        store = mmstore.Store(params["path"], "r")
        reader = store.open_reader(params["name"])
        reader.wait(timeout=0.001)  # sets up the inotify watch
        conn.send(("ready",))
        n = 0
        if method == "mmstore_follow":
            for block in reader.follow():
                t = clock()
                seen[block["seq"]] = t
                if n == 0:
                    mark()
                n += len(block)
                if n >= total:
                    break
        else:
            while n < total:
                reader.wait(n + 1)
                block = reader.array[n:]
                t = clock()
                seen[block["seq"]] = t
                if n == 0:
                    mark()
                n += len(block)
        mark()
        reader.close()
        store.close()
    elif method == "queue":
        get = channel.get
        conn.send(("ready",))
        for n in range(total):
            item = get()
            t = clock()
            seen[item["seq"]] = t
            if n == 0:
                mark()
        mark()
    elif method == "pipe":
        recv = channel.recv_bytes
        conn.send(("ready",))
        for n in range(total):
            data = recv()
            t = clock()
            seen[np.frombuffer(data, ROW_DTYPE)["seq"]] = t
            if n == 0:
                mark()
        mark()
    elif method.startswith("h5py"):
        pause = params["pause"]
        with h5py.File(params["path"], "r", libver="latest", swmr=True) as f:
            ds = f["ticks"]
            conn.send(("ready",))
            n = 0
            while n < total:
                ds.refresh()
                length = ds.shape[0]
                if length > n:
                    block = ds[n:length]
                    t = clock()
                    seen[block["seq"]] = t
                    if n == 0:
                        mark()
                    n = length
                elif pause:
                    time.sleep(pause)
        mark()
    elif method == "raw":
        with open(params["path"], "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        count = np.frombuffer(mapped, np.int64, 1)
        rows = np.frombuffer(mapped, ROW_DTYPE, total, RAW_HEADER)
        conn.send(("ready",))
        n = 0
        while n < total:
            length = int(count[0])  # spins: no sleep, no system call
            if length > n:
                block = rows[n:length]
                t = clock()
                seen[block["seq"]] = t
                if n == 0:
                    mark()
                n = length
        mark()
        del count, rows, block
        mapped.close()
    else:
        raise ValueError(f"unknown latency method {method!r}")
    cpu_ns = marks[-2] - marks[0]
    wall_ns = marks[-1] - marks[1]
    conn.send(("done", seen, cpu_ns, wall_ns))


class Child:
    """A spawned helper process with a Pipe to it."""

    def __init__(self, ctx: Any, kind: str, params: dict[str, Any], channel: Any = None) -> None:
        self.kind = kind
        self.conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(kind, child_end, params, channel), daemon=True)
        self.process.start()
        child_end.close()

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def expect(self, kind: str, timeout: float = TIMEOUT) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.process.is_alive() and not self.conn.poll(0):
                raise RuntimeError(f"{self.kind} child died (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} child: no {kind!r} within {timeout} s")
        message = self.conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"{self.kind} child failed:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"{self.kind} child: expected {kind!r}, got {message[0]!r}")
        return tuple(message[1:])

    def close(self, goodbye: Any = None, send_goodbye: bool = True) -> None:
        if send_goodbye and self.process.is_alive():
            try:
                self.conn.send(goodbye)
            except OSError:
                pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


# --- Part 1: append throughput -------------------------------------------------------------


def _make_rows(count: int, rng: np.random.Generator, first_seq: int = 0) -> np.ndarray:
    rows = np.zeros(count, ROW_DTYPE)
    rows["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
    rows["t"] = rng.random(count)
    rows["payload"] = rng.random((count, 6))
    return rows


def _loop_mmstore(writer: mmstore.Writer, item: np.ndarray, rows_per_item: int, inner: int, cfg: Config) -> float:
    append, flush, clock = writer.append, writer.flush, time.perf_counter
    rows, step = 0, rows_per_item * inner
    start = clock()
    deadline = start + cfg.seconds
    while True:
        for _ in range(inner):
            append(item)
            flush()
        rows += step
        if rows >= cfg.max_rows or clock() >= deadline:
            return rows / (clock() - start)


def _loop_h5py(ds: Any, block: np.ndarray, inner: int, cfg: Config) -> float:
    size = len(block)
    resize, flush, clock = ds.resize, ds.flush, time.perf_counter
    rows = 0
    start = clock()
    deadline = start + cfg.seconds
    while True:
        for _ in range(inner):
            end = rows + size
            resize((end,))
            ds[rows:end] = block
            flush()
            rows = end
        if rows >= cfg.max_rows or clock() >= deadline:
            return rows / (clock() - start)


def _loop_queue(channel: Any, sink: Child, item: np.ndarray, rows_per_item: int, inner: int, cfg: Config) -> float:
    put, clock = channel.put, time.perf_counter
    rows, step = 0, rows_per_item * inner
    start = clock()
    deadline = start + cfg.seconds
    while True:
        for _ in range(inner):
            put(item)
        rows += step
        if rows >= cfg.max_rows or clock() >= deadline:
            break
    put(None)
    (received,) = sink.expect("done")
    elapsed = clock() - start  # until the consumer holds every row
    if received != rows:
        raise RuntimeError(f"Queue consumer received {received} rows, {rows} were put")
    return rows / elapsed


class RawFile:
    """The floor: rows copied into an np.memmap of a preallocated file, the count stored in a mapped int64.

    ``prefault`` writes every page once before timing and the rows then go round a ring (the memcpy
    floor); without it the file is fresh (posix_fallocate, like mmstore's) and written once, in order.
    """

    def __init__(self, path: str, rows: int, prefault: bool) -> None:
        self.path = path
        self.ring_rows = rows
        nbytes = RAW_HEADER + rows * ROW_BYTES
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        self.memmap = np.memmap(path, np.uint8, "r+", shape=(nbytes,))
        if prefault:
            self.memmap[:] = 1  # dirty every page once, so timing sees no page faults
            self.memmap[:] = 0
        self.count = self.memmap[:8].view(np.int64)
        self.bytes = self.memmap[RAW_HEADER:]
        self.rows = self.bytes.view(ROW_DTYPE)

    def loop(self, item: np.ndarray, size: int, inner: int, cfg: Config) -> float:
        count, ring_rows, clock = self.count, self.ring_rows, time.perf_counter
        total = position = 0
        start = clock()
        deadline = start + cfg.seconds
        if size == 1:
            rows = self.rows
            while True:
                for _ in range(inner):
                    if position == ring_rows:
                        position = 0
                    rows[position] = item
                    position += 1
                    total += 1
                    count[0] = total
                if total >= cfg.max_rows or clock() >= deadline:
                    return total / (clock() - start)
        dst = self.bytes
        src = item.view(np.uint8)
        nbytes = size * ROW_BYTES
        while True:
            for _ in range(inner):
                if position + size > ring_rows:
                    position = 0
                offset = position * ROW_BYTES
                dst[offset : offset + nbytes] = src  # a memcpy (structured assignment is ~5x slower)
                position += size
                total += size
                count[0] = total
            if total >= cfg.max_rows or clock() >= deadline:
                return total / (clock() - start)

    def close(self, unlink: bool) -> None:
        del self.count, self.bytes, self.rows, self.memmap  # unmapped when collected
        if unlink:
            os.unlink(self.path)


THROUGHPUT_METHODS: list[tuple[str, str]] = [
    ("mmstore", "mmstore append+flush"),
    ("mmstore_cap", "mmstore append+flush, capacity preallocated"),
    ("mmstore_follower", "mmstore append+flush, 1 follower attached"),
    ("mmstore_block1", "mmstore append(1-row block)+flush"),
    ("h5py", "h5py SWMR resize+write+flush"),
    ("queue", "multiprocessing.Queue put (until consumer has it)"),
    ("raw", "raw floor: np.memmap of a preallocated file, copy + count store"),
    ("ring", "memcpy floor: same, pre-faulted 64 MB ring"),
]


def _chunk_rows(size: int) -> int:
    """h5py chunk: 64 KiB, or one batch rounded up to a power of two (best of a pilot sweep)."""
    return max(1024, 1 << (size - 1).bit_length())


class ThroughputBench:
    def __init__(self, ctx: Any, workdir: str, cfg: Config) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.rng = np.random.default_rng(SEED)
        self.blocks = {size: _make_rows(size, self.rng) for size in BATCH_SIZES}
        # What each method appends per batch: one row (0-d) for size 1, except the block1 variant and h5py.
        self.items = {size: (block[:1].reshape(()) if size == 1 else block) for size, block in self.blocks.items()}
        self.store_path = os.path.join(workdir, "tp-store")
        self.store = mmstore.Store(self.store_path, "w-")
        self.stop_row = _make_rows(1, self.rng)
        self.stop_row["seq"] = STOP
        self.channel = ctx.Queue(QUEUE_MAXSIZE)
        self.children: list[Child] = []
        self.queue_sink = self._start(Child(ctx, "queue_sink", {}, self.channel))
        self.follower = self._start(Child(ctx, "mmstore_sink", {"path": self.store_path}))
        self.ring = RawFile(os.path.join(workdir, "raw-ring"), RING_ROWS, prefault=True)
        self.counter = 0
        self.follower_stats: dict[int, list[tuple[int, int, float, float]]] = {size: [] for size in BATCH_SIZES}

    def _start(self, child: Child) -> Child:
        self.children.append(child)
        child.expect("ready")
        return child

    def measure(self, key: str, size: int) -> float:
        cfg = self.cfg
        inner = {1: 64, 100: 8}.get(size, 1)
        item = self.items[size]
        if key in ("mmstore", "mmstore_cap", "mmstore_follower", "mmstore_block1"):
            if key == "mmstore_block1":
                item = self.blocks[size]
            self.counter += 1
            name = f"tp-{key}-{size}-{self.counter}"
            capacity = cfg.max_rows + size if key == "mmstore_cap" else None
            writer = self.store.create(name, ROW_DTYPE, (0,), growable=True, capacity=capacity)
            try:
                if key == "mmstore_follower":
                    self.follower.send(name)
                    self.follower.expect("ready")
                rate = _loop_mmstore(writer, item, size, inner, cfg)
                if key == "mmstore_follower":
                    writer.append(self.stop_row)
                    writer.flush()
                    rows, blocks, cpu, wall = self.follower.expect("done")
                    if rows != len(writer):
                        raise RuntimeError(f"follower saw {rows} rows of {len(writer)}")
                    self.follower_stats[size].append((rows - 1, blocks, cpu, wall))
            finally:
                writer.close()
                self.store.delete(name)
            return rate
        if key == "h5py":
            path = os.path.join(self.workdir, f"tp-{size}.h5")
            with h5py.File(path, "w", libver="latest") as f:
                ds = f.create_dataset(
                    "ticks", shape=(0,), maxshape=(None,), chunks=(_chunk_rows(size),), dtype=ROW_DTYPE
                )
                f.swmr_mode = True
                rate = _loop_h5py(ds, self.blocks[size], inner, cfg)
            os.unlink(path)
            return rate
        if key == "queue":
            return _loop_queue(self.channel, self.queue_sink, item, size, inner, cfg)
        if key == "ring":
            return self.ring.loop(item, size, inner, cfg)
        if key == "raw":
            raw = RawFile(os.path.join(self.workdir, f"tp-raw-{size}"), cfg.max_rows + size * inner, prefault=False)
            try:
                return raw.loop(item, size, inner, cfg)
            finally:
                raw.close(unlink=True)
        raise ValueError(key)

    def close(self) -> None:
        for child in self.children:
            if child is self.queue_sink:
                self.channel.put("exit")
                child.close(send_goodbye=False)
            else:
                child.close()
        self.channel.close()
        self.channel.join_thread()
        self.ring.close(unlink=False)
        self.store.close()


def part_throughput(ctx: Any, workdir: str, cfg: Config) -> dict[str, Any]:
    bench = ThroughputBench(ctx, workdir, cfg)
    order_rng = random.Random(SEED)
    plan = [(key, size) for key, _ in THROUGHPUT_METHODS for size in BATCH_SIZES]
    plan = [(key, size) for key, size in plan if key != "mmstore_block1" or size == 1]
    rates: dict[str, dict[int, list[float]]] = {
        key: {size: [] for size in BATCH_SIZES} for key, _ in THROUGHPUT_METHODS
    }
    try:
        warm = Config(**{**cfg.__dict__, "seconds": min(cfg.seconds, 0.05)})
        saved, bench.cfg = bench.cfg, warm
        for key, size in plan:
            bench.measure(key, size)
        bench.cfg = saved
        bench.follower_stats = {size: [] for size in BATCH_SIZES}
        for repeat in range(cfg.repeats):
            _progress(f"Part 1: repeat {repeat + 1}/{cfg.repeats} ({_load()})")
            order_rng.shuffle(plan)
            for key, size in plan:
                rates[key][size].append(bench.measure(key, size))
    finally:
        bench.close()
    return {
        "rows_per_second": {key: {str(s): v for s, v in per.items()} for key, per in rates.items()},
        "follower": {
            str(size): [{"rows": r, "wakeups": b, "cpu_s": c, "wall_s": w} for r, b, c, w in stats]
            for size, stats in bench.follower_stats.items()
        },
    }


# --- Part 2: flush-to-follower latency -----------------------------------------------------

LATENCY_METHODS: list[tuple[str, str, str]] = [
    ("mmstore_follow", "mmstore: append+flush -> follow()", "blocks in poll() on inotify"),
    ("mmstore_wait", "mmstore: append+flush -> wait(n+1)", "blocks in poll() on inotify"),
    ("queue", "multiprocessing.Queue: put -> blocking get()", "blocks in the pipe read"),
    ("pipe", "reference: multiprocessing.Pipe send_bytes -> recv_bytes", "blocks in the pipe read"),
    ("h5py_tight", "h5py SWMR: resize+write+flush -> refresh() poll, tight", "polls, no sleep"),
    ("h5py_sleep", "h5py SWMR: resize+write+flush -> refresh() poll, sleep(0.0001)", "polls, sleep(1e-4) when idle"),
    ("raw", "raw floor: memmap row + count store -> spinning reader", "spins on the mapped count"),
]


def _zero_d_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Each row as a 0-d structured ndarray (iterating would give np.void scalars)."""
    return [rows[i : i + 1].reshape(()) for i in range(len(rows))]


def _latency_run(ctx: Any, workdir: str, cfg: Config, method: str, round_index: int, samples: int) -> dict[str, Any]:
    """One round: a fresh follower process and file, ``cfg.warmup`` discarded commits, then ``samples``."""
    total = cfg.warmup + samples
    rng = np.random.default_rng(SEED + round_index)
    rows = _make_rows(total, rng)
    gaps = rng.uniform(cfg.gap_ms[0] / 1e3, cfg.gap_ms[1] / 1e3, total)
    tag = os.path.join(workdir, f"lat-{method}-{round_index}")
    params: dict[str, Any] = {"method": method, "total": total}
    channel: Any = None
    cleanup: list[Callable[[], None]] = []
    append: Callable[[int], None]
    commit: Callable[[int], None]
    if method.startswith("mmstore"):
        store = mmstore.Store(tag, "w-")
        writer = store.create("ticks", ROW_DTYPE, (0,), growable=True)
        items = _zero_d_rows(rows)  # Writer.append's single-row path

        def append(i: int) -> None:
            writer.append(items[i])

        def commit(i: int) -> None:
            writer.flush()

        cleanup += [writer.close, store.close]
        params.update(path=tag, name="ticks")
    elif method == "queue":
        channel = ctx.Queue()
        items = [row.copy() for row in _zero_d_rows(rows)]  # own objects: put() pickles later, in a thread

        def append(i: int) -> None:
            pass

        def commit(i: int) -> None:
            channel.put(items[i])

        def close_queue() -> None:
            channel.close()
            channel.join_thread()

        cleanup.append(close_queue)
    elif method == "pipe":
        channel, sender = ctx.Pipe(duplex=False)
        payloads = [row.tobytes() for row in _zero_d_rows(rows)]

        def append(i: int) -> None:
            pass

        def commit(i: int) -> None:
            sender.send_bytes(payloads[i])

        def close_pipe() -> None:
            sender.close()
            channel.close()

        cleanup.append(close_pipe)
    elif method.startswith("h5py"):
        path = tag + ".h5"
        f = h5py.File(path, "w", libver="latest")
        ds = f.create_dataset("ticks", shape=(0,), maxshape=(None,), chunks=(_chunk_rows(1),), dtype=ROW_DTYPE)
        f.swmr_mode = True
        blocks = [rows[i : i + 1] for i in range(total)]

        def append(i: int) -> None:
            ds.resize((i + 1,))
            ds[i : i + 1] = blocks[i]

        def commit(i: int) -> None:
            ds.flush()

        cleanup.append(f.close)
        params.update(path=path, pause=1e-4 if method == "h5py_sleep" else 0.0)
    elif method == "raw":
        path = tag + ".raw"
        memmap = np.memmap(path, np.uint8, "w+", shape=(RAW_HEADER + total * ROW_BYTES,))
        count = memmap[:8].view(np.int64)
        dest = memmap[RAW_HEADER:].view(ROW_DTYPE)
        items = _zero_d_rows(rows)

        def append(i: int) -> None:
            dest[i] = items[i]

        def commit(i: int) -> None:
            count[0] = i + 1

        def close_raw() -> None:
            memmap.flush()

        cleanup.append(close_raw)
        params.update(path=path)
    else:
        raise ValueError(method)

    follower = Child(ctx, "latency", params, channel)
    try:
        follower.expect("ready")
        time.sleep(0.05)
        clock = time.perf_counter_ns
        t_append = np.zeros(total, np.int64)
        t_commit = np.zeros(total, np.int64)
        t_done = np.zeros(total, np.int64)
        sleep = time.sleep
        for i in range(total):
            t_append[i] = clock()
            append(i)
            t_commit[i] = clock()
            commit(i)
            t_done[i] = clock()
            sleep(gaps[i])
        seen, cpu_ns, wall_ns = follower.expect("done")
        follower.close(send_goodbye=False)
    except BaseException:
        follower.close(send_goodbye=False)
        raise
    finally:
        for step in cleanup:
            step()
    keep = slice(cfg.warmup, total)
    latency_us = (seen[keep] - t_commit[keep]) / 1e3
    from_append_us = (seen[keep] - t_append[keep]) / 1e3
    commit_us = (t_done[keep] - t_commit[keep]) / 1e3
    if np.any(seen == 0):
        raise RuntimeError(f"{method}: the follower missed {int(np.sum(seen == 0))} rows")
    return {
        "latency_us": latency_us.tolist(),
        "from_append_us": from_append_us.tolist(),
        "commit_call_us": commit_us.tolist(),
        "follower_cpu_s": cpu_ns / 1e9,
        "follower_wall_s": wall_ns / 1e9,
    }


def part_latency(ctx: Any, workdir: str, cfg: Config) -> dict[str, Any]:
    """Methods round-robin (shuffled per round), so a burst of outside load is spread over all of them."""
    results: dict[str, Any] = {
        method: {"latency_us": [], "from_append_us": [], "commit_call_us": [], "rounds": []}
        for method, _, _ in LATENCY_METHODS
    }
    labels = {method: label for method, label, _ in LATENCY_METHODS}
    order = [method for method, _, _ in LATENCY_METHODS]
    order_rng = random.Random(SEED)
    per_round = [cfg.samples // cfg.rounds + (i < cfg.samples % cfg.rounds) for i in range(cfg.rounds)]
    for round_index, samples in enumerate(per_round):
        order_rng.shuffle(order)
        for method in order:
            _progress(f"Part 2, round {round_index + 1}/{cfg.rounds}: {labels[method]} ({_load()})")
            run = _latency_run(ctx, workdir, cfg, method, round_index, samples)
            merged = results[method]
            for key in ("latency_us", "from_append_us", "commit_call_us"):
                merged[key] += run[key]
            merged["rounds"].append({"cpu_s": run["follower_cpu_s"], "wall_s": run["follower_wall_s"]})
    for merged in results.values():
        cpu = sum(r["cpu_s"] for r in merged["rounds"])
        wall = sum(r["wall_s"] for r in merged["rounds"])
        merged["follower_cpu_percent"] = 100.0 * cpu / wall if wall > 0 else float("nan")
    return results


# --- reporting -----------------------------------------------------------------------------


def _load() -> str:
    return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _fs_type(path: str) -> str:
    mount = mount_of(path)
    return "? (mounted on ?)" if mount is None else f"{mount.type} (mounted on {mount.point})"


def _rate(value: float) -> str:
    if value != value:  # NaN: not measured
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.1f} k"


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def header_lines(workdir: str, cfg: Config) -> list[str]:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        "# mmstore streaming benchmark (growable datasets, followers)",
        "",
        f"- Command: `{shlex.join(sys.orig_argv)}`",
        f"- Machine: nproc={nproc} (cpu_count={os.cpu_count()}), {platform.platform()}, {platform.machine()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, h5py {h5py.__version__} "
        f"(HDF5 {h5py.version.hdf5_version}), mmstore {mmstore.__version__}",
        f"- Temp dir: {workdir} on {_fs_type(workdir)}",
        f"- Load average at start: {load}; started {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"- Rows: {ROW_BYTES} bytes, dtype {ROW_DTYPE.descr}; processes started with multiprocessing 'spawn'",
        f"- Part 1: {cfg.repeats} repeats x {cfg.seconds:g} s (or {cfg.max_rows:,} rows) per measurement; "
        f"Part 2: {cfg.samples} samples per method in {cfg.rounds} round(s) (+{cfg.warmup} warm-up each), gaps "
        f"{cfg.gap_ms[0]:g}-{cfg.gap_ms[1]:g} ms (time.sleep)",
        "",
    ]


def report(results: dict[str, Any], cfg: Config) -> list[str]:
    tp = results["throughput"]["rows_per_second"]
    lat = results["latency"]
    out: list[str] = []

    out.append("## Part 1: append throughput, commit after every batch (rows/s, median of repeats)")
    out.append("")
    head = "| method |" + "".join(f" batch {s:,} | vs mmstore |" for s in BATCH_SIZES)
    out.append(head)
    out.append("|---|" + "---:|---:|" * len(BATCH_SIZES))
    medians: dict[str, dict[int, float]] = {}
    for key, _ in THROUGHPUT_METHODS:
        medians[key] = {s: statistics.median(v) if (v := tp[key][str(s)]) else float("nan") for s in BATCH_SIZES}
    for key, label in THROUGHPUT_METHODS:
        cells = []
        for s in BATCH_SIZES:
            value, ref = medians[key][s], medians["mmstore"][s]
            ratio = "-" if value != value else f"{value / ref:.2f}x"
            cells.append(f" {_rate(value)} | {ratio} |")
        out.append(f"| {label} |" + "".join(cells))
    out.append("")
    out.append("Spread (min-max over repeats, rows/s):")
    out.append("")
    for key, label in THROUGHPUT_METHODS:
        spans = [f"{s:,}: {_rate(min(v))}-{_rate(max(v))}" for s in BATCH_SIZES if (v := tp[key][str(s)])]
        out.append(f"- {label}: " + "; ".join(spans))
    out.append("")
    follower = results["throughput"]["follower"]
    parts = []
    for s in BATCH_SIZES:
        stats = follower[str(s)]
        if stats:
            rows = sum(x["rows"] for x in stats)
            wakes = sum(x["wakeups"] for x in stats)
            cpu = sum(x["cpu_s"] for x in stats) / max(sum(x["wall_s"] for x in stats), 1e-9)
            parts.append(
                f"batch {s:,}: {rows / max(wakes, 1):,.1f} rows per follow() block, follower CPU {100 * cpu:.0f}%"
            )
    out.append("Attached follower (follow(), saw every row): " + "; ".join(parts) + ".")
    out.append("")

    out.append("## Part 2: commit-to-follower latency, one row per commit")
    out.append("")
    out.append(
        "| method | median us | p99 us | p99.9 us | max us | follower CPU % of a core | "
        "median from append start us | producer commit call us | follower waits by |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    summary: dict[str, dict[str, float]] = {}
    for method, label, how in LATENCY_METHODS:
        r = lat[method]
        values = np.asarray(r["latency_us"])
        s = {
            "median": _pct(values, 50),
            "p99": _pct(values, 99),
            "p999": _pct(values, 99.9),
            "max": float(values.max()),
            "cpu": r["follower_cpu_percent"],
            "from_append": _pct(np.asarray(r["from_append_us"]), 50),
            "commit": _pct(np.asarray(r["commit_call_us"]), 50),
        }
        summary[method] = s
        out.append(
            f"| {label} | {s['median']:.1f} | {s['p99']:.1f} | {s['p999']:.1f} | {s['max']:.0f} | {s['cpu']:.1f} | "
            f"{s['from_append']:.1f} | {s['commit']:.1f} | {how} |"
        )
    out.append("")
    results["latency_summary"] = summary

    mm, mq = summary["mmstore_follow"], summary["queue"]
    single = medians["mmstore"][1]
    big, floor, ring = medians["mmstore"][10_000], medians["raw"][10_000], medians["ring"][10_000]
    checks = [
        (
            f"mmstore follow() latency median {mm['median']:.1f} us <= 50 us, p99 {mm['p99']:.1f} us <= 500 us, "
            f"follower CPU {mm['cpu']:.2f}% < 5%",
            mm["median"] <= 50 and mm["p99"] <= 500 and mm["cpu"] < 5,
        ),
        (
            f"mmstore beats the Queue: median {mm['median']:.1f} < {mq['median']:.1f} us, "
            f"p99 {mm['p99']:.1f} < {mq['p99']:.1f} us, CPU {mm['cpu']:.2f} < {mq['cpu']:.2f}%",
            mm["median"] < mq["median"] and mm["p99"] < mq["p99"] and mm["cpu"] < mq["cpu"],
        ),
        (f"single-row append+flush {single:,.0f} rows/s >= 300,000", single >= 300_000),
        (
            f"10,000-row batches: mmstore {big:,.0f} rows/s within 2x of the raw floor {floor:,.0f} "
            f"(ratio {floor / big:.2f})",
            big * 2 >= floor,
        ),
    ]
    info = [
        f"10,000-row batches against the pre-faulted memcpy ring {ring:,.0f} rows/s: ratio {ring / big:.2f} "
        f"({'within' if big * 2 >= ring else 'not within'} 2x)",
        f"blocking wake-up reference (multiprocessing.Pipe): median {summary['pipe']['median']:.1f} us, "
        f"p99 {summary['pipe']['p99']:.1f} us, follower CPU {summary['pipe']['cpu']:.2f}%",
    ]
    out.append("## Targets")
    out.append("")
    for text, ok in checks:
        out.append(f"- {'PASS' if ok else 'FAIL'}: {text}")
    for text in info:
        out.append(f"- INFO: {text}")
    out.append("")
    results["targets"] = [{"target": text, "pass": ok} for text, ok in checks]

    out.append("Notes:")
    out.append("")
    out += [
        "- Part 1: one measurement appends one batch object repeatedly and commits after each, for "
        f"{cfg.seconds:g} s or {cfg.max_rows:,} rows, in a fresh file (the create/open and close/delete are not "
        "timed; growth of the file is). Batch 1 means one row: a 0-d structured array for mmstore "
        "(Writer.append's single-row path), the Queue and the raw floor; a 1-row block for h5py and for the "
        "'append(1-row block)' mmstore variant.",
        "- The 1-follower variant times the producer only; the follower (another process, follow()) then catches "
        "up to a final marker row and must have seen every row.",
        "- h5py: libver='latest', swmr_mode=True, maxshape=(None,), chunks of max(1024 rows, the batch rounded up "
        "to a power of two) (64 KiB for 1 and 100 rows, 16384 rows for 10,000), the best of 64/1024/4096/16384 "
        "rows in a pilot; no compression.",
        f"- Queue: maxsize {QUEUE_MAXSIZE} batches; the clock runs until the consumer process has unpickled every "
        "batch (put() alone only hands the object to a feeder thread).",
        "- Raw floor: a fresh file preallocated with posix_fallocate (as mmstore does) for the whole measurement, "
        "np.memmap'd; rows copied in as bytes (a memcpy; 1 row by element assignment), then the running count "
        "stored in a mapped int64. No system calls, no growth, no readers' wake-up; it does take the page faults "
        "of first writes to new file pages, as any append to new file space must. The memcpy floor does the same "
        f"into a {RING_ROWS * ROW_BYTES // 10**6} MB ring whose pages were all written before timing (no faults).",
        "- Part 2: the producer (main process) stamps perf_counter_ns() just before the commit call (mmstore "
        "flush(), h5py ds.flush(), Queue put(), raw count store), after the append/resize+write; 'from append "
        "start' stamps before that. The follower stamps once the new rows are in hand (mmstore: the yielded "
        "block; h5py: ds[n:m] read; Queue: the unpickled row; Pipe: the received bytes; raw: view after the "
        "count). Follower CPU is time.process_time() (all threads) over wall time from its first to its last row.",
        f"- Part 2 runs {cfg.rounds} round(s), the methods in a shuffled order each round, each with a fresh "
        f"follower process and file; the first {cfg.warmup} commits of every round are discarded (first touch, "
        "thread start). Follower CPU % is summed over rounds.",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: short measurements, few samples (< 30 s)")
    parser.add_argument("--repeats", type=int, default=None, help="Part 1 repeats (default 7; --quick 2)")
    parser.add_argument("--seconds", type=float, default=None, help="Part 1 seconds per measurement (0.4; 0.1)")
    parser.add_argument("--samples", type=int, default=None, help="Part 2 samples per method (2000; 300)")
    parser.add_argument("--rounds", type=int, default=None, help="Part 2 rounds, methods round-robin (4; 1)")
    parser.add_argument("--json", metavar="OUT", help="also write every sample and the summary as JSON")
    parser.add_argument("--tmpdir", default=None, help="where temp files go (default: tempfile's, normally /tmp)")
    args = parser.parse_args(argv)
    cfg = Config(
        repeats=args.repeats if args.repeats is not None else (2 if args.quick else 7),
        seconds=args.seconds if args.seconds is not None else (0.1 if args.quick else 0.4),
        max_rows=1_000_000 if args.quick else 4_000_000,
        samples=args.samples if args.samples is not None else (300 if args.quick else 2000),
        rounds=args.rounds if args.rounds is not None else (1 if args.quick else 4),
        warmup=20 if args.quick else 30,
        gap_ms=(0.2, 2.0),
        quick=args.quick,
    )
    if cfg.repeats < 1 or cfg.seconds <= 0 or cfg.rounds < 1 or cfg.samples < 100 * cfg.rounds:
        parser.error("--repeats and --rounds must be >= 1, --seconds > 0 and --samples >= 100 per round")

    ctx = multiprocessing.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="mmstore-stream-", dir=args.tmpdir)
    started = time.perf_counter()
    results: dict[str, Any] = {"argv": sys.orig_argv, "config": cfg.__dict__}
    try:
        lines = header_lines(workdir, cfg)
        print("\n".join(lines), flush=True)
        results["header"] = lines
        results["throughput"] = part_throughput(ctx, workdir, cfg)
        results["latency"] = part_latency(ctx, workdir, cfg)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    body = report(results, cfg)
    elapsed = time.perf_counter() - started
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body += ["", f"Total run time {elapsed:.1f} s; load average at end: {load}; main process peak RSS {peak:.0f} MiB."]
    if cfg.quick:
        body.append("(--quick: short measurements and few samples; not the figures to quote.)")
    emit(body, results, args.json, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
