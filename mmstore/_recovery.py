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

import errno
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _durable, _names
from ._errors import DatasetNotFoundError, FormatError, InvalidNameError, LockTimeout, MmstoreError, StoreIOError
from ._format import MANIFEST_NAME, parse_header
from ._locks import remove_if_writer_gone, writer_is_gone
from ._mapping import crc32_file, file_digest

if TYPE_CHECKING:
    from ._store import Store

# A manifest temp file is only written while a store is being created; one
# older than this is a leftover of a creator that died.
_MANIFEST_TEMP_GRACE_SECONDS = 60.0


def recover_on_open(store: Store) -> list[str]:
    """Remove the leftovers of dead writers; return the files removed (relative to the
    store's root, so that ``recover()`` can tell the user)."""
    removed: list[str] = []
    for directory, _dirs, files, _links in _walk(store.path):
        removed += _recover_directory(store, directory, files)
    return [os.path.relpath(path, store.path) for path in removed]


def _walk(root: str, unlistable: list[str] | None = None) -> list[tuple[str, list[str], list[str], list[str]]]:
    """(directory, subdirectories, regular files, others) for every real directory of the
    store; others are symlinks and special files (a symlinked directory is never entered).
    Directories this process may not list are skipped, and added to ``unlistable`` if given
    (verify reports them: skipping them silently would hide their datasets)."""
    found = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            if unlistable is not None:
                unlistable.append(directory)
            continue
        dirs, files, links = [], [], []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith("."):
                    dirs.append(entry.name)
                    pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
            elif not entry.name.startswith("."):
                links.append(entry.name)
        found.append((directory, dirs, files, links))
    return found


_LeafFiles = tuple[dict[str, list[str]], dict[str, list[str]], set[str]]


def _files_by_leaf(files: list[str]) -> _LeafFiles:
    """(data files, temp sidecars) of each leaf in ``files``, and the leaves with a sidecar."""
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
    return data_files, temp_files, sidecars


def _recovery_looks_at(leaf: str, grouped: _LeafFiles) -> bool:
    """Whether recovery at a writable open looks at ``leaf``. A committed dataset with its
    one data file and no temp sidecar is what a clean store holds: nothing to lock or read
    (this runs at every writable open). A dead writer leaves a second data file or a temp
    sidecar; a lone data file the sidecar does not name is a corrupt dataset, which
    verify/recover handle (verify_store relies on this rule)."""
    data_files, temp_files, sidecars = grouped
    return leaf not in sidecars or len(data_files.get(leaf, ())) > 1 or bool(temp_files.get(leaf))


def _recover_directory(store: Store, directory: str, files: list[str]) -> list[str]:
    grouped = _files_by_leaf(files)
    data_files, temp_files, _sidecars = grouped
    removed: list[str] = []
    prefix = "" if directory == store.path else directory[len(store.path) + 1 :] + "/"
    if not prefix:
        removed += _remove_stale_manifest_temps(directory, temp_files.pop("mmstore", []))
    for leaf in sorted(set(data_files) | set(temp_files)):
        if not _recovery_looks_at(leaf, grouped):
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
) -> list[str]:
    """The files of dataset ``name`` that dead writers left, removed: their paths."""
    lock = store._lock(name)
    if not lock.try_acquire():
        return []  # a live writer holds it; its leftovers (if any) wait for next time
    removed: list[str] = []
    try:
        referenced = _referenced_data_file(name, os.path.join(directory, leaf + ".json"))
        if referenced is _UNREADABLE:
            return []
        for file_name in temp_files:
            # Temp sidecars only exist while their writer holds the lock we now hold. A file
            # of the same shape with a live liveness lock is someone else's (an HDF5 export
            # written into the store's directory): keep it.
            if remove_if_writer_gone(os.path.join(directory, file_name)):
                removed.append(os.path.join(directory, file_name))
        for file_name in data_files:
            path = os.path.join(directory, file_name)
            if file_name != referenced and writer_is_gone(path):
                _durable.unlink_quietly(path)
                removed.append(path)
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


def _remove_stale_manifest_temps(directory: str, temp_files: list[str]) -> list[str]:
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return []
    removed: list[str] = []
    now = time.time()
    for file_name in temp_files:
        path = os.path.join(directory, file_name)
        try:
            if now - os.lstat(path).st_mtime > _MANIFEST_TEMP_GRACE_SECONDS:
                os.unlink(path)
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


# --- verify and recover -------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``Store.verify`` found (and ``Store.recover`` did). ``ok`` is True when every
    dataset is readable and every known checksum matches; leftovers of dead writers are
    listed but are not problems (the next writable open removes them). The files of a
    dataset whose sidecar cannot be read are not leftovers (recovery keeps them): its
    problem names them. A problem under a name ending in ``/`` is a group directory
    (a symlink, or one this process may not list), which recover() leaves alone.

    ``removed`` (recover() only) lists the leftovers that recovery removed, those of the
    writable open of the store handle included; ``quarantined`` maps each dataset moved
    to the quarantine to where it went."""

    checked: int = 0
    problems: dict[str, str] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unrepaired(self) -> list[str]:
        """Problems that recover() left where they are (not quarantined)."""
        return sorted(set(self.problems) - set(self.quarantined))

    def __str__(self) -> str:
        lines = [f"{self.checked} datasets checked, {len(self.problems)} with problems"]
        lines += [f"  {name}: {problem}" for name, problem in sorted(self.problems.items())]
        if self.leftovers:
            lines.append(
                f"{len(self.leftovers)} leftover files (removed by the next writable open unless their writer is "
                "still at work)"
            )
        if self.removed:
            lines.append(f"removed {len(self.removed)} leftover files of dead writers:")
            lines += [f"  removed {path}" for path in sorted(self.removed)]
        lines += [f"  quarantined {name} -> {where}" for name, where in sorted(self.quarantined.items())]
        return "\n".join(lines)


def verify_store(store: Store, progress: Callable[[str], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    unlistable: list[str] = []
    for directory, _dirs, files, links in _walk(store.path, unlistable):
        prefix = "" if directory == store.path else directory[len(store.path) + 1 :] + "/"
        referenced = set()
        unreadable: dict[str, str] = {}  # leaf -> name, for datasets whose sidecar could not be read
        for link in links:
            path = os.path.join(directory, link)
            if not link.endswith(".json") and os.path.islink(path) and os.path.isdir(path):
                # Never entered (it could lead out of the store); reported under the group's path.
                report.problems[prefix + link + "/"] = "group directory is a symlink; its datasets are not read"
        for file_name in sorted(files + [link for link in links if link.endswith(".json")]):
            if (
                not file_name.endswith(".json")
                or file_name.startswith(".")
                or (not prefix and file_name == MANIFEST_NAME)
            ):
                continue
            name = prefix + file_name[:-5]
            if progress is not None:
                progress(name)
            report.checked += 1
            header: Any = None
            gone = False
            for _attempt in range(100):  # only a dataset that keeps changing uses more than one
                previous, header = header, None
                try:
                    _names.validate_name(name)
                    store._drop_entry(name)  # read from disk: the cache trusts that sidecars change only by rename
                    header = store.header(name)
                    referenced.add(header.data_file)
                    problem = _check_data(store, name, header)
                except DatasetNotFoundError:
                    gone = True  # deleted since we listed it: nothing to report
                    problem = None
                except MmstoreError as exc:
                    problem = str(exc)
                except OSError as exc:
                    problem = f"cannot read: {exc.strerror or exc}"
                if problem is None or header is None or header == previous:
                    break
                # A commit or a writer may have changed the dataset between our reading its
                # sidecar and checking its data (a replaced data file is gone, an edited one
                # no longer matches): check it again, and report only what persists.
            if gone:
                continue
            if header is None:
                unreadable[file_name[:-5]] = name
            if problem is not None:
                report.problems[name] = problem
        kept: dict[str, list[str]] = defaultdict(list)
        grouped = _files_by_leaf(files)
        for file_name in sorted(files):
            match = _names.DATA_FILE_RE.match(file_name) or _names.TEMP_FILE_RE.match(file_name)
            leaf = None if match is None else match["leaf"]
            if leaf in unreadable:
                # Recovery leaves every file of a dataset whose sidecar it cannot read (it cannot
                # tell which data file is the committed one); recover() quarantines them together.
                kept[unreadable[leaf]].append(file_name)
            elif (
                leaf is not None
                and not _recovery_looks_at(leaf, grouped)
                and file_name not in referenced
                and prefix + leaf in report.problems
            ):
                # A lone data file the sidecar does not name (the one it names is missing): kept
                # with its broken dataset, which recover() quarantines with it.
                kept[prefix + leaf].append(file_name)
            elif _names.TEMP_FILE_RE.match(file_name) or (
                leaf is not None
                and _names.DATA_FILE_RE.match(file_name)
                and file_name not in referenced
                and _removed_at_open(prefix + leaf, os.path.join(directory, leaf + ".json"))
            ):
                report.leftovers.append(os.path.join(directory, file_name)[len(store.path) + 1 :])
        for name, file_names in kept.items():
            report.problems[name] += f" (its files are kept with it: {', '.join(file_names)})"
    for directory in unlistable:
        # Its datasets cannot even be listed: a verify that skipped them would call the store healthy.
        group = os.path.relpath(directory, store.path)
        report.problems["./" if group == "." else group + "/"] = (
            "permission denied listing this directory; its datasets are not checked"
        )
    return report


def _removed_at_open(name: str, sidecar: str) -> bool:
    """Whether a writable open removes an unreferenced data file of ``name`` (once its
    writer is gone): beside a sidecar, or alone if ``name`` is one a writer can use."""
    if os.path.exists(sidecar):
        return True
    if os.path.lexists(sidecar):
        return False  # a symlinked sidecar: a corrupt dataset, whose files recovery keeps
    try:
        _names.validate_name(name)
    except MmstoreError:
        return False  # not a file of ours: recovery leaves it
    return True


def _check_data(store: Store, name: str, header: Any) -> str | None:
    """None if the data file matches the header (and its checksum, where known)."""
    fd = store._open_data(store._locate(name), header)
    try:
        return _check_open_data(fd, header)
    finally:
        os.close(fd)


def _check_open_data(fd: int, header: Any) -> str | None:
    from ._maps import CONTROL_BYTES, _Mapped

    mapped = _Mapped(header, "", writable=False, fd=fd)
    if not header.growable:
        if header.checksum is None:
            return None
        algorithm = header.checksum.partition(":")[0]
        actual = file_digest(fd, header.offset, header.nbytes, algorithm)
        return None if actual == header.checksum else f"checksum mismatch: data {actual}, header {header.checksum}"
    size_before = -1
    checks = 0
    for _attempt in range(1000):  # a live writer may move the fields while we read them
        assert mapped.control is not None and mapped.control_u32 is not None
        length, crc_rows = int(mapped.control[1]), int(mapped.control[4])
        crc_known, crc_value = int(mapped.control_u32[7]), int(mapped.control_u32[6])
        if length > mapped.capacity:
            if mapped.size == size_before:  # a new map of the same, unchanged file: corrupt
                return f"committed length {length} exceeds the data file's {mapped.capacity} rows"
            # A live writer grew the file and flushed since we mapped it: map it again (as
            # Store._read does); a healthy growing dataset is no problem.
            size_before = mapped.size
            mapped = _Mapped(header, "", writable=False, fd=fd)
            continue
        checks += 1
        if not crc_known or crc_rows == 0 or crc_rows > length:
            # (More checksummed rows than committed: a writer killed inside a flush, between
            # storing the CRC and the length that covers it. The CRC is unknown, as
            # Writer.__init__ takes it; the committed rows are intact.)
            return None
        if crc32_file(fd, CONTROL_BYTES, crc_rows * mapped.row_bytes) == crc_value:
            return None
        if checks == 3:
            return f"checksum mismatch over the first {crc_rows} rows"
    return "its data file grew too often to read a consistent length"


def _still_a_problem(store: Store, name: str) -> bool:
    """Checked again under the dataset's lock: does ``name`` still exist, and still fail?"""
    try:
        store._drop_entry(name)
        header = store.header(name)
        return _check_data(store, name, header) is not None
    except DatasetNotFoundError:
        return False
    except (MmstoreError, OSError):
        return True


def recover_store(store: Store) -> VerifyReport:
    """Remove dead writers' leftovers, then quarantine (never delete) unreadable datasets."""
    # What this handle's writable open removed is reported too (the CLI's recover is such
    # an open), once: a second recover() that finds nothing to do says so.
    removed, store._removed_at_open = store._removed_at_open, []
    removed += recover_on_open(store)
    report = verify_store(store)
    report.removed = removed
    if not report.problems:
        return report
    quarantine = _QuarantineDirectory(store.path)
    touched: set[str] = set()  # directories files moved out of or into: synced at the end
    for name in sorted(report.problems):
        if name.endswith("/"):
            continue  # a symlinked or unlistable group directory: not ours to move
        try:
            location = store._locate(name)
        except InvalidNameError:
            # A sidecar planted under a name no writer can use (so no lock to take): move it alone.
            target = os.path.join(quarantine.path(), name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(store.path, name + ".json"), target + ".json")
            touched.update((os.path.dirname(os.path.join(store.path, name)), os.path.dirname(target)))
            report.quarantined[name] = os.path.relpath(target, store.path)
            continue
        try:
            location.lock.acquire(store.timeout)
        except LockTimeout:
            # A live writer holds it (one that keeps a writer handle open on a dataset whose
            # header broke): leave it, say so, and go on with the others.
            report.problems[name] += " (not quarantined: a live writer holds its lock; run recover again later)"
            continue
        try:
            if not _still_a_problem(store, name):
                del report.problems[name]  # deleted or replaced by a writer since it was checked
                continue
            target = os.path.join(quarantine.path(), name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            moved = []
            for file_name in sorted(os.listdir(location.directory)):
                match = _names.DATA_FILE_RE.match(file_name)
                # A put still writing its new data file (outside the lock we hold) keeps it:
                # it commits a sidecar naming it, in place. One created but not yet marked
                # alive (a few microseconds' window) may be moved: that put then finds, under
                # this lock, that its path names no file, and writes the array again.
                if (
                    match is not None
                    and match["leaf"] == location.leaf
                    and writer_is_gone(os.path.join(location.directory, file_name))
                ):
                    os.rename(
                        os.path.join(location.directory, file_name), os.path.join(os.path.dirname(target), file_name)
                    )
                    moved.append(file_name)
            # The sidecar goes last: until it moves, the dataset still "exists" for readers.
            os.rename(location.sidecar, target + ".json")
            touched.update((location.directory, os.path.dirname(target)))
            store._drop_entry(name)
            report.quarantined[name] = os.path.relpath(target, store.path)
        finally:
            location.lock.release()
    # The moves are durable once both ends' directory entries are: the group directories
    # the files left, and the quarantine directories (new, so their parents' entries too).
    chains = {store.path}
    for directory in touched:
        while directory.startswith(store.path + os.sep) and directory not in chains:
            chains.add(directory)
            directory = os.path.dirname(directory)
    for directory in sorted(chains, key=len, reverse=True):  # deepest first, each once
        try:
            _durable.fsync_dir(directory)
        except FileNotFoundError:
            if directory == store.path:
                raise  # (a group directory removed since: nothing in it to make durable)
    return report


class _QuarantineDirectory:
    """``.quarantine/<time>-<pid>[-n]``, made at its first use and never one that exists
    already: moving into an earlier recover()'s directory (same second, same process)
    would rename a dataset's sidecar over the one quarantined there, deleting it."""

    def __init__(self, root: str) -> None:
        self._parent = os.path.join(root, ".quarantine")
        self._path: str | None = None

    def path(self) -> str:
        if self._path is None:
            os.makedirs(self._parent, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
            for attempt in range(1000):
                candidate = os.path.join(self._parent, stamp if attempt == 0 else f"{stamp}-{attempt}")
                try:
                    os.mkdir(candidate)
                except FileExistsError:
                    continue
                self._path = candidate
                break
            else:
                raise StoreIOError(errno.EEXIST, f"cannot make a new quarantine directory in {self._parent!r}")
        return self._path
