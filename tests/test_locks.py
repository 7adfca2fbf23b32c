"""Writer-lock stress: many processes, many acquisitions, overlap detected independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT


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
    overlaps = [results.get(timeout=PROCESS_TIMEOUT) for _ in children]
    for child in children:
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
    total = processes * rounds
    assert overlaps == [0] * processes  # way 1: the exclusive marker never found taken
    assert (store_path / "counter.txt").read_text() == str(total)  # way 2: no lost update
    with mmstore.Store(store_path, "r") as store:
        assert store.get("x")[0] == total  # and the in-place edits through writer handles
