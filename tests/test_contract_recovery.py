"""Crash recovery, verify and recover against the contract (DESIGN.md invariants 4, 7 and 8,
"Crash recovery"): what the other tests do not already pin down, found by a recovery audit.
Writers are real processes; crashes are real SIGKILLs; nothing waits on a sleep."""

from __future__ import annotations

import gc
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT, run_in_fork

ROWS = 1000


def _paused_blocks(started: Any, release: Any) -> Iterator[np.ndarray]:
    yield np.arange(ROWS, dtype=np.float64)
    started.set()  # the data file holds one block: the put is half-written
    if not release.wait(PROCESS_TIMEOUT):
        raise TimeoutError("never released")
    yield np.arange(ROWS, 2 * ROWS, dtype=np.float64)


def put_paused_midway(path: str, name: str, started: Any, release: Any) -> None:
    """A put (put_blocks) that stops after its first block until ``release`` is set."""
    with mmstore.Store(path) as store:
        store.put_blocks(name, _paused_blocks(started, release))


def append_without_flush(path: str, name: str, started: Any, release: Any) -> None:
    """A growable writer with rows appended but not flushed, holding its lock until released."""
    with mmstore.Store(path) as store:
        writer = store.open_writer(name)
        writer.append(np.arange(100, 5100, dtype="<i8"))  # (grows the file past its capacity)
        started.set()
        if not release.wait(PROCESS_TIMEOUT):
            raise TimeoutError("never released")
        writer.flush()
        writer.close()


def file_states(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: (inode, mode, size, mtime, contents of regular files)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = os.path.join(directory, entry)
            info = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(info.st_mode) else None
            found[os.path.relpath(path, root)] = (info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, content)
    return found


def test_a_writable_open_removes_dead_writers_leftovers_but_nothing_of_live_writers(store_path: Path, spawn) -> None:
    path = str(store_path)
    with mmstore.Store(path) as store:
        store.put("old", np.zeros(3))
        store.put("g/old", np.zeros(3))
        with store.create("log", "<i8", (0,), growable=True, capacity=16) as writer:
            writer.append(np.arange(100, dtype="<i8"))
    release = spawn.Event()
    live = []
    # Live writers: puts of a new dataset and over an existing one (in a group too), paused
    # with half their data file written, and a growable writer with unflushed rows.
    for target, name in [(put_paused_midway, "new"), (put_paused_midway, "old"), (put_paused_midway, "g/old"),
                         (append_without_flush, "log")]:  # fmt: skip
        started = spawn.Event()
        process = spawn.Process(target=target, args=(path, name, started, release))
        process.start()
        live.append((process, started))
    # Dead writers: the same kind of puts, SIGKILLed half-way.
    dead = []
    never = spawn.Event()  # (kept referenced: a child unpickles it after start())
    for name in ("dead", "g/old2"):
        started = spawn.Event()
        process = spawn.Process(target=put_paused_midway, args=(path, name, started, never))
        process.start()
        dead.append((process, started))
    try:
        for _process, started in live + dead:
            assert started.wait(PROCESS_TIMEOUT)
        before_kill = set(file_states(store_path))
        for process, _started in dead:
            os.kill(process.pid, signal.SIGKILL)
            process.join(PROCESS_TIMEOUT)
            assert process.exitcode == -signal.SIGKILL
        live_files = file_states(store_path)
        dead_files = {
            p for p in before_kill if p.endswith(".dat") and p.split("/")[-1].split(".")[0] in {"dead", "old2"}
        }
        assert len(dead_files) == 2
        with mmstore.Store(path) as store:  # a writable open from another process: recovery
            report = store.recover()
            assert sorted(report.removed) == sorted(dead_files)
            assert report.ok and not report.quarantined
            assert store.get("old").tolist() == [0, 0, 0] and len(store.get("log")) == 100
        after = file_states(store_path)
        for relative, state in live_files.items():
            if relative in dead_files or relative.rpartition("/")[2].startswith(".") or state[4] is None:
                continue  # (lock files: their change counters move; directories: their entries)
            assert after.get(relative) == state, f"{relative} of a live writer was touched"
        assert not dead_files & set(after)
    finally:
        release.set()
        for process, _started in live:
            process.join(PROCESS_TIMEOUT)
    assert [process.exitcode for process, _started in live] == [0, 0, 0, 0]
    with mmstore.Store(path, "r") as store:
        expected = np.arange(2 * ROWS, dtype=np.float64)
        for name in ("new", "old", "g/old"):
            assert np.array_equal(store.get(name), expected)
        assert store.get("log").tolist() == list(range(100)) + list(range(100, 5100))
        assert sorted(store) == ["g/old", "log", "new", "old"]
        assert store.verify().ok and not store.verify().leftovers


def test_a_read_only_open_changes_nothing_even_with_garbage_present(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as store:
        store.put("a", np.arange(10.0))
        store.put("g/b", np.arange(5))
        with store.create("log", "<i4", (0,), growable=True) as writer:
            writer.append(np.arange(3, dtype="<i4"))
        store.put("bad", np.arange(4))
    started, never = spawn.Event(), spawn.Event()
    killed = spawn.Process(target=put_paused_midway, args=(str(store_path), "a", started, never))
    killed.start()
    assert started.wait(PROCESS_TIMEOUT)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(PROCESS_TIMEOUT)
    (store_path / ".a.0123456789abcdef.tmp").write_text("{")
    (store_path / "lone.0123456789abcdef.dat").write_bytes(b"x" * 16)
    (store_path / "bad.json").write_text("{not json")
    before = file_states(store_path)
    with mmstore.Store(store_path, "r") as store:
        assert sorted(store) == ["a", "bad", "g/b", "log"]
        assert store.get("a").tolist() == list(range(10)) and store.info("log")["shape"] == (3,)
        report = store.verify()
        assert list(report.problems) == ["bad"]
        # The killed put's file, the temp sidecar and the lone data file: all leftovers.
        assert len(report.leftovers) == 3 and "lone.0123456789abcdef.dat" in report.leftovers
        with store.open_reader("log") as reader:
            assert reader.array.tolist() == [0, 1, 2]
        store.flush()
        with pytest.raises(mmstore.ReadOnlyError):
            store.recover()
    for command in (["verify"], ["ls"], ["info", "a"], ["get", "g/b"]):
        subprocess.run([sys.executable, "-m", "mmstore.cli", command[0], str(store_path), *command[1:]],
                       capture_output=True, timeout=PROCESS_TIMEOUT)  # fmt: skip
    assert file_states(store_path) == before


def grow_then_hang(path: str, flushed: Any) -> None:
    with mmstore.Store(path) as store:
        writer = store.create("log", "<i8", (0,), growable=True, capacity=16)
        writer.append(np.arange(100, dtype="<i8"))
        writer.flush()
        writer.append(np.arange(-5000, 0, dtype="<i8"))  # unflushed, and the file grows for them
        writer[3] = 3  # an in-place edit of a committed row (visible at once, as documented)
        flushed.set()
        os.read(os.pipe()[0], 1)  # hangs (nobody writes to the pipe) until the SIGKILL


def test_a_growable_writer_killed_mid_append_stays_at_its_committed_length(store_path: Path, spawn) -> None:
    mmstore.Store(store_path).close()
    flushed = spawn.Event()
    producer = spawn.Process(target=grow_then_hang, args=(str(store_path), flushed))
    producer.start()
    assert flushed.wait(PROCESS_TIMEOUT)
    os.kill(producer.pid, signal.SIGKILL)
    producer.join(PROCESS_TIMEOUT)
    assert producer.exitcode == -signal.SIGKILL
    with mmstore.Store(store_path, "r") as store:
        assert store.get("log").tolist() == list(range(100))
        assert store.verify().ok
    with mmstore.Store(store_path) as store:  # recovery: the dataset keeps its committed rows
        assert store.get("log").tolist() == list(range(100))
        with store.open_writer("log") as writer:
            assert len(writer) == 100 and writer.committed_length == 100
            writer.append(np.arange(100, 110, dtype="<i8"))
        assert store.get("log").tolist() == list(range(110))
        assert store.info("log")["shape"] == (110,)
        assert store.verify().ok and store.recover().quarantined == {}
    assert mmstore.Store(store_path, "r").get("log").tolist() == list(range(110))


def _corrupt_store(path: Path) -> list[str]:
    """A store with one healthy dataset beside each kind of corruption; returns the bad names."""
    with mmstore.Store(path) as store:
        for name in ("ok", "g/ok", "sum", "g/sum", "short", "json", "dtype", "shape", "offset", "gone"):
            store.put(name, np.arange(100.0))
        for name in ("log", "logsum", "logshort"):
            with store.create(name, "<i8", (0,), growable=True) as writer:
                writer.append(np.arange(50))
                writer.flush(durable=True)

    def data_file(name: str) -> Path:
        return (path / name).parent / json.loads((path / f"{name}.json").read_text())["data_file"]

    def edit(name: str, **fields: Any) -> None:
        header = json.loads((path / f"{name}.json").read_text())
        (path / f"{name}.json").write_text(json.dumps({**header, **fields}))

    for name, offset in (("sum", 10), ("g/sum", 10), ("logsum", 4096 + 8)):
        with open(data_file(name), "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ 1]))
    os.truncate(data_file("short"), 400)
    os.truncate(data_file("logshort"), 4096 + 80)
    os.unlink(data_file("gone"))
    edit("dtype", dtype="<f4")
    edit("shape", shape=[50])
    edit("offset", offset=8)
    (path / "json.json").write_text('{"format": "mmstore-dataset",')
    return ["dtype", "g/sum", "gone", "json", "logshort", "logsum", "offset", "shape", "short", "sum"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmstore.cli", *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
        env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip


def test_verify_names_each_corrupt_dataset_and_recover_quarantines_them_once(store_path: Path) -> None:
    bad = _corrupt_store(store_path)
    result = cli("verify", str(store_path))
    assert result.returncode == 1
    problems = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")}
    assert problems == set(bad)
    assert "13 datasets checked, 10 with problems" in result.stdout
    healthy = {name: mmstore.Store(store_path, "r").get(name).copy() for name in ("ok", "g/ok", "log")}
    before = file_states(store_path)

    result = cli("recover", str(store_path))
    assert result.returncode == 0, result.stderr
    assert {line.split()[1] for line in result.stdout.splitlines() if "quarantined" in line} == set(bad)
    # Nothing deleted: every data file and sidecar is still in the store or in the quarantine.
    after = file_states(store_path)
    moved = {p for p in after if p.startswith(".quarantine/")}
    for relative, state in before.items():
        if relative.endswith((".dat", ".json")) and relative not in after:
            matches = [p for p in moved if p.endswith("/" + relative) and after[p][4] == state[4]]
            assert matches, f"{relative} vanished"
    with mmstore.Store(store_path, "r") as store:
        assert sorted(store) == ["g/ok", "log", "ok"]
        for name, array in healthy.items():
            assert np.array_equal(store.get(name), array)
    assert cli("verify", str(store_path)).returncode == 0

    settled = file_states(store_path)
    again = cli("recover", str(store_path))
    assert again.returncode == 0
    assert again.stdout.strip() == "3 datasets checked, 0 with problems"
    assert {p: s for p, s in file_states(store_path).items() if not p.rpartition("/")[2].startswith(".")} == {
        p: s for p, s in settled.items() if not p.rpartition("/")[2].startswith(".")
    }


def test_recover_tells_which_leftovers_it_removed(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as store:
        store.put("a", np.arange(3.0))
    started, never = spawn.Event(), spawn.Event()
    killed = spawn.Process(target=put_paused_midway, args=(str(store_path), "a", started, never))
    killed.start()
    assert started.wait(PROCESS_TIMEOUT)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(PROCESS_TIMEOUT)
    (store_path / "g").mkdir()
    (store_path / "g" / ".b.0123456789abcdef.tmp").write_text("{")
    committed = Path(mmstore.Store(store_path, "r").info("a")["data_file"]).name
    leftovers = sorted(
        str(path.relative_to(store_path)) for path in store_path.rglob("*")
        if path.name.endswith((".tmp", ".dat")) and path.name != committed
    )  # fmt: skip
    assert len(leftovers) == 2
    result = cli("recover", str(store_path))
    assert result.returncode == 0
    assert f"removed {len(leftovers)} leftover files of dead writers" in result.stdout
    for relative in leftovers:
        assert f"removed {relative}" in result.stdout
        assert not (store_path / relative).exists()
    again = cli("recover", str(store_path))
    assert "removed" not in again.stdout
    assert mmstore.Store(store_path, "r").get("a").tolist() == [0.0, 1.0, 2.0]


def test_recover_never_renames_over_an_earlier_quarantine(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two recover() calls of one process within one second used the same quarantine
    directory: the second moved its sidecar over the first one's (deleting it)."""
    from mmstore import _recovery

    monkeypatch.setattr(_recovery.time, "strftime", lambda *args: "20300101T000000")  # one second, twice
    with mmstore.Store(store_path) as store:
        quarantined = []
        for value in (1.0, 2.0):
            store.put("x", np.full(10, value), attrs={"value": value})
            data_file = store.info("x")["data_file"]
            with open(data_file, "r+b") as handle:
                handle.write(b"\xff")
            report = store.recover()
            quarantined.append(store_path / (report.quarantined["x"] + ".json"))
        assert quarantined[0] != quarantined[1]
        assert [json.loads(path.read_text())["attrs"] for path in quarantined] == [{"value": 1.0}, {"value": 2.0}]


def test_a_durable_flush_after_an_in_place_edit_syncs_the_sidecar_the_edit_rewrote(
    store: mmstore.Store, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit of a put's dataset commits a sidecar without the checksum; the writer's
    durable flush must fsync it (it synced only the first one), or after a power loss the
    old sidecar's checksum would come back over the edited data, and recover() would
    quarantine a dataset whose data was flushed durably."""
    store.put("x", np.arange(10.0))
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with store.open_writer("x") as writer:
        writer.flush(durable=True)  # syncs the sidecar as it is
        writer[0] = 42.0  # commits a new sidecar, without the checksum
        synced.clear()
        writer.flush(durable=True)
        sidecar = os.stat(store_path / "x.json")
        data = os.stat(store.info("x")["data_file"])
        directory = os.stat(store_path)
        identity = [(info.st_dev, info.st_ino) for info in (data, sidecar, directory)]
        assert all(item in synced for item in identity), "data file, sidecar and directory synced"
        assert [synced.index(item) for item in identity] == sorted(synced.index(item) for item in identity)
    assert json.loads((store_path / "x.json").read_text())["checksum"] is None


UNLISTABLE_CHECK = """
import os, sys
import mmstore, mmstore._recovery, mmstore.cli
from typer.testing import CliRunner
runner = CliRunner()
runner.invoke(mmstore.cli.app, ["verify", sys.argv[1]])  # (read-only; imports what the CLI imports lazily)
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # chmod does not bind root
with mmstore.Store(sys.argv[1], "r") as store:
    report = store.verify()
print("library:", report.ok, sorted(report.problems))
result = runner.invoke(mmstore.cli.app, ["verify", sys.argv[1]])
print("cli:", result.exit_code, result.output.replace(chr(10), " | "))
"""


def test_verify_reports_a_group_it_may_not_list(tmp_path: Path) -> None:
    """A group this process may not list hid its datasets from verify(), which called the
    store healthy; `mmstore verify` stopped at the listing instead of checking the rest."""
    top = Path(tempfile.mkdtemp(prefix="mmstore-unlistable-"))
    try:
        top.chmod(0o755)
        path = top / "store"
        with mmstore.Store(path, permissions=0o644) as store:
            store.put("a", np.arange(3))
            store.put("sealed/x", np.arange(3))
            store.put("bad", np.arange(1000))
            with open(store.info("bad")["data_file"], "r+b") as handle:
                handle.write(b"\xff")
        (path / "sealed").chmod(0o300 if os.geteuid() != 0 else 0o700)  # write and search, no read
        result = subprocess.run(
            [sys.executable, "-c", UNLISTABLE_CHECK, str(path)], capture_output=True, text=True,
            timeout=PROCESS_TIMEOUT, cwd=str(Path(__file__).resolve().parent.parent),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "library: False ['bad', 'sealed/']"
        assert lines[1].startswith("cli: 1 ") and "sealed/: permission denied listing" in lines[1]
        assert "bad: checksum mismatch" in lines[1]
    finally:
        (top / "store" / "sealed").chmod(0o755)
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_a_forked_child_neither_shares_nor_breaks_the_parents_writer(store_path: Path, spawn) -> None:
    """Invariant 8 with a real fork while the parent holds a writer: the child's use of the
    inherited writer raises a clear error, the child's own writes and recovery work, and
    nothing the child does (exiting included) releases the parent's lock."""
    store = mmstore.Store(store_path, timeout=0.2)
    store.put("a", np.arange(4.0))
    writer = store.create("log", "<i8", (0,), growable=True)
    writer.append(np.arange(5, dtype="<i8"))
    writer.flush()
    writer.append(np.arange(5, 8, dtype="<i8"))  # unflushed at the fork

    def child() -> int:
        assert store.get("a").tolist() == [0.0, 1.0, 2.0, 3.0]
        assert store.get("log").tolist() == [0, 1, 2, 3, 4]
        for use in (lambda: writer.append(np.arange(2)), writer.flush, lambda: writer[0]):
            try:
                use()
            except mmstore.ClosedError as exc:
                assert "parent" in str(exc)
            else:
                return 2
        try:
            store.open_writer("log")
        except mmstore.LockTimeout:
            pass  # the parent holds it: the child did not inherit it
        else:
            return 3
        store.put("b", np.ones(3))
        report = store.recover()
        if report.quarantined or not report.ok:
            return 4
        writer.close()  # a no-op in the child: never the parent's unlock
        store.close()
        gc.collect()
        return 0

    assert run_in_fork(child) == 0
    # The lock is still the parent's: another process cannot take it.
    check = subprocess.run(
        [sys.executable, "-c", "import sys, mmstore\ntry:\n mmstore.Store(sys.argv[1], timeout=0).open_writer('log')\n"
         "except mmstore.LockTimeout: print('held')", str(store_path)],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )  # fmt: skip
    assert check.stdout.strip() == "held", check.stderr
    writer.append(np.arange(8, 10, dtype="<i8"))
    writer.close()
    assert store.get("log").tolist() == list(range(10))
    assert store.get("b").tolist() == [1.0, 1.0, 1.0]
    assert store.verify().ok
    store.close()


def hold_writer(path: str, name: str, started: Any, release: Any) -> None:
    """Hold dataset ``name``'s writer lock (an open writer handle) until ``release`` is set."""
    store = mmstore.Store(path)
    writer = store.open_writer(name)  # (held by this name until the process ends)
    assert not writer.closed
    started.set()
    if not release.wait(PROCESS_TIMEOUT):
        raise TimeoutError("never released")
    os._exit(0)  # (its header was broken under it: nothing of it is to be written back)


def test_recover_skips_a_corrupt_dataset_a_live_writer_holds_and_quarantines_the_rest(store_path: Path, spawn) -> None:
    """A broken dataset whose lock a live writer holds made the whole recover() fail with
    LockTimeout, quarantining nothing; now it is reported and left, and the others go."""
    with mmstore.Store(store_path) as store:
        with store.create("held", "<i8", (0,), growable=True) as writer:
            writer.append(np.arange(10))
        store.put("bad", np.arange(10.0))
        store.put("ok", np.arange(10.0))
    started, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=hold_writer, args=(str(store_path), "held", started, release))
    holder.start()
    try:
        assert started.wait(PROCESS_TIMEOUT)
        (store_path / "held.json").write_text("{not json")
        (store_path / "bad.json").write_text("{not json")
        with mmstore.Store(store_path, timeout=0.2) as store:  # (how long recover waits for the held lock)
            report = store.recover()
        assert set(report.quarantined) == {"bad"}
        assert "live writer holds its lock" in report.problems["held"]
        assert report.unrepaired == ["held"]
        assert (store_path / "held.json").read_text() == "{not json"  # left where it was
        assert not (store_path / "bad.json").exists()
    finally:
        release.set()
        holder.join(PROCESS_TIMEOUT)
    assert holder.exitcode == 0
    with mmstore.Store(store_path) as store:  # the writer is gone: now it can be moved
        assert set(store.recover().quarantined) == {"held"}
        assert store.get("ok").tolist() == list(np.arange(10.0))


def test_recover_syncs_the_directories_it_moved_files_between(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moves into the quarantine are durable only once the group directory they left,
    the new quarantine directories and their parents are synced; it synced the root only."""
    from mmstore import _durable

    with mmstore.Store(store_path) as store:
        store.put("grp/sub/bad", np.arange(10.0))
        store.put("grp/ok", np.arange(10.0))
    (store_path / "grp" / "sub" / "bad.json").write_text("{not json")
    synced: list[str] = []
    real = _durable.fsync_dir
    monkeypatch.setattr(
        _durable, "fsync_dir", lambda path: (synced.append(os.path.relpath(path, store_path)), real(path))[1]
    )
    with mmstore.Store(store_path) as store:
        synced.clear()  # (what the open synced is not recover()'s)
        report = store.recover()
    target = Path(report.quarantined["grp/sub/bad"])  # .quarantine/<stamp>/grp/sub/bad
    assert target.parts[0] == ".quarantine"
    expected = {"grp/sub", "grp", "."} | {str(Path(*target.parts[:depth])) for depth in range(1, len(target.parts))}
    assert expected <= set(synced)
    assert len(synced) == len(set(synced))  # each once
    assert synced[-1] == "."  # the root last: deeper entries first
