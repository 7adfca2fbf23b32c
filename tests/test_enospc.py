"""A really full file system: a 4 MiB tmpfs mounted for each test (tests/test_store.py and
tests/test_faults.py inject ENOSPC; these make the kernel say it). Needs root (or
CAP_SYS_ADMIN); skipped otherwise."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests.conftest import store_files as all_files

FS_BYTES = 4 * 2**20
MIB = 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 4 MiB tmpfs, unmounted afterwards."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8); injected ENOSPC tests cover the rest")
    point = tmp_path / "small"
    point.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0700", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): EPERM in a container?")
    try:
        yield point
    finally:
        # Lazy: arrays a test still holds keep mapping files of the file system.
        subprocess.run([umount, "-l", str(point)], check=True)


def store_files(root: Path) -> list[str]:
    """The store's files but lock files (never unlinked, by design: docs/FORMAT.md)."""
    return [path for path in all_files(root) if not path.endswith(".lock")]


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system with one file until fewer than ``leave`` bytes (+ a page) are free."""
    filler = path / "filler"
    with open(filler, "wb") as handle:
        for chunk in (MIB, 64 * 1024, 4096):
            while free_bytes(path) - chunk >= leave:
                try:
                    handle.write(b"\xff" * chunk)
                    handle.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    assert free_bytes(path) <= leave + 4096
    return filler


def random_array(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, nbytes // 8, dtype=np.int64)


def test_small_fs_is_really_small(small_fs: Path) -> None:
    assert FS_BYTES - 64 * 1024 <= free_bytes(small_fs) <= FS_BYTES
    with pytest.raises(OSError) as info:
        (small_fs / "huge").write_bytes(bytes(FS_BYTES + 4096))
    assert info.value.errno == errno.ENOSPC


def test_put_larger_than_the_free_space(small_fs: Path) -> None:
    store_path = small_fs / "store"
    keep, big = random_array(MIB, 1), random_array(3 * MIB + MIB // 2, 2)
    with mmstore.Store(store_path) as store:
        store.put("keep", keep, attrs={"v": 1}, durable=True)
        files = store_files(store_path)
        for name in ("big", "keep"):  # a new dataset, and a replacement of the committed one
            with pytest.raises(mmstore.StoreFullError) as info:
                store.put(name, big)
            assert info.value.errno == errno.ENOSPC and f"{name!r}" in str(info.value)
            assert store_files(store_path) == files, "no temp or half-written file left"
            assert store.get("keep").tobytes() == keep.tobytes()
            assert store.attrs("keep") == {"v": 1}
            assert "big" not in store
        assert store.verify().ok
        store.delete("keep")
        store.put("big", big)  # the space came back
        assert store.get("big").tobytes() == big.tobytes()
    with mmstore.Store(store_path, "r") as reader:
        assert reader.keys() == ["big"] and reader.verify().ok


def test_put_when_not_even_a_sidecar_fits(small_fs: Path) -> None:
    """Full to the last page: the empty data file fits, its sidecar does not."""
    store_path = small_fs / "store"
    keep = random_array(64 * 1024, 3)
    with mmstore.Store(store_path) as store:
        store.put("keep", keep)
        store.put("grp/other", np.arange(5))
        files = store_files(store_path)
        filler = fill(small_fs)
        for name, array in (("empty", np.zeros(0)), ("keep", np.arange(3)), ("grp/new", np.ones(2))):
            with pytest.raises(mmstore.StoreFullError) as info:
                store.put(name, array)
            assert f"{name!r}" in str(info.value)
            assert store_files(store_path) == files
        assert store.get("keep").tobytes() == keep.tobytes()
        assert store.get("grp/other").tolist() == list(range(5))
        filler.unlink()
        store.put("empty", np.zeros(0))
        assert store.get("empty").shape == (0,) and store.verify().ok


def test_growing_a_writer_past_the_free_space(small_fs: Path) -> None:
    store_path = small_fs / "store"
    row = 1024  # bytes: 128 int64 values
    rows = random_array(512 * row, 4).reshape(-1, 128)
    with mmstore.Store(store_path) as store:
        writer = store.create("log", "<i8", (0, 128), growable=True)
        writer.append(rows)
        writer.flush()
        capacity = writer._mapped.capacity
        size = os.path.getsize(store.info("log")["data_file"])
        filler = fill(small_fs)
        more = random_array((capacity - len(rows) + 1) * row, 5).reshape(-1, 128)
        with pytest.raises(mmstore.StoreFullError) as info:
            writer.append(more)  # needs the file to grow: posix_fallocate says ENOSPC
        assert "'log'" in str(info.value) and info.value.errno == errno.ENOSPC
        with pytest.raises(mmstore.StoreFullError):
            for index in range(capacity + 1 - len(rows)):  # the one-row hot path grows too
                writer.append(more[index])
        assert os.path.getsize(store.info("log")["data_file"]) == size, "a failed growth leaves the file as it was"
        writer.flush()  # still usable: publishes exactly the rows that were appended
        fitted = capacity - len(rows)
        with store.open_reader("log") as reader:
            assert len(reader) == capacity
            assert reader.array[: len(rows)].tobytes() == rows.tobytes()
            assert reader.array[len(rows) :].tobytes() == more[:fitted].tobytes()
        filler.unlink()
        writer.append(more[fitted:])
        writer.flush(durable=True)
        writer.close()
        expected = np.concatenate([rows, more[:fitted], more[fitted:]])
        assert store.get("log").tobytes() == expected.tobytes()
        assert store.verify().ok


def test_cache_set_that_overflows(small_fs: Path) -> None:
    cache_path = small_fs / "cache"
    small = random_array(256 * 1024, 6)
    with mmstore.Cache(cache_path, max_bytes=64 * MIB) as cache:
        cache.set("small", small)
        files = store_files(cache_path)
        with pytest.raises(mmstore.StoreFullError):
            cache.set("big", random_array(5 * MIB, 7))
        with pytest.raises(mmstore.StoreFullError):  # a tuple: the parts that fitted are removed again
            cache.set("pair", (random_array(MIB, 8), random_array(3 * MIB, 9)))
        assert store_files(cache_path) == files
        assert cache.get("big") is None and cache.get("pair") is None
        assert cache.get("small").tobytes() == small.tobytes()
        assert cache.stats()["bytes"] == small.nbytes
        pair = (random_array(MIB, 10), random_array(MIB, 11))
        cache.set("pair", pair)  # a value that fits still does
        got = cache.get("pair")
        assert [part.tobytes() for part in got] == [part.tobytes() for part in pair]


def test_export_to_a_full_file_system(small_fs: Path, tmp_path: Path) -> None:
    out_dir = small_fs / "out"
    out_dir.mkdir()
    with mmstore.Store(tmp_path / "store") as store:
        store.put("a", random_array(MIB, 12))
        store.put("b/c", random_array(4 * MIB, 13))
        with pytest.raises(mmstore.StoreFullError) as info:
            mmstore.export_hdf5(store, out_dir / "out.h5")
        assert isinstance(info.value, OSError) and "out.h5" in str(info.value)
        assert list(out_dir.iterdir()) == [], "no partial output and no temp file"
        assert free_bytes(small_fs) >= FS_BYTES - 64 * 1024
        assert mmstore.export_hdf5(store, out_dir / "out.h5", only="a") == ["a"]
        assert [path.name for path in out_dir.iterdir()] == ["out.h5"]
