"""The store core against DESIGN.md's contract: modes, listings, error classes, read-only places.

Black-box checks that complement test_store.py and test_format.py: each one pins a
promise of the contract (docs/FORMAT.md, README "What you get") that those do not.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT, store_files

# --- modes ------------------------------------------------------------------------


def _make(kind: str, path: Path) -> None:
    if kind == "store":
        with mmstore.Store(path) as store:
            store.put("x", np.arange(3))
    elif kind == "empty-directory":
        path.mkdir()
    elif kind == "other-directory":
        path.mkdir()
        (path / "notes.txt").write_text("not a store")
    elif kind == "file":
        path.write_text("not a store")


# What each mode does with each kind of path: the class it raises, or "ok".
MODE_OUTCOMES = {
    ("r", "missing"): mmstore.StoreNotFoundError,
    ("r+", "missing"): mmstore.StoreNotFoundError,
    ("a", "missing"): "ok",
    ("w-", "missing"): "ok",
    ("r", "store"): "ok",
    ("r+", "store"): "ok",
    ("a", "store"): "ok",
    ("w-", "store"): mmstore.StoreExistsError,
    ("r", "empty-directory"): mmstore.StoreNotFoundError,
    ("r+", "empty-directory"): mmstore.StoreNotFoundError,
    ("a", "empty-directory"): "ok",
    ("w-", "empty-directory"): "ok",
    ("r", "other-directory"): mmstore.StoreNotFoundError,
    ("r+", "other-directory"): mmstore.StoreNotFoundError,
    ("a", "other-directory"): mmstore.StoreNotFoundError,
    ("w-", "other-directory"): mmstore.StoreNotFoundError,
    ("r", "file"): mmstore.StoreNotFoundError,
    ("r+", "file"): mmstore.StoreNotFoundError,
    ("a", "file"): mmstore.StoreNotFoundError,
    ("w-", "file"): mmstore.StoreNotFoundError,
}


@pytest.mark.parametrize(("mode", "kind"), list(MODE_OUTCOMES), ids="-".join)
def test_each_mode_on_each_kind_of_path(tmp_path: Path, mode: str, kind: str) -> None:
    path = tmp_path / "s"
    _make(kind, path)
    before = store_files(path) if path.is_dir() else None
    outcome = MODE_OUTCOMES[mode, kind]
    if outcome == "ok":
        with mmstore.Store(path, mode) as store:
            assert store.mode == mode
            assert store.keys() == (["x"] if kind == "store" else [])
        assert (path / "mmstore.json").is_file()
        return
    with pytest.raises(outcome) as info:
        mmstore.Store(path, mode)
    assert isinstance(info.value, mmstore.MmstoreError)
    assert "\n" not in str(info.value)
    # A refused open changes nothing: no manifest adopted, nothing created or removed.
    if before is None:
        assert kind == "file" or not path.exists()
    else:
        assert store_files(path) == before


# --- what a listing holds ------------------------------------------------------------


def test_listing_holds_every_dataset_and_nothing_else(store: mmstore.Store, store_path: Path) -> None:
    store.put("a", np.arange(3))
    store.put("g/b", np.arange(4))
    store.put("g/h/c", np.zeros(2))
    store.put("mmstore/x", np.zeros(1))  # only the top-level "mmstore" is reserved
    store.put("g/mmstore", np.zeros(1))
    store.put("x.json", np.zeros(1))  # a leaf may end in .json
    with store.create("ticks", "<i4", (0,), growable=True) as writer:
        writer.append(np.arange(5, dtype="<i4"))
        writer.flush()
    expected = ["a", "g/b", "g/h/c", "g/mmstore", "mmstore/x", "ticks", "x.json"]
    # What a store directory may also hold: temp sidecars, leftover data files, locks,
    # the quarantine, files of other programs, groups emptied by deletes.
    (store_path / ".a.0123456789abcdef.tmp").write_text("{}")
    (store_path / "g" / ".b.0123456789abcdef.tmp").write_text("{}")
    (store_path / "a.0123456789abcdef.dat").write_bytes(b"leftover")
    (store_path / ".quarantine" / "1-2").mkdir(parents=True)
    (store_path / ".quarantine" / "1-2" / "q.json").write_text("{}")
    (store_path / "README.txt").write_text("hello")
    (store_path / "empty" / "group").mkdir(parents=True)
    store.put("gone/y", np.zeros(1))
    store.delete("gone/y")
    for listing in (store.keys(), list(store), sorted(iter(store))):
        assert listing == expected
    assert len(store) == len(expected)
    assert [name for name in expected if name in store] == expected
    for name in ("gone/y", "gone", "g", "empty", "empty/group", ".quarantine/1-2/q", "README.txt", "mmstore"):
        assert name not in store
    assert store.keys("g") == ["g/b", "g/h/c", "g/mmstore"]
    with mmstore.Store(store_path, "r") as reader:  # another handle sees the same
        assert reader.keys() == expected and len(reader) == len(expected)
        assert reader.get("ticks").tolist() == [0, 1, 2, 3, 4]


# --- dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        np.dtype({"names": ["a"], "formats": ["<i4"], "titles": [5]}),
        np.dtype({"names": ["a"], "formats": ["<i4"], "titles": [b"t"]}),
        np.dtype({"names": ["a"], "formats": ["<i4"], "titles": [("t",)]}),
        np.dtype({"names": ["a", "b"], "formats": ["<i4", "<f8"], "titles": [None, 1.5]}),
    ],
    ids=["int-title", "bytes-title", "tuple-title", "float-title"],
)
def test_a_dtype_whose_field_titles_are_not_strings_is_refused_as_unsupported(
    store: mmstore.Store, dtype: np.dtype
) -> None:
    # The sidecar holds titles as JSON strings: other titles cannot round-trip, and must be
    # refused like any unstorable dtype (a ValueError that is also an MmstoreError).
    with pytest.raises(mmstore.UnsupportedDtypeError) as info:
        store.put("x", np.zeros(3, dtype))
    assert isinstance(info.value, ValueError)
    assert "'x'" in str(info.value) and "\n" not in str(info.value)
    assert "x" not in store
    assert [name for name in store_files(Path(store.path)) if not name.startswith(".")] == ["mmstore.json"]


# --- writes refused by the file system ---------------------------------------------------

# What the two checks below run first, as an unprivileged user: report(calls, expected)
# prints one line per call, "<name> -> <error class>: <message>" (or "-> no error").
AS_ANOTHER_USER = """
import os, sys, numpy as np, mmstore
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # chmod does not bind root

def report(calls, expected):
    for name, call in calls:
        try:
            call()
            print(name, "-> no error")
        except expected as exc:
            assert isinstance(exc, PermissionError) and "\\n" not in str(exc), exc
            print(name, "->", expected.__name__ + ":", exc)
        except BaseException as exc:
            print(name, "->", type(exc).__name__, exc)
"""

UNWRITABLE_CHECK = (
    AS_ANOTHER_USER
    + """
store = mmstore.Store(sys.argv[1], "a")
report([
    ("put through a group without write permission", lambda: store.put("g/new", np.arange(2))),
    ("replace a dataset whose group has no write permission", lambda: store.put("g/x", np.arange(2))),
    ("put to a dataset whose lock file has no write permission", lambda: store.put("y", np.arange(2))),
    ("delete a dataset whose lock file has no write permission", lambda: store.delete("y")),
], mmstore.ReadOnlyError)
store.put("z", np.arange(3))  # what the file system allows still works
assert store.get("z").tolist() == [0, 1, 2]
assert store.get("g/x").tolist() == [0, 1, 2] and store.get("y").tolist() == [0, 1]
print("OK")
"""
)


def test_a_write_the_file_system_refuses_is_a_read_only_error() -> None:
    """A store opened for writing in which some files or groups are not writable (another
    user's, say): each write there is a ReadOnlyError (an MmstoreError and a
    PermissionError) naming what was refused, and the committed values stay as they were."""
    top = Path(tempfile.mkdtemp(prefix="mmstore-unwritable-"))
    try:
        top.chmod(0o755)
        path = top / "store"
        with mmstore.Store(path, permissions=0o644) as store:
            store.put("g/x", np.arange(3))
            store.put("y", np.arange(2))
        path.chmod(0o777)  # the root is writable (the store opens for writing) ...
        (path / "g").chmod(0o555)  # ... but not this group
        (path / ".y.lock").chmod(0o444)  # ... nor this lock file
        before = store_files(path)
        done = subprocess.run(
            [sys.executable, "-c", UNWRITABLE_CHECK, str(path)],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        assert lines[-1] == "OK", done.stdout
        assert len(lines) == 5, done.stdout
        for line in lines[:-1]:
            assert "-> ReadOnlyError:" in line, line
        assert "g/" in lines[0] and "g/" in lines[1]
        assert ".y.lock" in lines[2] and ".y.lock" in lines[3]
        after = store_files(path)
        assert set(before) <= set(after)  # nothing removed; added: only z's files (no refused write's)
        assert {name for name in after if name not in before if not name.startswith("z.")} == {".z.lock"}
        assert "z.json" in after
    finally:
        for directory, _dirs, _files in os.walk(top):
            os.chmod(directory, 0o755)
        shutil.rmtree(top)


def test_creating_a_store_on_a_read_only_file_system_is_a_read_only_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only_fs(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(mmstore._durable, "make_directories", read_only_fs)
    with pytest.raises(mmstore.ReadOnlyError, match="cannot create store"):
        mmstore.Store(tmp_path / "new")
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(mmstore._durable, "create_new", read_only_fs)
    for mode in ("a", "w-"):
        with pytest.raises(mmstore.ReadOnlyError, match="cannot create store"):
            mmstore.Store(tmp_path / "empty", mode)
    assert list((tmp_path / "empty").iterdir()) == []


READ_ONLY_MOUNT_CHECK = """
import sys, numpy as np, mmstore
path = sys.argv[1]
with mmstore.Store(path, "r") as store:
    assert store.keys() == ["g/x", "ticks", "y"], store.keys()
    assert store.get("g/x").sum() == 45 and store.get("g/x").sum() == 45  # first and cached read
    assert store.get("ticks").tolist() == [0, 1, 2, 3]
    with store.open_reader("ticks") as reader:
        assert reader.array.tolist() == [0, 1, 2, 3]
    assert store.info("y")["shape"] == (3,) and store.attrs("y") == {"k": 1}
    assert not store.verify().problems
    store.flush()
for mode in ("r+", "a"):
    try:
        mmstore.Store(path, mode)
    except mmstore.ReadOnlyError as exc:
        print(mode, "ReadOnlyError")
try:
    mmstore.Store(path + "/../new-store", "a")
except mmstore.ReadOnlyError as exc:
    print("new ReadOnlyError")
except OSError as exc:
    print("new", type(exc).__name__, exc)
print("OK")
"""


def _read_only_bind_mount_works() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt"], capture_output=True, timeout=PROCESS_TIMEOUT
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_bind_mount_works(), reason="needs root and mount namespaces (unshare -m)")
def test_a_store_on_a_read_only_mount_reads_and_refuses_writers(tmp_path: Path) -> None:
    """DESIGN invariant 5: a read-only store on a read-only mount works (EROFS, not EACCES:
    root is refused there too)."""
    source, mount = tmp_path / "source", tmp_path / "mount"
    mount.mkdir()
    with mmstore.Store(source / "store") as store:
        store.put("g/x", np.arange(10))
        store.put("y", np.arange(3), attrs={"k": 1})
        with store.create("ticks", "<i4", (0,), growable=True) as writer:
            writer.append(np.arange(4, dtype="<i4"))
    before = store_files(source)
    # sh's $0 is the argument after its command: the Python check.
    command = f'mount --bind -o ro "{source}" "{mount}" && exec "{sys.executable}" -c "$0" "{mount}/store"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", command, READ_ONLY_MOUNT_CHECK],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["r+ ReadOnlyError", "a ReadOnlyError", "new ReadOnlyError", "OK"]
    assert store_files(source) == before


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a" * 1025, "longer than 1024 characters"),
        ("a/" * 50_000 + "b", "longer than 1024 characters"),
        ("g/" + "x" * 201, "longer than 200 bytes"),
        ("\U0001f600" * 51, "longer than 200 bytes"),
    ],
    ids=["1025-characters", "100k-characters", "long-part", "long-part-in-bytes"],
)
def test_an_over_long_name_gives_a_short_one_line_error(store: mmstore.Store, name: str, problem: str) -> None:
    for call in (lambda: store.put(name, np.zeros(1)), lambda: store.get(name), lambda: store.delete(name)):
        with pytest.raises(mmstore.InvalidNameError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and problem in message
        assert len(message) < 300, f"{len(message)}-character message"
        assert repr(name[:20])[:-1] in message  # still shows which name
    assert name not in store and store.keys() == []


# --- delete -------------------------------------------------------------------------------


def _tree(root: Path) -> list[str]:
    """Every file and directory under ``root``, relative to it, sorted."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_deleting_a_missing_dataset_is_a_key_error_that_changes_nothing(store: mmstore.Store, store_path: Path) -> None:
    store.put("g/x", np.arange(3))
    store.delete("g/x")
    before = _tree(store_path)
    for name in ("nope", "g/nope", "new/group/nope", "g/x"):
        with pytest.raises(mmstore.DatasetNotFoundError) as info:
            store.delete(name)
        assert isinstance(info.value, KeyError) and repr(name) in str(info.value)
        with pytest.raises(KeyError):
            del store[name]
    assert _tree(store_path) == before  # no lock file, no group directory made for nothing
    store.put("new/group/nope", np.arange(2))  # and the names stay usable
    del store["new/group/nope"]
    assert "new/group/nope" not in store and store.keys() == []


# --- reads refused by the file system ----------------------------------------------------

UNREADABLE_CHECK = (
    AS_ANOTHER_USER
    + """
path = sys.argv[1]
report([("open", lambda: mmstore.Store(path + "/locked-out", "r"))], mmstore.AccessDeniedError)
store = mmstore.Store(path + "/store", "r")
report([
    ("get of an unreadable sidecar", lambda: store.get("a")),
    ("info of an unreadable sidecar", lambda: store.info("a")),
    ("get through an unsearchable group", lambda: store.get("g/b")),
    ("get of an unreadable data file", lambda: store.get("c")),
    ("listing with an unreadable group", lambda: list(store)),
], mmstore.AccessDeniedError)
assert store.get("ok").tolist() == [0, 1, 2]  # what may be read still reads
writable = mmstore.Store(path + "/store", "a")  # (its root is writable; group g is not searchable)
report([("delete through an unsearchable group", lambda: writable.delete("g/b"))], mmstore.AccessDeniedError)
print("OK")
"""
)


def test_a_read_the_file_system_refuses_is_an_access_denied_error() -> None:
    """Files or groups this process may not read (another user's): each read is an
    AccessDeniedError (an MmstoreError and a PermissionError) naming the dataset or the
    store, never a bare OSError naming a file relative to some directory; the readable
    datasets beside them read as usual."""
    top = Path(tempfile.mkdtemp(prefix="mmstore-unreadable-"))
    try:
        top.chmod(0o755)
        with mmstore.Store(top / "store", permissions=0o644) as store:
            for name in ("a", "g/b", "c", "ok"):
                store.put(name, np.arange(3))
            data_file = Path(store.info("c")["data_file"])
        mmstore.Store(top / "locked-out").close()
        (top / "locked-out" / "mmstore.json").chmod(0o600)
        (top / "store").chmod(0o777)
        (top / "store" / "a.json").chmod(0o600)
        (top / "store" / "g").chmod(0o700)
        data_file.chmod(0o600)
        done = subprocess.run(
            [sys.executable, "-c", UNREADABLE_CHECK, str(top)], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        assert lines[-1] == "OK" and len(lines) == 8, done.stdout
        assert "-> AccessDeniedError:" in lines[-2] and "'g/b'" in lines[-2], lines[-2]  # (not a KeyError)
        assert lines[0].startswith("open -> AccessDeniedError:") and "locked-out" in lines[0]
        for line, named in zip(lines[1:-2], ["'a'", "'a'", "'g/b'", "'c'", "g"], strict=True):
            assert "-> AccessDeniedError:" in line and named in line.partition("AccessDeniedError:")[2], line
    finally:
        for directory, _dirs, _files in os.walk(top):
            os.chmod(directory, 0o755)
        shutil.rmtree(top)


def _open_new_store_at_once(path: str, barrier: object, index: int, results: object) -> None:
    import mmstore as fresh

    barrier.wait()  # type: ignore[attr-defined]
    try:
        with fresh.Store(path, "a") as opened:
            opened.put(f"group/part{index}", np.full(4, index))
        results.put(None)  # type: ignore[attr-defined]
    except Exception as exc:  # (reported to the parent, which asserts there is none)
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_creating_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    """Mode "a" on a path that is not a store yet, from 4 processes at the same instant:
    one saw the manifest appear between its checks (StoreExistsError in mode "a") or saw
    another's first dataset before the manifest check ("a non-empty directory without
    mmstore.json"), in about 1 trial of 25."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # (children import nothing new: a fork is quick)
    for trial in range(60):
        path = str(tmp_path / f"store{trial}")
        barrier, results = context.Barrier(4), context.Queue()
        children = [context.Process(target=_open_new_store_at_once, args=(path, barrier, i, results)) for i in range(4)]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=PROCESS_TIMEOUT) for _ in children]
        for child in children:
            child.join(PROCESS_TIMEOUT)
        assert outcomes == [None] * 4, f"trial {trial}: {outcomes}"
        with mmstore.Store(path, "r") as store:
            assert sorted(store) == [f"group/part{i}" for i in range(4)]


def test_a_sidecar_integer_beyond_a_doubles_range_is_a_format_error(store: mmstore.Store, store_path: Path) -> None:
    """FORMAT.md: sidecars hold no number beyond a double's range (a C or JavaScript reader
    would read it as infinity). put() refuses such attrs; a sidecar that holds one anyway
    (written by hand) is a FormatError for its dataset only, as 1e400 already was."""
    with pytest.raises(mmstore.InvalidArgumentError, match="beyond a double's range"):
        store.put("x", np.zeros(1), attrs={"n": -(10**309)})
    assert "x" not in store
    store.put("x", np.zeros(1), attrs={"n": 2**1023})  # (within range: kept exactly)
    assert store.attrs("x") == {"n": 2**1023}
    store.put("y", np.ones(1))
    sidecar = store_path / "x.json"
    sidecar.write_text(sidecar.read_text().replace(str(2**1023), "1" + "0" * 400))
    with mmstore.Store(store_path, "r") as reader:
        with pytest.raises(mmstore.FormatError, match="'x'"):
            reader.get("x")
        assert reader.get("y").tolist() == [1.0]
