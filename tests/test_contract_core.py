"""The store core against DESIGN.md's contract: modes, listings, error classes, read-only places.

Black-box checks that complement test_store.py and test_format.py: each one pins a
promise of the contract (docs/FORMAT.md, README "What you get") that those do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests.conftest import store_files

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
