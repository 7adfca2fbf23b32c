"""mmstore: NumPy datasets shared zero-copy between processes through memory-mapped files.

The public API is what this module exports; every other module is private.
See README.md for a quickstart and docs/FORMAT.md for the on-disk format.
"""

from __future__ import annotations

from ._cache import Cache
from ._errors import (
    AccessDeniedError,
    ArgumentTypeError,
    ClosedError,
    DatasetExistsError,
    DatasetNotFoundError,
    FormatError,
    FsyncError,
    GenerationGoneError,
    InvalidArgumentError,
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
from ._growable import Writer
from ._hdf5 import export_hdf5, import_hdf5
from ._reader import Reader
from ._recovery import VerifyReport
from ._store import Store

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # mmstore.dask needs the optional extra (pip install 'mmstore[dask]'): imported on first use only.
    if name == "dask":
        import importlib

        return importlib.import_module(".dask", __name__)
    raise AttributeError(f"module 'mmstore' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "ArgumentTypeError",
    "Cache",
    "ClosedError",
    "DatasetExistsError",
    "DatasetNotFoundError",
    "FormatError",
    "FsyncError",
    "GenerationGoneError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LockTimeout",
    "MmstoreError",
    "ReadOnlyError",
    "AccessDeniedError",
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
