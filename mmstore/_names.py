"""Dataset names and the file names they map to.

A dataset name is a slash-separated path (``group/sub/name``), the same path it
gets in an HDF5 export. Inside the store directory it becomes::

    group/sub/name.json                 the sidecar header (the commit point)
    group/sub/name.<token>.dat          the data file of one generation
    group/sub/.name.lock                the writer lock (never unlinked)
    group/sub/.name.<token>.tmp         a sidecar being written, or the old one
                                        just swapped out by a commit

Names may not start a part with ``.``, so every hidden file is the store's own,
and group parts may not end in ``.json`` or ``.dat``, so a group directory can
never collide with a sidecar or a data file. docs/FORMAT.md has the full rules.
"""

from __future__ import annotations

import os
import random
import re
import unicodedata

from ._errors import InvalidNameError

MAX_NAME_LENGTH = 1024
# NAME_MAX is 255 bytes; a part gets at most ".<16 hex>.dat" or a leading "."
# plus ".<16 hex>.tmp" around it, so 200 bytes leaves room for both.
MAX_PART_BYTES = 200
RESERVED_TOP_LEVEL = frozenset({"mmstore"})  # "mmstore.json" is the manifest
TOKEN_HEX_DIGITS = 16

DATA_FILE_RE = re.compile(r"^(?P<leaf>.+)\.(?P<token>[0-9a-f]{16})\.dat\Z", re.DOTALL)
TEMP_FILE_RE = re.compile(r"^\.(?P<leaf>.+)\.(?P<token>[0-9a-f]{16})\.tmp\Z", re.DOTALL)
LOCK_FILE_RE = re.compile(r"^\.(?P<leaf>.+)\.lock\Z", re.DOTALL)

# Unicode categories that make a name render differently from what it is:
# controls, format characters (zero-width joiners, bidi overrides), surrogates,
# private use, unassigned, and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid dataset name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"dataset name must be a str, not {type(name).__name__}")
    problem = _name_problem(name)
    if problem is not None:
        raise InvalidNameError(f"invalid dataset name {_shown(name)}: {problem}")
    return name


_SHOWN_CHARACTERS = 64


def _shown(name: str) -> str:
    """The name as an error message shows it: its repr(), cut short (a 100,000-character
    name would otherwise make a 100,000-character message)."""
    if len(name) <= _SHOWN_CHARACTERS:
        return repr(name)
    return f"{name[:_SHOWN_CHARACTERS]!r}... ({len(name)} characters)"


# Printable ASCII without control characters: names made only of these skip the
# Unicode checks (unicodedata is slow to warm up in a fresh process).
_PLAIN_ASCII = re.compile(r"[\x20-\x7e]+")


# Names of ASCII letters, digits, "_", "-" and "." whose parts do not start with "." and
# whose groups do not end in .json or .dat, each part at most MAX_PART_BYTES long: valid by
# construction (bar length and the reserved name), so one match replaces the checks below.
_SIMPLE_PART = rf"[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{MAX_PART_BYTES - 1}}}"
_SIMPLE_NAME = re.compile(rf"(?:{_SIMPLE_PART}(?<!\.json)(?<!\.dat)/)*{_SIMPLE_PART}")


def _name_problem(name: str) -> str | None:
    if name.isascii() and name.isidentifier():  # one part of [A-Za-z0-9_]: cheaper than a match
        if len(name) <= MAX_PART_BYTES and name not in RESERVED_TOP_LEVEL:
            return None
    elif len(name) <= MAX_NAME_LENGTH and _SIMPLE_NAME.fullmatch(name) and name not in RESERVED_TOP_LEVEL:
        return None
    return _any_name_problem(name)


def _any_name_problem(name: str) -> str | None:
    """What is wrong with ``name``, checked rule by rule (for any name), or None."""
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if name.startswith("/"):
        return "it is absolute (starts with '/')"
    if not _PLAIN_ASCII.fullmatch(name):
        for char in name:
            if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
                return f"it contains the control or invisible character U+{ord(char):04X}"
        if unicodedata.normalize("NFC", name) != name:
            return "it is not in Unicode normal form NFC"
    parts = name.split("/")
    if name in RESERVED_TOP_LEVEL:
        return "the name is reserved for the store's manifest"
    for index, part in enumerate(parts):
        if not part:
            return "it has an empty part ('//' or a trailing '/')"
        if part in (".", ".."):
            return f"it has a {part!r} part"
        if part.startswith("."):
            return f"part {part!r} starts with '.', which is reserved for the store's own files"
        if part != part.strip():
            return f"part {part!r} starts or ends with whitespace"
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            return f"part {part[:20]!r}... is longer than {MAX_PART_BYTES} bytes"
        is_group = index < len(parts) - 1
        if is_group and part.endswith((".json", ".dat")):
            return f"group {part!r} ends in .json or .dat, which are reserved for dataset files"
    return None


def sidecar_path(root: str, name: str) -> str:
    return os.path.join(root, name + ".json")


def split_leaf(root: str, name: str) -> tuple[str, str]:
    """Return (directory, leaf) where the dataset's files live."""
    directory, _, leaf = (root + "/" + name).rpartition("/")
    return directory, leaf


def data_file_name(leaf: str, token: str) -> str:
    return f"{leaf}.{token}.dat"


def temp_file_name(leaf: str, token: str) -> str:
    return f".{leaf}.{token}.tmp"


def lock_file_name(leaf: str) -> str:
    return f".{leaf}.lock"


# The lock file that all datasets of one directory share, in a store whose owner asks for
# it (a cache's entries, docs/FORMAT.md "Shared lock files"): its "leaf" starts with ".",
# which no dataset's may, so it can never be a dataset's own lock file.
SHARED_LOCK_FILE = "..shared.lock"


def new_token() -> str:
    # random (not os.urandom) saves a system call per file; it is reseeded in a
    # forked child, and O_EXCL turns the rare collision into a retry, not a clash.
    return _random_bits(4 * TOKEN_HEX_DIGITS).to_bytes(TOKEN_HEX_DIGITS // 2, "little").hex()


_random_bits = random.getrandbits
