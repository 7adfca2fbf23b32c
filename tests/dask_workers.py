"""Child-process bodies for tests/test_dask.py (importable by spawned interpreters)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

import mmstore


def pickle_pinned_array(path: str, name: str, out: str) -> None:
    """Build a dask array of ``name`` in this process, save it pickled, and exit (dropping the pin)."""
    from mmstore.dask import to_dask

    with open(out, "wb") as file:
        pickle.dump(to_dask(path, name, chunks=64), file)


def from_dask_until_killed(path: str, name: str, started: Any, release: Any) -> None:
    """from_dask whose second block waits for ``release`` (never set): the parent kills us meanwhile."""
    import dask.array as da

    from mmstore.dask import from_dask

    def block(part: np.ndarray, block_info: Any = None) -> np.ndarray:
        if block_info[0]["chunk-location"][0] == 1:
            started.set()
            release.wait(600)
        return part + 1

    darr = da.zeros((4096, 16), dtype="f8", chunks=(1024, 16)).map_blocks(block, dtype="f8")
    with mmstore.Store(path) as store:
        from_dask(darr, store, name, scheduler="threads")
