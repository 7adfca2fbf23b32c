"""Crash recovery: what a dead writer can leave behind, and how it is cleaned.

A writer killed at any instant leaves at most:

* a data file of a generation that was never committed (killed before the
  sidecar swap), or of the generation it just replaced (killed before the
  unlink) -- both are *unreferenced*: no sidecar names them;
* a hidden temp sidecar (killed before the swap, or after an exchange and
  before the unlink of the old sidecar).

Recovery removes an unreferenced data file only while holding the dataset's
writer lock and only if nobody holds the file's liveness lock (its writer is
dead; see ``mark_alive``). A put that is still writing holds that lock, and a
put that has committed has made the file referenced, so neither can lose a
file. A dataset whose sidecar exists but cannot be parsed is left alone here;
``Store.recover`` quarantines it.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from . import _durable, _names
from ._errors import FormatError, MmstoreError
from ._format import MANIFEST_NAME, parse_header
from ._locks import writer_is_gone

if TYPE_CHECKING:
    from ._store import Store

# A manifest temp file is only written while a store is being created; one
# older than this is a leftover of a creator that died.
_MANIFEST_TEMP_GRACE_SECONDS = 60.0


def recover_on_open(store: Store) -> int:
    """Remove the leftovers of dead writers; return how many files were removed."""
    removed = 0
    for directory, _dirs, files in _walk(store.path):
        removed += _recover_directory(store, directory, files)
    return removed


def _walk(root: str) -> list[tuple[str, list[str], list[str]]]:
    found = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        dirs, files = [], []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith("."):
                    dirs.append(entry.name)
                    pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
        found.append((directory, dirs, files))
    return found


def _recover_directory(store: Store, directory: str, files: list[str]) -> int:
    data_files: dict[str, list[str]] = defaultdict(list)
    temp_files: dict[str, list[str]] = defaultdict(list)
    sidecars = set()
    for file_name in files:
        if (match := _names.DATA_FILE_RE.match(file_name)) is not None:
            data_files[match["leaf"]].append(file_name)
        elif (match := _names.TEMP_FILE_RE.match(file_name)) is not None:
            temp_files[match["leaf"]].append(file_name)
        elif file_name.endswith(".json") and not file_name.startswith("."):
            sidecars.add(file_name[:-5])
    removed = 0
    prefix = "" if directory == store.path else directory[len(store.path) + 1 :] + "/"
    if not prefix:
        removed += _remove_stale_manifest_temps(directory, temp_files.pop("mmstore", []))
    for leaf in sorted(set(data_files) | set(temp_files)):
        if leaf in sidecars and not data_files[leaf] and not temp_files[leaf]:
            continue
        name = prefix + leaf
        try:
            _names.validate_name(name)
        except MmstoreError:
            continue  # not a file of ours
        removed += _recover_dataset(store, name, directory, leaf, data_files[leaf], temp_files[leaf])
    return removed


def _recover_dataset(
    store: Store, name: str, directory: str, leaf: str, data_files: list[str], temp_files: list[str]
) -> int:
    lock = store._lock(name)
    if not lock.try_acquire():
        return 0  # a live writer holds it; its leftovers (if any) wait for next time
    removed = 0
    try:
        referenced = _referenced_data_file(name, os.path.join(directory, leaf + ".json"))
        if referenced is _UNREADABLE:
            return 0
        for file_name in temp_files:
            # Temp sidecars only exist while their writer holds the lock we now hold.
            _durable.unlink_quietly(os.path.join(directory, file_name))
            removed += 1
        for file_name in data_files:
            path = os.path.join(directory, file_name)
            if file_name != referenced and writer_is_gone(path):
                _durable.unlink_quietly(path)
                removed += 1
    finally:
        lock.release()
    return removed


_UNREADABLE = object()


def _referenced_data_file(name: str, sidecar: str) -> object:
    try:
        fd = os.open(sidecar, _durable.READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError:
        return _UNREADABLE
    try:
        raw = b""
        while chunk := os.read(fd, 1 << 20):
            raw += chunk
        return parse_header(name, raw).data_file
    except (FormatError, OSError):
        return _UNREADABLE
    finally:
        os.close(fd)


def _remove_stale_manifest_temps(directory: str, temp_files: list[str]) -> int:
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return 0
    removed = 0
    now = time.time()
    for file_name in temp_files:
        path = os.path.join(directory, file_name)
        try:
            if now - os.lstat(path).st_mtime > _MANIFEST_TEMP_GRACE_SECONDS:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
