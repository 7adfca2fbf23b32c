from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import mmstore

# Generous: CI runs on a busy 2-core machine. Tests wait on events, never on sleeps.
PROCESS_TIMEOUT = 120.0


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[mmstore.Store]:
    with mmstore.Store(store_path) as opened:
        yield opened


@pytest.fixture
def spawn() -> multiprocessing.context.SpawnContext:
    """Fresh interpreters for child processes: nothing inherited but what we pass."""
    return multiprocessing.get_context("spawn")


def store_files(root: Path) -> list[str]:
    """Every file in the store, relative to its root, sorted."""
    found = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)
