from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def collect_results(processes: list[Any], results: Any) -> list[Any]:
    """One result per started process from ``results`` (a queue), then each process joined
    and checked to have exited cleanly."""
    collected = [results.get(timeout=PROCESS_TIMEOUT) for _ in processes]
    for process in processes:
        process.join(PROCESS_TIMEOUT)
        assert process.exitcode == 0
    return collected


def run_in_fork(child: Callable[[], int]) -> int:
    """Run ``child`` in a forked process and return the code it returned (any exception: 1).

    The code also comes back through a pipe, so a child that dies before reporting is told
    apart from one that ran and failed (255).
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            code = child()
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(code)
    os.close(write_fd)
    reported = os.read(read_fd, 1)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == (reported[0] if reported else 255)
    return reported[0] if reported else 255
