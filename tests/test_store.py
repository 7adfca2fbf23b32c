"""The Store API: put/get, the mapping protocol, modes, errors, locking, recovery on open."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mmstore
from mmstore import _reads, _store
from tests import workers
from tests.conftest import PROCESS_TIMEOUT, run_in_fork, store_files


def test_put_get_round_trip_with_attrs(store: mmstore.Store) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.put("images/train", array, attrs={"unit": "px", "scale": np.float64(0.5)}) is None
    got = store.get("images/train")
    np.testing.assert_array_equal(got, array)
    assert store.attrs("images/train") == {"unit": "px", "scale": 0.5}


def test_get_is_zero_copy_and_read_only(store: mmstore.Store) -> None:
    store.put("x", np.arange(1000.0))
    got = store.get("x")
    assert not got.flags.writeable
    assert not got.flags.owndata
    with pytest.raises(ValueError):
        got[0] = 1.0
    with pytest.raises(ValueError):
        got.flags.writeable = True  # backed by a read-only map: cannot be made writable
    base = got
    while getattr(base, "base", None) is not None and not isinstance(base, memoryview):
        base = base.base
    import mmap

    assert isinstance(base, mmap.mmap) or isinstance(getattr(base, "obj", None), mmap.mmap)


def test_mapping_protocol(store: mmstore.Store) -> None:
    store["b"] = np.arange(2)
    store["a/x"] = np.arange(3)
    store["a/y"] = np.arange(4)
    assert "b" in store and "a/x" in store
    assert "a" not in store and "zz" not in store and 5 not in store and "../x" not in store
    assert list(store) == ["a/x", "a/y", "b"]
    assert len(store) == 3
    assert store.keys("a") == ["a/x", "a/y"]
    np.testing.assert_array_equal(store["a/y"], np.arange(4))
    del store["a/x"]
    assert list(store) == ["a/y", "b"]
    with pytest.raises(KeyError):
        store["a/x"]
    with pytest.raises(KeyError):
        del store["a/x"]


def test_get_with_default_items_and_values(store: mmstore.Store) -> None:
    store.put("b", np.arange(2))
    store.put("a/x", np.zeros(1))
    assert store.get("nope", None) is None and store.get("nope", 5) == 5
    assert store.get("b", None).tolist() == [0, 1]
    with pytest.raises(KeyError):
        store.get("nope")
    assert [(name, array.tolist()) for name, array in store.items()] == [("a/x", [0.0]), ("b", [0, 1])]
    assert [array.tolist() for array in store.values("a")] == [[0.0]]
    assert dict(store).keys() == {"a/x", "b"}


def test_missing_dataset_errors(store: mmstore.Store) -> None:
    for call in (store.get, store.info, store.attrs, store.delete):
        with pytest.raises(mmstore.DatasetNotFoundError) as info:
            call("nope")
        assert isinstance(info.value, KeyError)
        assert "nope" in str(info.value) and str(info.value).count("\n") == 0


def test_info_fields(store: mmstore.Store) -> None:
    store.put("x", np.zeros((3, 2), dtype="<i2"), attrs={"a": [1, 2]})
    info = store.info("x")
    assert info["name"] == "x"
    assert info["dtype"] == np.dtype("<i2")
    assert info["shape"] == (3, 2)
    assert info["nbytes"] == 12
    assert info["attrs"] == {"a": [1, 2]}
    assert info["generation"] == 1
    assert info["created"] == info["modified"]
    store.put("x", np.zeros(1))
    info2 = store.info("x")
    assert info2["generation"] == 2
    assert info2["created"] == info["created"]
    assert info2["modified"] >= info["modified"]
    assert info2["attrs"] == {}
    with mmstore.Store(store.path, "r") as other:  # parsed from the sidecar: the same floats
        assert (other.info("x")["created"], other.info("x")["modified"]) == (info2["created"], info2["modified"])


def test_replace_keeps_old_snapshot_valid_and_unlinks_old_file(store: mmstore.Store, store_path: Path) -> None:
    store.put("x", np.full(1000, 1.0))
    old = store.get("x")
    old_file = store.info("x")["data_file"]
    store.put("x", np.full(10, 2.0))
    assert not os.path.exists(old_file), "the old generation's file must be unlinked"
    assert old.shape == (1000,) and (old == 1.0).all()
    assert (store.get("x") == 2.0).all()
    store.delete("x")
    assert (old == 1.0).all()
    store.close()
    assert (old == 1.0).all()


def test_get_after_close_keeps_arrays_valid(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(5))
        array = store.get("x")
    assert store.closed
    np.testing.assert_array_equal(array, np.arange(5))
    with pytest.raises(mmstore.ClosedError):
        store.get("x")
    with pytest.raises(mmstore.ClosedError):
        store.put("y", np.arange(2))


def test_repeated_get_sees_commits_from_other_processes(store: mmstore.Store, store_path: Path, spawn) -> None:
    store.put("x", workers.pattern(1, 100))
    np.testing.assert_array_equal(store.get("x"), workers.pattern(1, 100))
    for seed in (2, 3, 4):
        child = spawn.Process(target=workers.put_one, args=(str(store_path), "x", seed, 100 + seed))
        child.start()
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
        np.testing.assert_array_equal(store.get("x"), workers.pattern(seed, 100 + seed))
        assert store.attrs("x") == {"seed": seed}
        assert store._entries["x"].counter is not None  # read twice: the next get is stat-free
    child = spawn.Process(target=workers.delete_one, args=(str(store_path), "x"))
    child.start()
    child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0
    with pytest.raises(KeyError):
        store.get("x")
    assert "x" not in store


def test_repeated_get_of_an_unchanged_dataset_makes_no_stat(
    store: mmstore.Store, store_path: Path, spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("x", np.arange(4.0))
    store.put("g/y", np.arange(3))
    for name in ("x", "g/y"):
        store.get(name)  # the writer's own entry: one stat() finds it current, with the counter
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    for _ in range(100):
        assert store.get("x")[3] == 3.0 and store.get("g/y")[2] == 2
    assert stats == []
    child = spawn.Process(target=workers.put_one, args=(str(store_path), "x", 5, 7))
    child.start()
    child.join(PROCESS_TIMEOUT)
    assert child.exitcode == 0
    np.testing.assert_array_equal(store.get("x"), workers.pattern(5, 7))  # the counter moved: look again
    np.testing.assert_array_equal(store.get("x"), workers.pattern(5, 7))  # (the new entry kept the counter)
    assert stats == [store.path + "/x.json"]


WARM_UP_CHECK = """
import os, sys
import mmstore
calls = []
real_get = mmstore.Store.get

def recording_get(self, name):
    array = real_get(self, name)
    calls.append((name, array.dtype.str, array.shape))
    return array

mmstore.Store.get = recording_get
store = mmstore.Store(sys.argv[1], "r")
manifest = os.path.join(store.path, "mmstore.json")
assert calls == [("mmstore", "|u1", (os.path.getsize(manifest),))], calls
assert not store._entries and not store._locations, (store._entries, store._locations)
held = []
for fd in os.listdir("/proc/self/fd"):
    try:
        held.append(os.readlink(f"/proc/self/fd/{fd}"))
    except FileNotFoundError:  # (listdir's own descriptor, closed since)
        pass
assert manifest not in held, held
mmstore.Store(sys.argv[1], "r")  # once per process
assert len(calls) == 1, calls
try:
    store.get("mmstore")
except mmstore.InvalidNameError:
    pass
else:
    raise AssertionError("the manifest's name is readable as a dataset")
assert store.get("x").tolist() == [1, 2, 3]
print("ok")
"""


def test_open_warms_up_the_first_get_path_and_keeps_nothing(store: mmstore.Store) -> None:
    """A process's first Store() runs get() once on the manifest (seen as bytes), so the
    first real get() runs warm code; nothing of it stays cached, open or readable."""
    store.put("x", np.array([1, 2, 3]))
    done = subprocess.run(
        [sys.executable, "-c", WARM_UP_CHECK, store.path], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_attrs_and_info_return_copies_down_to_nested_values(store: mmstore.Store) -> None:
    store.put("x", np.arange(3), attrs={"cfg": {"lr": 0.1}, "tags": ["a"]})
    attrs = store.attrs("x")
    attrs["cfg"]["lr"] = 999
    attrs["tags"].append("changed")
    store.info("x")["attrs"]["cfg"]["lr"] = 7
    assert store.attrs("x") == {"cfg": {"lr": 0.1}, "tags": ["a"]}
    with store.open_writer("x") as writer:  # (its close commits the cached header's attrs again)
        writer[0] = 5
    with mmstore.Store(store.path, "r") as other:
        assert other.attrs("x") == {"cfg": {"lr": 0.1}, "tags": ["a"]}


HELD_ARRAYS_CHECK = """
import gc, mmap, os, resource, sys
import numpy as np
import mmstore
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
root = sys.argv[1]

def mapped():
    with open("/proc/self/maps") as maps:
        return sum(root in line for line in maps)

with mmstore.Store(os.path.join(root, "s")) as store:
    for i in range(600):
        store.put(f"d{i}", np.full(3, i))
    held = [store.get(f"d{i}") for i in range(600)]  # 600 live generations, 256 descriptors
    cache = mmstore.Cache(os.path.join(root, "c"))
    hits = []
    for i in range(300):
        cache.set(i, np.full(2, i))
        hits.append(cache.get(i))
    assert [int(a[0]) for a in held] == list(range(600)) and [int(h[1]) for h in hits] == list(range(300))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]  # the program keeps descriptors to use
    for fd in spare:
        os.close(fd)
    assert not any(a.flags.writeable for a in held)
    for array in (held[0], held[-1], hits[-1]):  # still arrays of an mmap.mmap, read-only
        base = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        base = base.obj if isinstance(base, memoryview) else base
        assert isinstance(base, mmap.mmap), type(base)
    cache.close()
assert mapped() >= 600
del held, hits, cache, array, base  # (a closed cache still holds its hottest values)
gc.collect()
assert mapped() == 0, mapped()  # the last array of each generation unmapped it
print("ok")
"""


def test_held_arrays_need_no_file_descriptors(tmp_path: Path) -> None:
    """A process may keep arrays of many more datasets than it may open files: a mapped
    generation holds no descriptor, and is unmapped when its last array goes."""
    done = subprocess.run(
        [sys.executable, "-c", HELD_ARRAYS_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_clear_errors_for_masked_arrays_timeouts_and_unwritable_places(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    masked = np.ma.masked_array([1, 2], mask=[0, 1])
    with pytest.raises(mmstore.InvalidArgumentError, match="masked"):
        store.put("m", masked)
    with pytest.raises(mmstore.InvalidArgumentError, match="masked"):
        store.put_blocks("m", [masked])
    with store.create("g", np.int64, (0,), growable=True) as writer, pytest.raises(ValueError, match="masked"):
        writer.append(masked)
    with mmstore.Cache(tmp_path / "c") as cache, pytest.raises(ValueError, match="masked"):
        cache.set("k", (np.zeros(1), masked))
    assert "m" not in store
    assert mmstore.Store(store.path, timeout=None).timeout < 0  # None waits forever
    with pytest.raises(ValueError, match="timeout"):
        mmstore.Store(store.path, timeout="soon")

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mmstore._durable, "make_directories", refuse)
    with pytest.raises(mmstore.ReadOnlyError, match="cannot create store"):
        mmstore.Store(tmp_path / "elsewhere")


def test_lock_timeout_names_a_writer_of_this_process(store_path: Path) -> None:
    with mmstore.Store(store_path, timeout=0.05) as store:
        writer = store.create("g", np.int64, (0,), growable=True)
        with pytest.raises(mmstore.LockTimeout, match=r"the writer of 'g' .* in this process holds it; close it"):
            store.put("g", np.zeros(1))
        writer.close()
        store.put("g", np.zeros(1))


def test_attrs_must_be_json(store: mmstore.Store) -> None:
    with pytest.raises(ValueError, match="JSON"):
        store.put("x", np.zeros(1), attrs={"f": object()})
    with pytest.raises(ValueError, match="keys"):
        store.put("x", np.zeros(1), attrs={1: 2})
    with pytest.raises(ValueError, match="JSON"):
        store.put("x", np.zeros(1), attrs={"nan": float("nan")})
    for not_a_mapping in ([], "", 0, [("a", 1)]):  # (empty ones too: they are not "no attrs")
        with pytest.raises(ValueError, match="mapping"):
            store.put("x", np.zeros(1), attrs=not_a_mapping)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="mapping"):
            store.create("x", dtype="f8", shape=(0,), growable=True, attrs=not_a_mapping)  # type: ignore[arg-type]
    assert "x" not in store
    store.put("x", np.zeros(1), attrs={})
    assert store.attrs("x") == {}


def test_durable_put_and_flush(store: mmstore.Store) -> None:
    store.put("a", np.arange(3), durable=True)
    store.put("b", np.arange(4))
    store.flush()
    np.testing.assert_array_equal(store.get("b"), np.arange(4))


# --- modes ------------------------------------------------------------------------


def test_modes(store_path: Path) -> None:
    with pytest.raises(mmstore.StoreNotFoundError):
        mmstore.Store(store_path, "r")
    with pytest.raises(mmstore.StoreNotFoundError):
        mmstore.Store(store_path, "r+")
    with mmstore.Store(store_path, "w-") as store:
        store.put("x", np.arange(3))
    with pytest.raises(mmstore.StoreExistsError):
        mmstore.Store(store_path, "w-")
    with mmstore.Store(store_path, "r+") as store:
        store.put("y", np.arange(2))
    with mmstore.Store(store_path, "r") as store:
        assert store.keys() == ["x", "y"]
        with pytest.raises(mmstore.ReadOnlyError) as info:
            store.put("z", np.arange(1))
        assert isinstance(info.value, PermissionError)
        with pytest.raises(mmstore.ReadOnlyError):
            store.delete("x")
    with pytest.raises(ValueError, match="mode"):
        mmstore.Store(store_path, "w")


def test_refuses_to_adopt_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.txt").write_text("x")
    with pytest.raises(mmstore.StoreNotFoundError, match="non-empty"):
        mmstore.Store(tmp_path / "data")
    assert (tmp_path / "data" / "important.txt").read_text() == "x"


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(mmstore.MmstoreError):
        mmstore.Store(tmp_path / "f")


READ_ONLY_SCRIPT = """
import os, sys, numpy as np, mmstore
os.setgid(65534); os.setuid(65534)
store = mmstore.Store(sys.argv[1], "r")
assert store.keys() == ["g/x", "y"], store.keys()
assert store.get("g/x").sum() == 45
try:
    mmstore.Store(sys.argv[1], "a")
except PermissionError as exc:
    print("writer refused:", type(exc).__name__)
print("OK")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_read_only_store_needs_no_write_permission() -> None:
    # pytest's own tmp dirs are private to root; the unprivileged reader needs a way in.
    top = Path(tempfile.mkdtemp(prefix="mmstore-ro-"))
    try:
        _check_read_only_store(top)
    finally:
        for directory, _dirs, _files in os.walk(top):
            os.chmod(directory, 0o755)
        shutil.rmtree(top)


def _check_read_only_store(top: Path) -> None:
    top.chmod(0o755)
    path = top / "store"
    with mmstore.Store(path) as store:
        store.put("g/x", np.arange(10))
        store.put("y", np.arange(3))
    for directory, _dirs, files in os.walk(path):
        os.chmod(directory, 0o555)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
    before = store_files(path)
    result = subprocess.run(
        [sys.executable, "-c", READ_ONLY_SCRIPT, str(path)], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "writer refused: ReadOnlyError" in result.stdout
    assert store_files(path) == before


# --- locking ----------------------------------------------------------------------


def test_lock_timeout_names_the_lock(store_path: Path, spawn) -> None:
    with mmstore.Store(store_path) as store:
        store.put("ticks", np.arange(3))
    locked, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=workers.hold_lock, args=(str(store_path), "ticks", locked, release))
    holder.start()
    try:
        assert locked.wait(PROCESS_TIMEOUT)
        with mmstore.Store(store_path, timeout=0.2) as store:
            with pytest.raises(mmstore.LockTimeout) as info:
                store.put("ticks", np.arange(5))
            assert isinstance(info.value, TimeoutError)
            assert "ticks" in str(info.value) and ".ticks.lock" in str(info.value)
            store.put("other", np.arange(2))  # other datasets are not blocked
            np.testing.assert_array_equal(store.get("ticks"), np.arange(3))
    finally:
        release.set()
        holder.join(PROCESS_TIMEOUT)
    assert holder.exitcode == 0
    with mmstore.Store(store_path, timeout=5) as store:
        store.put("ticks", np.arange(5))
        assert store.get("ticks").shape == (5,)


def test_sigkilled_lock_holder_frees_the_lock(store_path: Path, spawn) -> None:
    mmstore.Store(store_path).close()
    locked, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=workers.hold_lock, args=(str(store_path), "x", locked, release))
    holder.start()
    assert locked.wait(PROCESS_TIMEOUT)
    holder.kill()
    holder.join(PROCESS_TIMEOUT)
    with mmstore.Store(store_path, timeout=PROCESS_TIMEOUT) as store:
        store.put("x", np.arange(2))
        assert store.get("x").tolist() == [0, 1]


# --- recovery on open ---------------------------------------------------------------


def test_writable_open_removes_dead_writers_leftovers(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.put("g/x", np.arange(3))
        committed = store_files(store_path)
    # What a writer killed mid-put leaves: an unreferenced data file and a temp sidecar.
    (store_path / "g" / "x.0123456789abcdef.dat").write_bytes(b"\0" * 24)
    (store_path / "g" / ".x.fedcba9876543210.tmp").write_text("{")
    (store_path / "y.00000000000000aa.dat").write_bytes(b"junk")  # a dataset never committed
    with mmstore.Store(store_path, "r") as reader:  # readers never clean up
        assert len(store_files(store_path)) == len(committed) + 3
        np.testing.assert_array_equal(reader.get("g/x"), np.arange(3))
    mmstore.Store(store_path).close()
    # Only the leftovers are gone (recovery may leave a lock file: those are never unlinked).
    assert [f for f in store_files(store_path) if not f.endswith(".lock")] == [
        f for f in committed if not f.endswith(".lock")
    ]
    with mmstore.Store(store_path, "r") as reader:
        np.testing.assert_array_equal(reader.get("g/x"), np.arange(3))


def test_writable_open_leaves_clean_datasets_unlocked_and_unread(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery runs at every writable open: a committed dataset with its one data file is
    not locked or read (it was, each one, at ~0.15 ms: seconds for a large store)."""
    from mmstore import _recovery

    with mmstore.Store(store_path) as store:
        for index in range(20):
            store.put(f"g/x{index}", np.arange(3))
        store.put("packed", np.arange(4))
    (store_path / "g" / ".x3.fedcba9876543210.tmp").write_text("{")  # one dead writer's leftover
    visited: list[str] = []
    real = _recovery._recover_dataset

    def counted(store: Any, name: str, *args: Any) -> int:
        visited.append(name)
        return real(store, name, *args)

    monkeypatch.setattr(_recovery, "_recover_dataset", counted)
    mmstore.Store(store_path).close()
    assert visited == ["g/x3"]
    assert not (store_path / "g" / ".x3.fedcba9876543210.tmp").exists()


def test_a_lone_unnamed_data_file_is_kept_with_its_broken_dataset(store_path: Path) -> None:
    """The sidecar names a data file that is missing, and another one lies beside it: no
    writable open removes it (it looks at leaves with a second data file or a temp file
    only), so verify() does not promise that; recover() quarantines it with the dataset."""
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(10))
        committed = Path(store.info("x")["data_file"])
    committed.unlink()
    stray = store_path / "x.0123456789abcdef.dat"
    stray.write_bytes(b"\0" * 80)
    with mmstore.Store(store_path) as store:  # (a writable open: recovery ran)
        report = store.verify()
        assert report.leftovers == [] and stray.name in report.problems["x"]
        assert list(store.recover().quarantined) == ["x"]
    assert not stray.exists() and stray.name in {Path(p).name for p in store_files(store_path / ".quarantine")}


def test_recover_leaves_the_data_file_of_a_put_in_flight(store_path: Path) -> None:
    """A put writes its new data file outside the dataset lock, holding the file's liveness
    lock: recover() quarantining the broken dataset meanwhile leaves that file in place, so
    the put's commit names a file that is there."""
    from mmstore import _locks

    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3))
    (store_path / "x.json").write_text("{corrupt")
    in_flight = store_path / "x.0123456789abcdef.dat"
    fd = os.open(in_flight, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _locks.mark_alive(fd)  # as a put in progress holds it
        with mmstore.Store(store_path) as store:
            assert list(store.recover().quarantined) == ["x"]
        assert in_flight.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("recovery", ["recover", "writable open"])
def test_put_whose_file_recovery_took_before_its_liveness_lock_writes_it_again(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, recovery: str
) -> None:
    """A put creates its data file, then takes the file's liveness lock: in between, another
    process's recovery may judge the file abandoned. recover() moves it to the quarantine
    (the dataset was broken), a writable open unlinks it. The put must notice at its commit
    and write the array again, never commit a sidecar naming a file that is not there."""
    from mmstore import _writes

    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3))
    (store_path / "x.json").write_text("{corrupt")
    array = np.arange(100.0)
    taken: list[str] = []
    real_mark_alive = _writes.mark_alive

    def recovery_first(fd: int, **kwargs: Any) -> bool:
        if not taken:  # (the first put's file only: the retry proceeds undisturbed)
            (new_file,) = [p for p in store_path.glob("x.*.dat") if os.path.samestat(p.stat(), os.fstat(fd))]
            taken.append(new_file.name)
            if recovery == "recover":
                with mmstore.Store(store_path) as other:
                    assert list(other.recover().quarantined) == ["x"]
                assert not new_file.exists()
            else:
                new_file.unlink()  # (what recover_on_open does with a dead writer's file)
        return real_mark_alive(fd, **kwargs)

    with mmstore.Store(store_path) as store:
        monkeypatch.setattr(_writes, "mark_alive", recovery_first)
        store.put("x", array)
        monkeypatch.undo()
        assert taken and store.info("x")["data_file"] != taken[0]
        assert np.array_equal(store.get("x"), array)
        assert store.verify().ok
    with mmstore.Store(store_path, "r") as reader:
        assert np.array_equal(reader.get("x"), array)


def test_recovery_keeps_files_of_live_writers(store_path: Path) -> None:
    from mmstore import _locks

    mmstore.Store(store_path).close()
    live = store_path / "x.0123456789abcdef.dat"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _locks.mark_alive(fd)  # as a put in progress holds it
        mmstore.Store(store_path).close()
        assert live.exists()
    finally:
        os.close(fd)
    mmstore.Store(store_path).close()
    assert not live.exists()


def test_recovery_leaves_unreadable_datasets_alone(store_path: Path) -> None:
    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3))
        data_file = Path(store.info("x")["data_file"])
    (store_path / "x.json").write_text("{corrupt")
    mmstore.Store(store_path).close()
    assert data_file.exists(), "data of a corrupt header is never deleted by recovery"


# --- fork ---------------------------------------------------------------------------


def test_store_used_after_fork(store: mmstore.Store, store_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    store.put("x", np.arange(3))
    store.get("x")

    def child() -> int:
        store.put("x", np.arange(4))
        return 0 if store.get("x").tolist() == [0, 1, 2, 3] else 2

    assert run_in_fork(child) == 0
    assert store.get("x").tolist() == [0, 1, 2, 3]
    store.put("x", np.arange(5))  # the parent's lock still works
    assert store.get("x").shape == (5,)


def test_no_descriptor_leak_over_many_puts_and_gets(store: mmstore.Store) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for i in range(600):
        store.put(f"d{i % 300}", np.arange(i % 7))
        store.get(f"d{(i * 7) % 300}") if f"d{(i * 7) % 300}" in store else None
    gc.collect()
    after = len(os.listdir("/proc/self/fd"))
    # Bounded by the caches (a pinned sidecar and a map per entry, a lock per location), not by the puts.
    bound = 2 * _store._MAX_CACHED_DATASETS + store._entry_budget + 10  # remembered locations: one budget
    assert after - before <= bound
    for i in range(300):
        store.put(f"more{i}", np.arange(2))
    assert len(os.listdir("/proc/self/fd")) - before <= bound


def test_threads_sharing_a_store_leak_no_sidecar_descriptors(store: mmstore.Store) -> None:
    # Threads reading and replacing the same names at once: every sidecar descriptor the
    # store holds belongs to one of its cached entries (an entry remembered by one thread
    # used to overwrite another thread's, leaking its descriptor).
    names = [f"g{i % 5}/k{i}" for i in range(120)]
    for i, name in enumerate(names):
        store.put(name, np.full(3, i))
    failures: list[str] = []

    def work(seed: int) -> None:
        try:
            for step in range(1500):
                index = (step * 7 + seed * 13) % len(names)
                if store.get(names[index])[0] != index:
                    failures.append(f"{names[index]} has the wrong value")
                if step % 10 == seed:
                    store.put(names[index], np.full(3, index))
        except Exception as exc:  # reported below, with the thread's error
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    sidecar_fds = counter_fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        target = target.removesuffix(" (deleted)")
        if not target.startswith(store.path + "/"):
            continue
        if target.endswith(".lock"):
            counter_fds += flags & os.O_ACCMODE == os.O_RDONLY  # (a writer lock's is read-write)
        elif not target.endswith(".dat"):
            sidecar_fds += 1  # a sidecar, or a replaced one (renamed to a temp name and unlinked)
    entries = list(store._entries.values())
    assert sidecar_fds == len(entries)
    assert counter_fds == sum(entry.counter_fd >= 0 for entry in entries) > 0


# --- streamed sources and failures -----------------------------------------------------


def test_put_streams_h5py_datasets_and_blocks(store: mmstore.Store, tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "in.h5", "w") as h5:
        h5["big"] = np.arange(300_000, dtype=">i4").reshape(-1, 3)
        store.put("from_h5", h5["big"])  # read in row blocks, not loaded whole
    got = store.get("from_h5")
    assert got.dtype == np.dtype(">i4") and got.shape == (100_000, 3) and got[-1, -1] == 299_999
    rows = store.put_blocks("blocks", (np.full((n, 2), n, np.int16) for n in (3, 0, 5)), attrs={"a": 1})
    assert rows == 8 and store.get("blocks").shape == (8, 2) and store.attrs("blocks") == {"a": 1}
    assert store.verify().ok
    with pytest.raises(ValueError, match="rows"):
        store.put_blocks("bad", [np.zeros((2, 2)), np.zeros((2, 3))])
    with pytest.raises(ValueError, match="no blocks"):
        store.put_blocks("bad", [])
    assert "bad" not in store


@pytest.mark.parametrize("failing", ["write", "open", "rename"])
def test_failed_put_raises_clearly_and_keeps_the_old_value(
    store: mmstore.Store, store_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    import errno

    store.put("x", np.arange(3))
    files = store_files(store_path)
    real = getattr(os, failing)

    def full_disk(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, full_disk)
    if failing == "rename":
        monkeypatch.setattr("mmstore._durable._exchange_supported", False)
    with pytest.raises(mmstore.StoreFullError) as info:
        store.put("x", np.arange(1000))
    assert isinstance(info.value, OSError) and "'x'" in str(info.value)
    monkeypatch.setattr(os, failing, real)
    assert store.get("x").tolist() == [0, 1, 2]
    assert store_files(store_path) == files, "no leftover files from the failed put"
    store.put("x", np.arange(4))  # the next operation works
    assert store.get("x").tolist() == [0, 1, 2, 3]


def test_filesystem_type_and_network_warning(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmstore import _filesystems

    assert _filesystems.filesystem_type(str(Path(__file__).parent)) not in (None, "")
    monkeypatch.setattr(_filesystems, "filesystem_type", lambda path: "nfs4")
    with pytest.warns(mmstore.UnsafeFileSystemWarning, match="nfs4"):
        mmstore.Store(store_path).close()
    monkeypatch.setattr(_filesystems, "filesystem_type", lambda path: "ext4")
    mmstore.Store(store_path).close()  # no warning (warnings are errors in this test run)


def test_fsync_error_makes_the_handle_refuse_further_commits(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    with mmstore.Store(store_path) as store:
        store.put("x", np.arange(3))
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(mmstore.FsyncError):
            store.put("y", np.arange(4), durable=True)
        monkeypatch.setattr(os, "fsync", real_fsync)
        # The kernel may have dropped the pages and cleared the error: never pretend.
        with pytest.raises(mmstore.StoreIOError, match="fsync error"):
            store.put("z", np.arange(5))
        with pytest.raises(mmstore.StoreIOError, match="fsync error"):
            store.delete("x")
        with pytest.raises(mmstore.StoreIOError, match="fsync error"):
            store.flush()
        np.testing.assert_array_equal(store.get("x"), np.arange(3))  # reading still works
    with mmstore.Store(store_path) as store:  # a new handle, after checking the disk
        store.put("z", np.arange(5))
        assert "y" not in store and store.get("z").tolist() == [0, 1, 2, 3, 4]


def test_fsync_error_in_a_writer_flush(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    writer = store.create("log", np.int64, (0,), growable=True)
    writer.append(np.arange(3))
    writer.flush()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    writer.append(np.arange(3, 6))
    with pytest.raises(mmstore.FsyncError):
        writer.flush(durable=True)
    monkeypatch.undo()
    with pytest.raises(mmstore.ClosedError, match="fsync error"):
        writer.append(np.arange(2))
    writer.close()  # releases the lock without publishing more
    assert store.get("log").tolist() == [0, 1, 2]
    with store.open_writer("log") as again:  # the lock is free for a new writer
        assert len(again) == 3


def test_writes_never_follow_a_symlinked_group_out_of_the_store(
    store: mmstore.Store, store_path: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store_path / "g").symlink_to(outside)
    (store_path / "f").write_text("not a directory")
    for name in ("g/x", "g/sub/x", "f/x"):
        with pytest.raises(mmstore.InvalidNameError, match="symlink or not a directory"):
            store.put(name, np.arange(3))
    with pytest.raises(mmstore.InvalidNameError):
        store.create("g/log", np.int64, (0,), growable=True)
    assert list(outside.iterdir()) == []
    store.put("real/x", np.arange(3))  # ordinary groups are fine
    assert (store_path / "real" / "x.json").is_file()


def test_files_respect_the_umask_or_exact_permissions(tmp_path: Path) -> None:
    def modes(root: Path) -> set[tuple[str, int]]:
        found = set()
        for directory, dirs, files in os.walk(root):
            for name in dirs:
                found.add(("dir", os.stat(os.path.join(directory, name)).st_mode & 0o777))
            for name in files:
                found.add(("file", os.stat(os.path.join(directory, name)).st_mode & 0o777))
        return found

    old_umask = os.umask(0o027)
    try:
        with mmstore.Store(tmp_path / "default") as store:
            store.put("g/x", np.arange(3))
            store.create("g/log", np.int64, (0,), growable=True).close()
        assert modes(tmp_path / "default") == {("dir", 0o750), ("file", 0o640)}
        os.umask(0o077)  # a private umask: a shared store still gets group access
        with mmstore.Store(tmp_path / "shared", permissions=0o660) as store:
            store.put("g/sub/x", np.arange(3))
            store.create("g/log", np.int64, (0,), growable=True).close()
        with mmstore.Cache(tmp_path / "cache", permissions=0o660) as cache:
            cache.set("k", np.arange(2))
        assert modes(tmp_path / "shared") == {("dir", 0o770), ("file", 0o660)}
        assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o770
        assert {mode for kind, mode in modes(tmp_path / "cache") if kind == "file"} == {0o660}
        with mmstore.Store(tmp_path / "shorthand", mode=0o640) as store:  # an int mode: "a" with those bits
            assert store.mode == "a" and store.permissions == 0o640
            store.put("g/x", np.arange(3))
        assert modes(tmp_path / "shorthand") == {("dir", 0o750), ("file", 0o640)}
    finally:
        os.umask(old_umask)
    with pytest.raises(ValueError, match="permissions"):
        mmstore.Store(tmp_path / "bad", permissions=0o1777)
    with pytest.raises(ValueError, match="permissions"):
        mmstore.Store(tmp_path / "bad", mode=0o2000)
    with pytest.raises(ValueError, match="disagree"):
        mmstore.Store(tmp_path / "bad", mode=0o660, permissions=0o600)
    assert not (tmp_path / "bad").exists()


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Record every fsync as the path (relative to ``root``) of the file or directory synced."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_flush_makes_datasets_made_by_create_durable(store: mmstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 4: flush() fsyncs the data file, the sidecar and their directory, in that order,
    for every commit, create() and a writer's close() included, not only put()."""
    with store.create("grp/fixed", dtype="<f8", shape=(4,)) as writer:
        writer[:] = 1.0
    with store.create("log", dtype="<i8", shape=(0,), growable=True) as writer:
        writer.append(np.arange(3))
    synced = _record_fsyncs(monkeypatch, Path(store.path))
    store.flush()
    for name in ("grp/fixed", "log"):
        data = os.path.relpath(store.info(name)["data_file"], store.path)
        directory = os.path.dirname(data) or "."
        sidecar = f"{name}.json"
        assert {data, sidecar, directory} <= set(synced), (name, synced)
        assert synced.index(data) < synced.index(sidecar) < synced.index(directory)


def test_durable_writer_flush_syncs_the_sidecar_after_create(
    store: mmstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_fsyncs(monkeypatch, Path(store.path))
    with store.create("g/log", dtype="<i8", shape=(0,), growable=True) as writer:
        writer.append(np.arange(5))
        writer.flush(durable=True)
        data = os.path.relpath(store.info("g/log")["data_file"], store.path)
        assert synced.count("g/log.json") == 1 and synced.index(data) < synced.index("g/log.json")
        assert synced.index("g/log.json") < synced.index("g") < synced.index(".")
        del synced[:]
        writer.append(np.arange(5))
        writer.flush(durable=True)  # the sidecar is durable already: only the data file again
        assert set(synced) == {data}


def test_info_reports_the_committed_length_of_a_growable_dataset(store: mmstore.Store) -> None:
    with store.create("t", dtype="<f8", shape=(0,), growable=True) as writer:
        writer.append(np.arange(100.0))
        writer.flush()
        writer.append(np.arange(5.0))  # not flushed: not committed
        for view in (store, mmstore.Store(store.path, "r")):
            info = view.info("t")
            assert info["shape"] == (100,) and info["nbytes"] == 800 and info["size"] == 100
            assert view.get("t").shape == info["shape"]
    assert store.info("t")["shape"] == (105,)  # close() flushes


@pytest.mark.parametrize(
    ("builtin", "call"),
    [
        (ValueError, lambda s, c: s.create("x", dtype="notadtype", shape=(0,), growable=True)),
        (ValueError, lambda s, c: s.put_blocks("x", [np.zeros(2)], dtype="notadtype")),
        (ValueError, lambda s, c: s.put("y", np.zeros(2), attrs={"a": object()})),
        (ValueError, lambda s, c: s.put("y", np.zeros(2), attrs={"a": float("nan")})),
        (ValueError, lambda s, c: s.put("y", [[1, 2], [3]])),
        (ValueError, lambda s, c: s.create("z", "f8", (-1,))),
        (ValueError, lambda s, c: s.create("z", "f8", (), growable=True)),
        (ValueError, lambda s, c: mmstore.Store(os.path.join(s.path, "other"), "q")),
        (ValueError, lambda s, c: mmstore.Cache(os.path.join(s.path, "c2"), max_bytes=0)),
        (TypeError, lambda s, c: c.set(object(), np.zeros(2))),  # a key with no canonical value
        (TypeError, lambda s, c: c.set("k", object())),
        (TypeError, lambda s, c: c.memoize(lambda x: x)(object())),
    ],
)
def test_every_error_is_an_mmstore_error_with_its_builtin_base(
    store: mmstore.Store, tmp_path: Path, builtin: type, call: Any
) -> None:
    with mmstore.Cache(tmp_path / "cache") as cache, pytest.raises(mmstore.MmstoreError) as caught:
        call(store, cache)
    assert isinstance(caught.value, builtin)


def test_writer_errors_are_mmstore_errors(store: mmstore.Store) -> None:
    with store.create("g", "f8", (0,), growable=True) as writer:
        for rows in (np.array(["a"]), np.zeros((2, 2)), [[1.0], [2.0, 3.0]]):
            with pytest.raises(mmstore.InvalidArgumentError):
                writer.append(rows)
    with store.create("h", "f8", (3,)) as writer, pytest.raises(mmstore.InvalidArgumentError, match="not growable"):
        writer.append(np.zeros(1))


def test_close_leaves_a_commit_under_way_in_another_thread_intact(
    store: mmstore.Store, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstore import _durable

    store.put("x", np.arange(3))
    inside, resume = threading.Event(), threading.Event()
    real_write = _durable.write_file_atomically

    def paused_write(*args: Any, **kwargs: Any) -> int:
        inside.set()  # the put holds the dataset's lock here
        assert resume.wait(PROCESS_TIMEOUT)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(_durable, "write_file_atomically", paused_write)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put("x", np.arange(9))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    assert inside.wait(PROCESS_TIMEOUT)
    lock = store._locations["x"].lock
    store.close()  # must not close the lock the put holds
    assert lock._fd >= 0
    resume.set()
    thread.join(PROCESS_TIMEOUT)
    assert errors == []
    assert lock._fd == -1  # closed at the put's release instead
    monkeypatch.undo()
    with mmstore.Store(store_path) as again:
        np.testing.assert_array_equal(again.get("x"), np.arange(9))
        assert again.verify().ok


def test_an_entry_remembered_while_the_store_closes_does_not_outlive_it(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mmstore.Store(store_path) as writer:
        writer.put("x", np.arange(5))
    reader = mmstore.Store(store_path, "r")
    real = mmstore.Store._entries_in_process
    closed = []

    def close_meanwhile(self: mmstore.Store) -> int:
        if not closed:  # another thread's close() lands inside this _remember
            closed.append(True)
            self.close()
        return real(self)

    monkeypatch.setattr(mmstore.Store, "_entries_in_process", close_meanwhile)
    reader.get("x")
    assert closed and reader.closed
    assert len(reader._entries) == 0  # dropped (and its descriptors closed), not left cached
    with pytest.raises(mmstore.ClosedError):
        reader.get("x")


@pytest.mark.parametrize("how", ["put", "packed", "create"])
def test_an_interrupt_after_the_commit_point_keeps_the_commit(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    with mmstore.Store(store_path) as first:
        first.put("x", np.arange(3))  # (not packed: a packed put then creates its file)
    store = mmstore.Store(store_path, pack_small=how == "packed")
    real_remember = mmstore.Store._remember

    def interrupted(self: mmstore.Store, name: str, entry: Any) -> None:
        real_remember(self, name, entry)
        if entry.header.generation == 2:  # the new sidecar's: after its rename, the commit stands
            raise KeyboardInterrupt

    monkeypatch.setattr(mmstore.Store, "_remember", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if how == "create":
            store.create("x", np.int64, (4,), exist_ok=True)
        else:
            store.put("x", np.arange(7))
    monkeypatch.undo()
    store.close()
    with mmstore.Store(store_path) as again:
        expected = np.zeros(4, np.int64) if how == "create" else np.arange(7)
        np.testing.assert_array_equal(again.get("x"), expected)  # its data file was not removed
        assert again.verify().ok


def test_close_racing_new_names_writers_and_cache_locks_leaves_nothing_held(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstore import _growable

    # A writer whose creation is under way in another thread when close() runs.
    store = mmstore.Store(store_path)
    inside, resume = threading.Event(), threading.Event()
    real_writer = _growable.Writer.__init__

    def paused_writer(self: Any, *args: Any) -> None:
        real_writer(self, *args)
        inside.set()
        assert resume.wait(PROCESS_TIMEOUT)

    monkeypatch.setattr(_growable.Writer, "__init__", paused_writer)
    errors = _close_during(store, lambda: store.create("t", np.int64, (2,)), inside, resume)
    monkeypatch.undo()
    assert [type(error) for error in errors] == [mmstore.ClosedError]
    with mmstore.Store(store_path, timeout=5) as other:
        other.put("t", np.arange(2))  # the lock was released, not left held by a lost writer

    # A name seen for the first time while close() runs.
    store = mmstore.Store(store_path)
    inside.clear()
    resume.clear()
    real_validate = _reads.validate_name

    def paused_validate(name: str) -> str:
        inside.set()
        assert resume.wait(PROCESS_TIMEOUT)
        return real_validate(name)

    monkeypatch.setattr(_reads, "validate_name", paused_validate)
    errors = _close_during(store, lambda: store.put("new", np.arange(2)), inside, resume)
    monkeypatch.undo()
    assert [type(error) for error in errors] == [mmstore.ClosedError]
    assert store._locations == {}

    # A cache closed while another thread computes under its compute lock.
    cache = mmstore.Cache(tmp_path / "cache")
    computing, finish = threading.Event(), threading.Event()

    @cache.memoize
    def slow(x: int) -> np.ndarray:
        computing.set()
        assert finish.wait(PROCESS_TIMEOUT)
        return np.full(3, x)

    thread = threading.Thread(target=lambda: _record(errors, lambda: slow(5)))
    thread.start()
    assert computing.wait(PROCESS_TIMEOUT)
    (held,) = [lock for lock in cache._compute_locks.values() if lock._fd >= 0]
    cache.close()
    assert held._fd >= 0  # still held by the computation: not pulled from under it
    finish.set()
    thread.join(PROCESS_TIMEOUT)
    assert held._fd == -1  # closed at its release


def _close_during(store: mmstore.Store, call: Any, inside: threading.Event, resume: threading.Event) -> list[Any]:
    """Run ``call`` in a thread, close ``store`` once the thread is ``inside`` (paused
    there until ``resume``), let it finish; the errors it raised."""
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _record(errors, call))
    thread.start()
    assert inside.wait(PROCESS_TIMEOUT)
    store.close()
    resume.set()
    thread.join(PROCESS_TIMEOUT)
    assert not thread.is_alive()
    return errors


def _record(errors: list[BaseException], call: Any) -> None:
    try:
        call()
    except BaseException as exc:  # collected for the test's assertions
        errors.append(exc)


def test_close_landing_inside_a_release_still_closes_the_lock(store: mmstore.Store) -> None:
    store.put("x", np.arange(3))
    lock = store._locations["x"].lock
    inside, resume = threading.Event(), threading.Event()

    class PausingRelease:  # the lock's thread lock, pausing as the holder lets go of it
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def acquire(self, *args: Any, **kwargs: Any) -> bool:
            return bool(self.inner.acquire(*args, **kwargs))

        def release(self) -> None:
            if threading.current_thread() is not threading.main_thread() and not inside.is_set():
                inside.set()
                assert resume.wait(PROCESS_TIMEOUT)
            self.inner.release()

    lock._thread_lock = PausingRelease(lock._thread_lock)  # type: ignore[assignment]
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _record(errors, lambda: store.put("x", np.arange(4))))
    thread.start()
    assert inside.wait(PROCESS_TIMEOUT)
    store.close()  # the put's release has checked keep_open already and still holds the thread lock
    resume.set()
    thread.join(PROCESS_TIMEOUT)
    assert errors == []
    assert lock._fd == -1  # closed once the release finished, not left open (or parked)


@pytest.mark.parametrize("sidecar", ["valid", "missing", "garbage", "fifo"])
def test_a_put_that_fails_before_its_commit_leaves_no_data_file(
    store: mmstore.Store, store_path: Path, monkeypatch: pytest.MonkeyPatch, sidecar: str
) -> None:
    store.put("x", np.arange(3))
    old_files = sorted(p.name for p in store_path.glob("x.*.dat"))
    path = store_path / "x.json"
    if sidecar != "valid":
        path.unlink()
        if sidecar == "garbage":
            path.write_bytes(b"not a header")
        elif sidecar == "fifo":
            os.mkfifo(path)  # reading it must not block the clean-up
    store._drop_entry("x")

    def failing_commit(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mmstore.Store, "_write_sidecar_locked", failing_commit)
    with pytest.raises(OSError):
        store.put("x", np.arange(100_000))
    new_files = sorted(p.name for p in store_path.glob("x.*.dat"))
    assert new_files == old_files  # the failed put's file is gone, the old one untouched


def test_open_writer_racing_close_closes_the_writer_once(store_path: Path) -> None:
    with mmstore.Store(store_path) as first:
        first.create("t", np.int64, (3,)).close()
    store = mmstore.Store(store_path)
    inside, resume = threading.Event(), threading.Event()

    class PausingWriters(weakref.WeakSet):  # type: ignore[type-arg]
        def add(self, item: Any) -> None:
            super().add(item)
            if not inside.is_set():
                inside.set()  # the new writer is registered: close() will close it
                assert resume.wait(PROCESS_TIMEOUT)

    store._writers = PausingWriters()
    errors = _close_during(store, lambda: store.open_writer("t"), inside, resume)
    assert [type(error) for error in errors] == [mmstore.ClosedError]  # not "release unlocked lock"
    with mmstore.Store(store_path, timeout=5) as other:
        with other.open_writer("t") as writer:  # the lock was released, once
            writer[0] = 7
        assert other.get("t").tolist() == [7, 0, 0]


def test_attrs_too_large_for_a_sidecar_are_refused_before_the_commit(store: mmstore.Store, store_path: Path) -> None:
    from mmstore._format import MAX_SIDECAR_BYTES

    store.put("x", np.arange(3), attrs={"ok": 1})
    old_files = sorted(p.name for p in store_path.glob("x.*.dat"))
    with pytest.raises(mmstore.InvalidArgumentError, match="limit of a sidecar"):
        store.put("x", np.arange(5), attrs={"blob": "x" * MAX_SIDECAR_BYTES})
    assert sorted(p.name for p in store_path.glob("x.*.dat")) == old_files
    with mmstore.Store(store_path, "r") as reader:  # committed would mean unreadable: it was not
        assert reader.get("x").tolist() == [0, 1, 2] and reader.attrs("x") == {"ok": 1}


def test_record_dtype_with_fields_out_of_order_in_memory_is_refused_clearly(store: mmstore.Store) -> None:
    # NumPy has no descr for it and raised its own ValueError from inside put.
    dtype = np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]})
    with pytest.raises(mmstore.UnsupportedDtypeError, match=r"dataset 'r': dtype .*repack_fields"):
        store.put("r", np.zeros(3, dtype))
    assert "r" not in store


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
def test_a_store_with_an_infinite_or_huge_timeout_writes_and_waits_for_locks(store_path: Path, timeout: float) -> None:
    with mmstore.Store(store_path, timeout=timeout) as store:
        store.put("y", np.arange(2))
        with store.create("x", np.int64, (0,), growable=True) as writer:
            writer.append(np.arange(3))
        writer = store.open_writer("x")
        outcome: list[Any] = []

        def put_when_free() -> None:
            try:
                store.put("x", np.arange(5))  # waits (forever) for the writer's lock
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=put_when_free)
        thread.start()
        writer.close()
        thread.join(PROCESS_TIMEOUT)
        assert outcome == [None]
        np.testing.assert_array_equal(store.get("x"), np.arange(5))
        np.testing.assert_array_equal(store.get("y"), np.arange(2))
    with pytest.raises(mmstore.InvalidArgumentError):
        mmstore.Store(store_path, timeout=float("nan"))


def test_recover_leaves_alone_what_a_writer_deleted_or_mended_while_it_checked(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstore import _recovery

    with mmstore.Store(store_path) as store:
        for name in ("bad", "gone", "mended"):
            store.put(name, np.arange(3))
    for name in ("bad", "mended"):  # truncated data files: both unreadable when checked
        with mmstore.Store(store_path, "r") as reader:
            os.truncate(reader.info(name)["data_file"], 8)

    # Another writer deletes 'gone' just before the check first reads it (it used to be
    # reported as "no dataset", then recover() failed to move it), and puts 'mended'
    # afresh after the check and before recover() takes its lock (it was quarantined,
    # healthy, and vanished from the store).
    real_header, real_verify = mmstore.Store.header, _recovery.verify_store

    def header(self: mmstore.Store, name: str) -> Any:
        if name == "gone" and "gone" in self:
            with mmstore.Store(store_path) as other:
                other.delete("gone")
        return real_header(self, name)

    def verify_then_mend(store: mmstore.Store, progress: Any = None) -> Any:
        report = real_verify(store, progress)
        with mmstore.Store(store_path) as other:
            other.put("mended", np.arange(5))
        return report

    monkeypatch.setattr(mmstore.Store, "header", header)
    monkeypatch.setattr(_recovery, "verify_store", verify_then_mend)
    with mmstore.Store(store_path) as store:
        report = store.recover()
        assert set(report.quarantined) == {"bad"} and set(report.problems) == {"bad"}
        assert store.keys() == ["mended"] and store.get("mended").tolist() == [0, 1, 2, 3, 4]
