"""mmstore: NumPy datasets shared zero-copy between processes through memory-mapped files.

The public API is what this module exports; every other module is private.
See README.md for a quickstart and docs/FORMAT.md for the on-disk format.
"""

from __future__ import annotations

from ._cache import Cache
from ._errors import (
    ClosedError,
    DatasetExistsError,
    DatasetNotFoundError,
    FormatError,
    FsyncError,
    InvalidNameError,
    LockTimeout,
    MmstoreError,
    ReadOnlyError,
    StoreExistsError,
    StoreFullError,
    StoreIOError,
    StoreNotFoundError,
    UnsupportedDtypeError,
)
from ._filesystems import UnsafeFileSystemWarning
from ._format import FORMAT_VERSION
from ._growable import Reader, Writer
from ._hdf5 import export_hdf5, import_hdf5
from ._recovery import VerifyReport
from ._store import Store

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "ClosedError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "FormatError",
    "FsyncError",
    "InvalidNameError",
    "LockTimeout",
    "MmstoreError",
    "ReadOnlyError",
    "Reader",
    "Store",
    "StoreExistsError",
    "StoreFullError",
    "StoreIOError",
    "StoreNotFoundError",
    "UnsafeFileSystemWarning",
    "UnsupportedDtypeError",
    "VerifyReport",
    "Writer",
    "__version__",
    "export_hdf5",
    "import_hdf5",
]
