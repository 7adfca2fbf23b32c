"""Zero-copy reads: get() of a 4 GiB dataset maps it; nothing reads the file behind the caller's back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT

GIB = 2**30


@pytest.mark.slow
def test_get_of_4gib_dataset_barely_raises_rss(store_path: Path, spawn) -> None:
    rows, columns = 4 * GIB // (4096 * 8), 4096  # 4 GiB of float64
    with mmstore.Store(store_path) as store:
        # A lazily zeroed source: put streams it in bounded chunks, so this test needs no 4 GiB of RAM.
        source = np.zeros((rows, columns))
        store.put("big", source)
        del source
    queue = spawn.Queue()
    reader = spawn.Process(target=workers.rss_after_get, args=(str(store_path), "big", queue))
    reader.start()
    before, after, total, shape, _elapsed = queue.get(timeout=PROCESS_TIMEOUT)
    reader.join(PROCESS_TIMEOUT)
    assert reader.exitcode == 0
    assert shape == (rows, columns)
    assert total == 0.0
    assert after - before < 8 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
