"""Writer-lock stress: many processes, many acquisitions, overlap detected independently."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import mmstore
from mmstore._locks import mark_alive, names_file, remove_if_writer_gone
from tests import workers
from tests.conftest import collect_results


@pytest.mark.slow
def test_sixteen_processes_never_hold_a_writer_lock_together(store_path: Path, spawn) -> None:
    processes, rounds = 16, 25
    with mmstore.Store(store_path) as store:
        store.create("x", np.int64, (1,)).close()
    (store_path / "counter.txt").write_text("0")
    barrier, results = spawn.Barrier(processes), spawn.Queue()
    children = [
        spawn.Process(target=workers.lock_stress, args=(str(store_path), rounds, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    overlaps = collect_results(children, results)
    total = processes * rounds
    assert overlaps == [0] * processes  # way 1: the exclusive marker never found taken
    assert (store_path / "counter.txt").read_text() == str(total)  # way 2: no lost update
    with mmstore.Store(store_path, "r") as store:
        assert store.get("x")[0] == total  # and the in-place edits through writer handles


def test_remove_if_writer_gone_spares_live_writers_and_swapped_paths(tmp_path: Path) -> None:
    path = tmp_path / "file.tmp"
    path.write_bytes(b"x")
    for shared in (False, True):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert mark_alive(fd, shared=shared)
            assert not remove_if_writer_gone(str(path)) and path.exists()  # a live writer's file stays
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert names_file(str(path), fd)
        (tmp_path / "other").write_bytes(b"y")
        os.replace(tmp_path / "other", path)
        assert not names_file(str(path), fd)  # the path now names another file
    finally:
        os.close(fd)
    assert remove_if_writer_gone(str(path)) and not path.exists()  # nobody holds it: removed
    assert not remove_if_writer_gone(str(path))  # already gone
