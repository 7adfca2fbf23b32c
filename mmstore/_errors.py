"""The exception hierarchy.

Every error mmstore raises derives from :class:`MmstoreError` and also from the
built-in exception a caller would naturally catch (``KeyError`` for a missing
dataset, ``TimeoutError`` for a lock wait ...), so both ``except
mmstore.MmstoreError`` and ``except KeyError`` work. ``exit_code`` is what the
CLI exits with when the error reaches it.
"""

from __future__ import annotations

import errno


class MmstoreError(Exception):
    """Root of every error raised by mmstore."""

    exit_code = 1

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidNameError(MmstoreError, ValueError):
    """A dataset name that is empty, escapes the store or has forbidden characters."""


class InvalidArgumentError(MmstoreError, ValueError):
    """A bad argument value: attrs, a shape, rows that do not fit a dataset, an option."""


class ArgumentTypeError(MmstoreError, TypeError):
    """An argument of a type mmstore cannot use (a cache key, a result to cache ...)."""


class UnsupportedDtypeError(MmstoreError, ValueError):
    """A dtype mmstore cannot store as raw bytes (object dtypes and the like)."""


class DatasetNotFoundError(MmstoreError, KeyError):
    """The named dataset does not exist."""


class GenerationGoneError(MmstoreError, FileNotFoundError):
    """A pinned generation of a dataset (mmstore.dask) that was replaced and no longer exists."""


class DatasetExistsError(MmstoreError, FileExistsError):
    """The named dataset exists and the operation would not replace it."""


class StoreNotFoundError(MmstoreError, FileNotFoundError):
    """The store directory (or its manifest) does not exist."""


class StoreExistsError(MmstoreError, FileExistsError):
    """The store already exists and the mode asked to create it (``w-``)."""


class FormatError(MmstoreError, ValueError):
    """A header, manifest or data file that does not match the on-disk format."""


class ReadOnlyError(MmstoreError, PermissionError):
    """A write to a store opened read-only, or to a dataset through a reader."""


class AccessDeniedError(MmstoreError, PermissionError):
    """The file system refused to let this process read part of the store (a sidecar,
    data file, group directory or the manifest it has no read permission for)."""


def access_denied(name: str, what: str, path: str | None = None) -> AccessDeniedError:
    """The error for a read of dataset ``name``'s ``what`` (at ``path``) that the file system refused."""
    where = f" ({path})" if path else ""
    return AccessDeniedError(errno.EACCES, f"dataset {name!r}: permission denied reading {what}{where}")


class LockTimeout(MmstoreError, TimeoutError):
    """A writer lock that could not be acquired within the store's timeout."""


class StoreFullError(MmstoreError, OSError):
    """The file system ran out of space (or quota) while writing."""


class StoreIOError(MmstoreError, OSError):
    """An I/O error while writing or syncing; the previous committed state is intact."""


class FsyncError(StoreIOError):
    """fsync() failed: the kernel may have dropped dirty pages, so what was written
    cannot be trusted to be on disk. The handle that saw it refuses further commits."""


class ClosedError(MmstoreError, ValueError):
    """An operation on a store or handle that has been closed."""
