"""How the cache lays out a value: one array entry, a JSON scalar in an empty entry's
attrs, or an empty marker entry whose attrs list a tuple/list/dict result's items and
the parts (arrays, written before the marker) they are made of.

The parts of one value live in a directory of their own, ``p/<h2>/<h>/<token>``. From
before its first part until its marker is committed (or its parts are deleted again),
the set writing them holds the liveness lock (``_locks.mark_alive``, a flock the kernel
drops when the process dies) on the directory's ``.writing`` file. So a sweep can tell
the parts of a set in flight, which it must leave alone, from those of a set killed
before its commit or of an entry whose deleter was killed before deleting them, which
nothing else would ever delete (see ``_sweep_part_sets``). Whoever deletes parts, or lets
go of a directory whose parts are gone, then removes what is left of the directory (the
parts' lock files, a dead set's ``.writing``), and the key's directory ``p/<h2>/<h>``
once it holds no part directory: see ``_remove_part_directory``.
"""

from __future__ import annotations

import errno
import math
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _durable, _mapping, _names
from ._errors import ArgumentTypeError, DatasetNotFoundError, FormatError, MmstoreError
from ._locks import hold_new_file, remove_if_writer_gone

if TYPE_CHECKING:
    from ._store import Store

_SCALAR_KINDS = (bool, int, float, str, type(None))
_WRITING = ".writing"  # a part directory's liveness file (not a dataset name: it starts with ".")
_HEX = re.compile(r"[0-9a-f]+")
_PART_SIDECAR = re.compile(r"([0-9]+)\.json")
_PART_LOCK = re.compile(r"\.[0-9]+\.lock")  # a part's writer lock file (see _names.lock_file_name)
_PART_BASE = re.compile(r"p/[0-9a-f]+/[0-9a-f]+/[0-9a-f]+")
# The part directory itself is opened without following a symlink planted in its place.
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _fresh(value: Any) -> Any:
    """A value to hand out: new views and containers, so no caller can disturb another's."""
    if isinstance(value, np.ndarray):
        return value[...]
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _split(value: Any) -> tuple[str, list[np.ndarray], dict[str, Any]]:
    """(kind, arrays, extra attrs) of a value to cache."""
    _mapping.refuse_masked(value)
    if isinstance(value, np.ndarray):
        return "array", [value], {}
    if isinstance(value, np.generic):
        return "scalar", [np.asarray(value)], {}
    if isinstance(value, float) and not math.isfinite(value):
        return "float", [np.asarray(value, np.float64)], {}  # (strict JSON has no NaN or infinity)
    if isinstance(value, _SCALAR_KINDS):
        return "json", [], {"value": value}
    if isinstance(value, (tuple, list)):
        arrays, items = _split_items(value)
        return ("tuple" if isinstance(value, tuple) else "list"), arrays, {"items": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        arrays, items = _split_items(value.values())
        return "dict", arrays, {"keys": list(value), "items": items}
    raise ArgumentTypeError(
        f"cannot cache a {type(value).__qualname__}: use an array, a scalar, or a tuple/list/dict (str keys) of them"
    )


def _split_items(values: Any) -> tuple[list[np.ndarray], list[Any]]:
    """(parts, items) of a tuple/list/dict result's values. An item is "a" (an array part),
    "n" (a NumPy scalar, a 0-d part), "f" (a Python float JSON cannot hold, a 0-d part) or
    [value] (a Python bool, int, float, str or None, kept in the attrs): each comes back
    as the type it went in as."""
    parts: list[np.ndarray] = []
    items: list[Any] = []
    for item in values:
        if isinstance(item, np.ndarray):
            parts.append(item)
            items.append("a")
        elif isinstance(item, np.generic):
            parts.append(np.asarray(item))
            items.append("n")
        elif isinstance(item, float) and not math.isfinite(item):
            parts.append(np.asarray(item, np.float64))
            items.append("f")
        elif item is None or isinstance(item, (bool, str)):
            items.append([item if item is None or type(item) in (bool, str) else str(item)])
        elif isinstance(item, int):
            items.append([int(item)])
        elif isinstance(item, float):
            items.append([float(item)])
        else:
            raise ArgumentTypeError(
                f"cannot cache a {type(item).__qualname__} inside a result: use arrays, numbers, str or None"
            )
    return parts, items


def _items_of(items: list[Any], parts: list[Any]) -> list[Any]:
    """The values of a tuple/list/dict result from its items and parts (see _split_items)."""
    values: list[Any] = []
    next_part = iter(parts).__next__
    for item in items:
        if isinstance(item, list):
            values.append(item[0])
        elif item == "a":
            values.append(next_part())
        elif item == "n":
            values.append(next_part()[()])
        elif item == "f":
            values.append(float(next_part()[()]))
        else:
            raise FormatError(f"cache entry with an item of unknown kind {item!r}")
    return values


def _hold_part_directory(root: str, entry: str, permissions: int | None) -> tuple[str, int]:
    """(base, descriptor) of a new part directory ``p/<h2>/<h>/<token>`` for entry
    ``e/<h2>/<h>``: the descriptor holds the liveness lock of its ``.writing`` file until
    ``_let_go_of_part_directory``. A sweep may probe that file between its creation and our
    lock, and then remove it: we start over under a new token (as the HDF5 export does
    with its temp file). A sweep may also remove the new directory while it is still
    empty (``_remove_part_directory``), and a remover of the key's last other part
    directory the key's directory ``<h>`` between our mkdir of it and of ``<token>``
    (``_remove_key_directory``): the mkdir or the file's creation then fails with
    ENOENT, and we start over likewise."""
    for _attempt in range(100):
        base = f"p/{entry[2:]}/{_names.new_token()}"
        path = os.path.join(root, base, _WRITING)
        try:
            fd = _durable.create_new(path, permissions)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _durable.io_error(exc, f"cache {root!r}: creating a part directory") from None
        if hold_new_file(path, fd):
            return base, fd
    raise MmstoreError(f"cache {root!r}: could not hold a part directory")


def _let_go_of_part_directory(root: str, base: str, fd: int) -> None:
    """Drop the liveness file of a part directory whose marker is committed or whose parts
    are deleted: unlinked while still locked, so no sweep ever finds it unlocked. Then
    remove the directory if its parts are gone (deleted by our failed set, or by a
    replace, delete or eviction that came between our commit and now, and left the
    directory to us as we still held it)."""
    try:
        _durable.unlink_quietly(os.path.join(root, base, _WRITING))
    finally:
        os.close(fd)
    _remove_part_directory(root, base)


def _delete_parts(store: Store, parts: Any) -> None:
    """Delete a value's parts (one already gone is skipped: a concurrent deleter or sweep got
    there first), then what is left of their directories.

    A part whose directory is gone is gone too (a part directory is removed only once its
    parts are, and its token is never reused): it is skipped without a delete, which would
    take the part's lock and so recreate the directory, and with it the key's directory,
    which another deleter may be removing at that instant (the lock's creation then fails
    with ENOENT: also taken for "gone" once the directory is seen missing)."""
    bases: list[str] = []
    for part in parts:
        base = str(part).rpartition("/")[0]
        if base not in bases:
            bases.append(base)
        directory = os.path.join(store.path, base)
        if not os.path.lexists(directory):
            continue
        try:
            store.delete(part)
        except DatasetNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT or os.path.lexists(directory):
                raise
    for base in bases:
        _remove_part_directory(store.path, base)


def _remove_part_directory(root: str, base: str) -> bool:
    """Remove part directory ``base`` once its parts are gone: the parts' lock files, a
    dead set's ``.writing``, then the directory. True if it is gone. Best effort: a
    directory still in use, or holding a file that is not ours, stays (a later sweep
    looks again), and errors are not raised (the user's operation has succeeded).

    Who calls this: each deleter of parts after its deletes (delete, replace, eviction,
    clear, a failed set, a sweep), found or not, and each set after letting go. The last
    of these to act lists the directory after every deletion and the liveness unlink, so
    it finds the directory empty of parts and removes it. Races:

    * Two deleters (or a sweep and a deleter) of the same parts: the second finds a part
      gone (DatasetNotFoundError, skipped) or the directory gone. Its delete may recreate
      the directory and a lock file (taking a part's lock creates them); its own call
      here, which follows, removes them again. Both may unlink the same files and rmdir
      the same directory: missing files and a failed rmdir are not errors.
    * A data file still there: a delete unlinks the sidecar under the part's lock and the
      data file after it; we leave the directory to that deleter's own call. (A killed
      put's data or temp file stays until the store's recovery at the next open removes
      it; the sweep that follows removes the directory.)
    * A set in flight: it holds ``.writing`` from before its first part until its commit
      (or its parts' deletion), so we leave a directory whose ``.writing`` is locked. The
      file is probed by path after the listing: a lock file we list was made after it,
      so if the probe finds no ``.writing``, the set that made the files has let go and no
      part will ever be written here again (the token is never reused). A brand-new
      directory we list empty may get its ``.writing`` just after our probe: rmdir then
      fails (not empty), or succeeds first and the set starts over under a new token.
      The key's ``<h>`` directory goes with its last part directory
      (``_remove_key_directory``, which says how a set creating a directory in it at
      that instant starts over); ``<h2>`` stays.
    * A reader that maps a part keeps a valid array: unlinking never invalidates a map.
    * A Store that keeps a part's lock file open (a parked lock, a reader's change
      counter): the inode outlives its name. Nothing can be served or written wrong
      through it. Lock files go only when no sidecar is left, and none can come back (part
      names are never reused); so the delete that removed a sidecar bumped the counter
      of the lock file any reader had opened while it existed, and a reader that opens
      its counter later finds no lock file, or a new one, and stats the (missing)
      sidecar. A writer or deleter taking the lock through an orphaned descriptor sees
      that the path no longer names it (``DatasetLock._still_named``) and reopens it,
      then finds no sidecar.
    """
    if not _PART_BASE.fullmatch(base):
        return False  # (parts are named in an entry's attrs: remove only what has this shape)
    path = os.path.join(root, base)
    try:
        fd = os.open(path, _DIRECTORY_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        locks = []
        for name in os.listdir(fd):
            if _PART_LOCK.fullmatch(name):
                locks.append(name)
            elif name != _WRITING:
                return False  # a part (or its data file, about to go) is left, or a file not ours
        writing = os.path.join(path, _WRITING)
        if os.path.lexists(writing) and not remove_if_writer_gone(writing) and os.path.lexists(writing):
            return False  # a live set holds it (it removes the directory when it lets go)
        for name in locks:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
        os.rmdir(path)
    except FileNotFoundError:
        pass  # (another caller removed it first)
    except OSError:
        return False  # not empty (a file arrived: its maker calls us again), or not ours to remove
    finally:
        os.close(fd)
    _remove_key_directory(os.path.dirname(path))
    return True


def _remove_key_directory(path: str) -> None:
    """Remove a key's directory ``p/<h2>/<h>`` if it is empty: without it, every key ever
    stored with parts would leave one for good. Its last part directory's remover calls
    this (and a sweep, for one found empty). Not empty (another set of the key holds a
    part directory in it) or already gone: left as it is.

    A set creating its part directory here at this instant (``_hold_part_directory``) may
    have made ``<h>`` and not yet ``<token>``: the rmdir can then win, its mkdir of
    ``<token>`` fails with ENOENT, and it starts over under a new token, making ``<h>``
    again. ``<h2>`` (at most 256 of them) stays."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def _sweep_part_sets(store: Store, thorough: bool = True) -> int:
    """Delete the parts that no entry names and no live set is writing: those of a set
    killed before its commit, or of an entry whose deleter was killed before deleting
    them, which nothing else would ever delete; and what is left of directories whose
    parts are gone (``_remove_part_directory``). Returns how many values' parts went.
    Not ``thorough``: only the parts of directories whose ``.writing`` a killed set left
    (the others' entries are not read, which is most of the cost).

    No cache lock is needed: only the set that holds a part directory's liveness lock
    commits a marker naming its parts, and it lets go only after that commit. So once the
    lock is free (or the file gone), an entry that does not name the parts now never will.
    """
    swept = 0
    for h2 in _subdirectories(os.path.join(store.path, "p")):
        for h in _subdirectories(h2.path):
            tokens = _subdirectories(h.path)
            if not tokens:
                _remove_key_directory(h.path)  # (left by an older version, or by a killed remover)
            for token in tokens:
                try:
                    files = os.listdir(token.path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                base = f"p/{h2.name}/{h.name}/{token.name}"
                parts = [f"{base}/{match[1]}" for match in map(_PART_SIDECAR.fullmatch, files) if match]
                # Listed before the probe: a directory listed before its set made .writing had
                # no parts yet; parts written after the listing are found next time.
                if _WRITING in files:
                    if not remove_if_writer_gone(os.path.join(token.path, _WRITING)):
                        continue  # a live set is writing them (or has just let go: see next time)
                elif parts and not thorough:
                    continue
                if parts and _names_part_set(store, f"e/{h2.name}/{h.name}", base):
                    continue
                if parts:
                    _delete_parts(store, parts)  # (then the directory)
                    swept += 1
                else:
                    _remove_part_directory(store.path, base)  # lock files, perhaps a dead set's .writing
    return swept


def _names_part_set(store: Store, entry: str, base: str) -> bool:
    """True if ``entry`` names the parts under ``base``, or cannot be read (its parts are
    kept with it: ``recover()`` quarantines it)."""
    try:
        attrs = store.header(entry).attrs
    except DatasetNotFoundError:
        return False
    except (MmstoreError, OSError):
        return True
    return any(str(part).startswith(base + "/") for part in attrs.get("parts", ()))


def _subdirectories(path: str) -> list[os.DirEntry[str]]:
    """The hex-named subdirectories of ``path`` (a part directory's levels), not symlinks."""
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if _HEX.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
