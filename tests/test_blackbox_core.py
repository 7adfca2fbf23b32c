"""Black-box acceptance tests of the store core and growable datasets.

Written from the contract only (DESIGN.md "Public API", "On-disk format", "Invariants",
"Crash recovery"; issues 2 and 3; README.md; docs/FORMAT.md), not from the implementation.
Multi-process behaviour uses real processes (subprocess), synchronised through pipes with
generous timeouts; no test asserts on timing.
"""

from __future__ import annotations

import mmap
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import mmstore

PY = sys.executable
WAIT = 60.0  # generous timeout for every inter-process handshake


# --------------------------------------------------------------------------- helpers


class Child:
    """A Python subprocess that talks through line-based stdin/stdout."""

    PRELUDE = textwrap.dedent(
        """
        import os, sys, json, time
        import numpy as np
        import mmstore
        def say(*a):
            print(*a, flush=True)
        def hear():
            line = sys.stdin.readline()
            if not line:
                sys.exit(3)
            return line.strip()
        """
    )

    def __init__(self, code: str, *args: str, as_user: int | None = None, env=None, python=PY):
        # as_user: the child imports as this process's user, then switches to ``as_user``
        # (this interpreter and its packages may lie where that user cannot read).
        drop = f"os.setgroups([]); os.setgid({as_user}); os.setuid({as_user})\n" if as_user is not None else ""
        src = self.PRELUDE + drop + textwrap.dedent(code)
        self.p = subprocess.Popen(
            [python, "-c", src, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=env,
            cwd="/",
        )
        self._buf = b""
        self.lines: list[str] = []

    def readline(self, timeout: float = WAIT) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in self._buf:
                if not sel.select(timeout):
                    raise AssertionError(f"child said nothing for {timeout}s; stderr: {self.stderr_now()}")
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    self.p.wait(WAIT)
                    raise AssertionError(
                        f"child exited ({self.p.returncode}) early; stdout so far {self._buf!r}; "
                        f"stderr: {self.p.stderr.read().decode(errors='replace')}"
                    )
                self._buf += chunk
        finally:
            sel.close()
        line, self._buf = self._buf.split(b"\n", 1)
        s = line.decode()
        self.lines.append(s)
        return s

    def drain_lines(self) -> list[str]:
        """After the child is dead: every complete line it printed that was not read yet."""
        rest = self._buf + self.p.stdout.read()
        self._buf = b""
        out = [ln.decode() for ln in rest.split(b"\n")[:-1]]  # the last piece may be torn
        self.lines.extend(out)
        return out

    def stderr_now(self) -> str:
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read().decode(errors="replace")

    def send(self, s: str) -> None:
        self.p.stdin.write((s + "\n").encode())
        self.p.stdin.flush()

    def expect(self, prefix: str, timeout: float = WAIT) -> str:
        line = self.readline(timeout)
        assert line.startswith(prefix), f"expected {prefix!r}, got {line!r}; stderr: {self.stderr_now()}"
        return line[len(prefix) :].strip()

    def finish(self, timeout: float = WAIT) -> int:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        rc = self.p.wait(timeout)
        self.err = self.p.stderr.read().decode(errors="replace")
        self.p.stdout.close()
        self.p.stderr.close()
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(WAIT)


@pytest.fixture
def children():
    made: list[Child] = []

    def make(code, *args, **kw):
        c = Child(code, *args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        if c.p.poll() is None:
            c.kill()
        for f in (c.p.stdin, c.p.stdout, c.p.stderr):
            try:
                f.close()
            except Exception:
                pass


@pytest.fixture
def spath(tmp_path):
    return str(tmp_path / "store")


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.dtype.descr == want.dtype.descr
    assert got.dtype.itemsize == want.dtype.itemsize
    assert got.shape == want.shape
    assert bits(got) == bits(want)


def mapped_base(a: np.ndarray):
    """Follow the .base chain; return the first mmap-like object found, else None."""
    seen = 0
    obj = a
    while obj is not None and seen < 64:
        if isinstance(obj, (mmap.mmap, np.memmap)):
            return obj
        if isinstance(obj, memoryview):
            obj = obj.obj
        else:
            obj = getattr(obj, "base", None)
        seen += 1
    return None


def is_err(exc: BaseException, builtin: type) -> bool:
    return isinstance(exc, mmstore.MmstoreError) and isinstance(exc, builtin)


# --------------------------------------------------------------------------- modes


def test_mode_a_creates_and_reopens(spath):
    assert not os.path.exists(spath)
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
    assert os.path.isfile(os.path.join(spath, "mmstore.json"))
    with mmstore.Store(spath, mode="a") as s:
        assert_bit_exact(s.get("x"), np.arange(3))
        s.put("y", np.ones(2))
        assert set(s) == {"x", "y"}


def test_mode_r_missing_store_fails(spath):
    with pytest.raises((mmstore.MmstoreError, FileNotFoundError)):
        mmstore.Store(spath, mode="r")
    assert not os.path.exists(spath)


def test_mode_rplus_missing_store_fails(spath):
    with pytest.raises((mmstore.MmstoreError, FileNotFoundError)):
        mmstore.Store(spath, mode="r+")
    assert not os.path.exists(spath)


def test_mode_rplus_reads_and_writes(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
    with mmstore.Store(spath, mode="r+") as s:
        assert_bit_exact(s["x"], np.arange(3))
        s["x"] = np.arange(4)
        del s["x"]
        s.put("z", np.zeros(1))
    with mmstore.Store(spath, mode="r") as s:
        assert list(s) == ["z"]


def test_mode_w_minus(spath):
    with mmstore.Store(spath, mode="w-") as s:
        s.put("x", np.arange(3))
    with pytest.raises((mmstore.MmstoreError, FileExistsError)) as ei:
        mmstore.Store(spath, mode="w-")
    assert isinstance(ei.value, (FileExistsError, mmstore.MmstoreError))
    # The failed open did not damage the existing store.
    with mmstore.Store(spath, mode="r") as s:
        assert_bit_exact(s["x"], np.arange(3))


@pytest.mark.parametrize("mode", ["q", "rw", "", "a+"])
def test_bad_mode_is_value_error(spath, mode):
    # ("x" is h5py's synonym of "w-", so it is not a bad mode)
    with pytest.raises(ValueError):
        mmstore.Store(spath, mode=mode)
    assert not os.path.exists(spath)


def test_mode_r_refuses_every_write(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
        s.create("g", dtype="<i4", shape=(0,), growable=True).close()
    with mmstore.Store(spath, mode="r") as s:
        ops = [
            lambda: s.put("y", np.arange(2)),
            lambda: s.put("x", np.arange(2)),
            lambda: s.__setitem__("y", np.arange(2)),
            lambda: s.delete("x"),
            lambda: s.__delitem__("x"),
            lambda: s.create("h", dtype="<i4", shape=(0,), growable=True),
            lambda: s.open_writer("g"),
        ]
        for op in ops:
            with pytest.raises(PermissionError) as ei:
                op()
            assert is_err(ei.value, PermissionError), repr(ei.value)
        assert_bit_exact(s["x"], np.arange(3))
        assert set(s) == {"x", "g"}


def test_context_manager_returns_store_and_closes(spath):
    with mmstore.Store(spath) as s:
        assert isinstance(s, mmstore.Store)
        s.put("x", np.arange(5))
        a = s.get("x")
    # arrays outlive the store handle
    assert_bit_exact(a, np.arange(5))
    s.close()  # closing twice is harmless


# --------------------------------------------------------------------------- put / get


def test_put_returns_none_and_get_is_readonly_zero_copy(spath):
    with mmstore.Store(spath) as s:
        arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
        assert s.put("images/train", arr, attrs={"unit": "px"}) is None
        a = s.get("images/train")
        assert isinstance(a, np.ndarray)
        assert_bit_exact(a, arr)
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0, 0] = 1.0
        with pytest.raises(ValueError):
            a.flags.writeable = True
        assert mapped_base(a) is not None, "get() must return an array backed by an mmap"
        assert not np.shares_memory(a, arr)


def test_two_gets_share_memory(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(1 << 16, dtype=np.int64))
        a = s.get("x")
        b = s["x"]
        assert np.shares_memory(a, b), "two gets of an unchanged dataset should map the same pages"


def test_get_is_backed_by_the_data_file(spath):
    """Zero copy: the array is a map of the committed data file, not a copy of it."""
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(4096, dtype=np.int64))
        a = s.get("x")
        m = mapped_base(a)
        assert m is not None
        dats = [f for f in os.listdir(spath) if f.startswith("x.") and f.endswith(".dat")]
        assert len(dats) == 1
        with open(os.path.join(spath, dats[0]), "rb") as f:
            assert f.read() == a.tobytes()


def test_get_stays_valid_after_replace_delete_and_close(spath):
    s = mmstore.Store(spath)
    v1 = np.arange(100_000, dtype=np.int64)
    v2 = -np.arange(50, dtype=np.int32)
    s.put("x", v1)
    a1 = s.get("x")
    s.put("x", v2)
    a2 = s.get("x")
    assert_bit_exact(a1, v1)
    assert_bit_exact(a2, v2)
    s.delete("x")
    assert "x" not in s
    assert_bit_exact(a1, v1)
    assert_bit_exact(a2, v2)
    s.put("y", v1)
    a3 = s.get("y")
    s.close()
    assert_bit_exact(a3, v1)
    assert int(a1.sum()) == int(v1.sum())
    # the old generation files are gone from the directory, the arrays still read
    assert not any(f.startswith("x.") for f in os.listdir(spath))


def test_missing_dataset_errors(spath):
    with mmstore.Store(spath) as s:
        s.put("a", np.zeros(1))
        for op in (
            lambda: s.get("nope"),
            lambda: s["nope"],
            lambda: s.info("nope"),
            lambda: s.attrs("nope"),
            lambda: s.delete("nope"),
            lambda: s.__delitem__("nope"),
            lambda: s.open_reader("nope"),
            lambda: s.open_writer("nope"),
            lambda: s.get("a/b"),
        ):
            with pytest.raises(KeyError) as ei:
                op()
            assert is_err(ei.value, KeyError), repr(ei.value)
        assert s.get("nope", None) is None
        sentinel = object()
        assert s.get("nope", sentinel) is sentinel
        assert "nope" not in s


def test_mapping_protocol(spath):
    with mmstore.Store(spath) as s:
        assert len(s) == 0 and list(s) == []
        s["x"] = np.arange(3)
        s["g/sub/y"] = np.arange(4.0)
        s.put("g/z", np.zeros((2, 2)))
        assert len(s) == 3
        assert sorted(s) == ["g/sub/y", "g/z", "x"]
        assert "x" in s and "g/sub/y" in s and "g/z" in s
        assert "g" not in s and "g/sub" not in s  # groups are not datasets
        assert_bit_exact(s["g/sub/y"], np.arange(4.0))
        del s["x"]
        assert "x" not in s and len(s) == 2
        with pytest.raises(KeyError):
            s["x"]
        s["x"] = np.arange(7)  # re-create after delete
        assert_bit_exact(s["x"], np.arange(7))
        assert len(s) == 3


def test_info_keys_and_generation(spath):
    with mmstore.Store(spath) as s:
        arr = np.arange(12, dtype=">i4").reshape(3, 4)
        s.put("grp/x", arr, attrs={"unit": "px", "n": 3})
        i1 = s.info("grp/x")
        assert isinstance(i1, dict)
        for k in ("name", "dtype", "shape", "nbytes", "attrs", "generation", "created", "modified"):
            assert k in i1, k
        assert i1["name"] == "grp/x"
        assert np.dtype(i1["dtype"]) == arr.dtype
        assert tuple(i1["shape"]) == (3, 4)
        assert i1["nbytes"] == arr.nbytes
        assert i1["attrs"] == {"unit": "px", "n": 3}
        assert i1["modified"] >= i1["created"]
        g1 = i1["generation"]
        s.put("grp/x", np.zeros(5, dtype="<f2"))
        i2 = s.info("grp/x")
        assert i2["generation"] == g1 + 1
        assert i2["created"] == i1["created"]
        assert i2["modified"] >= i1["modified"]
        assert tuple(i2["shape"]) == (5,)
        assert i2["nbytes"] == 10
        assert np.dtype(i2["dtype"]) == np.dtype("<f2")
        assert i2["attrs"] == {}


def test_info_dtype_structured(spath):
    dt = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])
    with mmstore.Store(spath) as s:
        s.put("rec", np.zeros(3, dt))
        d = s.info("rec")["dtype"]
        got = (
            d
            if isinstance(d, np.dtype)
            else np.lib.format.descr_to_dtype([tuple(f) for f in d] if isinstance(d, list) else d)
        )
        assert got == dt


def test_attrs_roundtrip_and_validation(spath):
    with mmstore.Store(spath) as s:
        attrs = {"unit": "px", "scale": 0.5, "tags": ["a", "b"], "nested": {"k": None, "t": True}, "u": "é✓"}
        s.put("x", np.zeros(2), attrs=attrs)
        assert s.attrs("x") == attrs
        s.put("y", np.zeros(2))
        assert s.attrs("y") == {}
        for bad in ({"f": float("nan")}, {"f": float("inf")}, {"o": object()}):
            with pytest.raises((ValueError, TypeError)) as ei:
                s.put("z", np.zeros(2), attrs=bad)
            assert isinstance(ei.value, mmstore.MmstoreError), repr(ei.value)
        assert "z" not in s


def test_flush_and_durable_put(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(10), durable=True)
        s.put("y", np.arange(3))
        assert s.flush() is None
        assert_bit_exact(s["y"], np.arange(3))


def test_put_of_replacement_leaves_one_data_file(spath):
    with mmstore.Store(spath) as s:
        for i in range(5):
            s.put("x", np.full(100, i))
        dats = [f for f in os.listdir(spath) if f.endswith(".dat")]
        assert len(dats) == 1
        tmps = [f for f in os.listdir(spath) if f.endswith(".tmp")]
        assert tmps == []
        assert_bit_exact(s["x"], np.full(100, 4))


# --------------------------------------------------------------------------- dtypes

_rng = np.random.default_rng(1234)


def _random_bytes_array(dtype, shape):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = _rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy() if n else np.zeros(shape, dtype)


DTYPE_CASES = {
    "bool": np.array([True, False, True, True]),
    "int8": np.array([-128, 0, 127], np.int8),
    "int16": np.array([-32768, 1, 32767], np.int16),
    "int32": np.array([-(2**31), 5, 2**31 - 1], np.int32),
    "int64": np.array([-(2**63), 7, 2**63 - 1], np.int64),
    "uint8": np.array([0, 255], np.uint8),
    "uint16": np.array([0, 65535], np.uint16),
    "uint32": np.array([0, 2**32 - 1], np.uint32),
    "uint64": np.array([0, 2**64 - 1], np.uint64),
    "float16": np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, 65504.0, 6e-8], np.float16),
    "float32": np.array([0.0, -0.0, 3.4e38, np.nan, 1e-45], np.float32),
    "float64": np.array([np.pi, -0.0, np.inf, 5e-324, np.nan], np.float64),
    "float16_nan_payloads": np.array([0x7C01, 0xFE55, 0x7E00], np.uint16).view(np.float16),
    "float64_nan_payloads": np.array([0x7FF0000000000001, 0xFFF8DEADBEEF0001], np.uint64).view(np.float64),
    "longdouble": np.array([1.0, np.pi, -2.5], np.longdouble),
    "complex64": np.array([1 + 2j, np.nan - 1j, -0.0j], np.complex64),
    "complex128": np.array([1e300 + 1e-300j, np.inf * 1j], np.complex128),
    "clongdouble": np.array([1 + 1j], np.clongdouble),
    "M8[ns]": np.array(["2024-01-02T03:04:05.123456789", "NaT", "1970-01-01"], "M8[ns]"),
    "M8[us]": np.array(["2024-01-02T03:04:05.123456", "NaT"], "M8[us]"),
    "M8[s]": np.array(["1900-01-01T00:00:01", "2262-04-11"], "M8[s]"),
    "M8[D]": np.array(["2024-02-29", "NaT", "0001-01-01"], "M8[D]"),
    "M8[Y]": np.array(["2024", "1066"], "M8[Y]"),
    "M8[M]": np.array(["2024-02"], "M8[M]"),
    "m8[ns]": np.array([1, -5, 0], "m8[ns]"),
    "m8[ms]": np.array([1, "NaT"], "m8[ms]"),
    "m8[h]": np.array([24, -1], "m8[h]"),
    "m8[D]": np.array([365], "m8[D]"),
    "M8[10ms]": np.array([0, 7], "M8[10ms]"),
    "S10": np.array([b"", b"abc", b"0123456789", b"a\x00b"], "S10"),
    "S1": np.array([b"x", b"\xff"], "S1"),
    "U5": np.array(["", "héllo", "✓✓", "a\x00"], "U5"),
    "U1": np.array(["😀"], "U1"),
    "V6": np.array([b"abcdef", b"\x00\x01\x02\x03\x04\x05"], "V6"),
    ">i2": np.array([1, -2, 300], ">i2"),
    ">i4": np.array([1, -2, 2**31 - 1], ">i4"),
    ">u8": np.array([1, 2**64 - 1], ">u8"),
    ">f2": np.array([1.5, -np.inf], ">f2"),
    ">f4": np.array([1.5, np.nan], ">f4"),
    ">f8": np.array([np.pi, -0.0], ">f8"),
    ">c8": np.array([1 + 2j], ">c8"),
    ">c16": np.array([1 - 2j, np.nan], ">c16"),
    ">M8[ns]": np.array(["2024-01-02T03:04:05.000000001", "NaT"], ">M8[ns]"),
    ">m8[s]": np.array([5, -5], ">m8[s]"),
    ">U3": np.array(["abc", "é"], ">U3"),
    "genomic": np.array(
        [(b"chr1", 12345, 0.5, 3, 7), (b"chrX", -1, np.nan, 0, 0)],
        [("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")],
    ),
    "struct_big_endian": np.array([(1, 2.5), (-3, np.inf)], [("a", ">i4"), ("b", ">f8")]),
    "struct_mixed_endian": np.array([(1, 2.5, 3)], [("a", ">i4"), ("b", "<f8"), ("c", ">u2")]),
    "struct_nested": np.array(
        [((1, (2.0, 3.0)), b"xyz", [1, 2, 3]), ((-1, (0.0, -0.0)), b"", [4, 5, 6])],
        [("a", [("b", "<i2"), ("c", ">f4", (2,))]), ("d", "S3"), ("e", "<u1", (3,))],
    ),
    "struct_deep": np.zeros(3, [("l1", [("l2", [("l3", [("v", "<f8"), ("w", "M8[ms]")])])]), ("u", "U2")]),
    "struct_aligned_padding": np.array([(1, 2.0, 3)], np.dtype([("a", "u1"), ("b", "<f8"), ("c", "<i2")], align=True)),
    "struct_offsets": np.zeros(
        2, np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [0, 8], "itemsize": 16})
    ),
    "struct_titled": np.zeros(2, np.dtype([(("Title A", "a"), "<i4"), ("b", "<f4")])),
    "struct_subarray_2d": np.ones(2, [("m", "<f4", (2, 3)), ("dt", "m8[us]", (2,))]),
    "struct_bool_complex": np.array([(True, 1 + 1j), (False, -1j)], [("flag", "?"), ("z", "<c8")]),
    "zero_d_float": np.array(3.25),
    "zero_d_int": np.array(-7, dtype=">i8"),
    "zero_d_struct": np.array((1, b"ab"), dtype=[("x", "<i4"), ("s", "S2")]),
    "zero_d_str": np.array("hello", dtype="U7"),
    "zero_d_datetime": np.array("2024-05-06", dtype="M8[D]"),
    "empty_1d": np.zeros(0, np.float64),
    "empty_2d": np.zeros((0, 3), np.int16),
    "empty_mid": np.zeros((4, 0, 2), np.complex64),
    "empty_struct": np.zeros(0, [("a", "<i4"), ("b", "S3")]),
    "empty_U": np.zeros((2, 0), "U5"),
    "ndim_5": _random_bytes_array("<u2", (2, 3, 1, 4, 2)),
    "random_bytes_f8": _random_bytes_array("<f8", (64, 7)),
    "random_bytes_struct": _random_bytes_array([("a", "<f4"), ("b", ">i8"), ("c", "S3")], (33,)),
}


@pytest.mark.parametrize("case", sorted(DTYPE_CASES))
def test_dtype_roundtrip_bit_exact(spath, case):
    arr = DTYPE_CASES[case]
    with mmstore.Store(spath) as s:
        s.put(f"d/{case.replace('[', '_').replace(']', '_').replace('>', 'be')}", arr)
        name = next(iter(s))
        got = s.get(name)
        assert_bit_exact(got, arr)
        assert got.dtype.byteorder == arr.dtype.byteorder
        assert got.dtype.names == arr.dtype.names
        assert got.dtype.fields == arr.dtype.fields
        assert not got.flags.writeable
    # and from a fresh handle (read from the on-disk header, not a cache)
    with mmstore.Store(spath, mode="r") as s:
        assert_bit_exact(s.get(name), arr)


def test_dtypes_roundtrip_in_another_process(spath, children):
    names = sorted(DTYPE_CASES)
    with mmstore.Store(spath) as s:
        for i, case in enumerate(names):
            s.put(f"c{i}", DTYPE_CASES[case])
    c = children(
        """
        import hashlib
        s = mmstore.Store(sys.argv[1], mode="r")
        for n in sorted(s):
            a = s.get(n)
            digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            say(n, a.dtype.str, str(a.dtype.descr).replace(" ", ""), a.shape, digest)
        say("END")
        """,
        spath,
    )
    import hashlib

    got = {}
    while True:
        line = c.readline()
        if line == "END":
            break
        n, rest = line.split(" ", 1)
        got[n] = rest
    assert c.finish() == 0, c.err
    for i, case in enumerate(names):
        a = DTYPE_CASES[case]
        want = f"{a.dtype.str} {str(a.dtype.descr).replace(' ', '')} {a.shape} {hashlib.sha256(bits(a)).hexdigest()}"
        assert got[f"c{i}"] == want, case


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: np.arange(200, dtype=np.int64).reshape(10, 20)[::2, ::3], id="strided"),
        pytest.param(lambda: np.asfortranarray(np.arange(60.0).reshape(3, 4, 5)), id="fortran"),
        pytest.param(lambda: np.arange(100, dtype=">f4")[::-1], id="negative-stride"),
        pytest.param(lambda: np.arange(120).reshape(4, 5, 6)[::-1, :, ::-2], id="negative-2d"),
        pytest.param(lambda: np.arange(24).reshape(2, 3, 4).transpose(2, 0, 1), id="transposed"),
        pytest.param(lambda: np.broadcast_to(np.arange(5, dtype=np.int16), (4, 5)), id="broadcast"),
        pytest.param(lambda: np.zeros(10, [("a", "<i4"), ("b", "<f8")])["b"], id="field-view"),
        pytest.param(lambda: np.arange(40, dtype=np.uint8).reshape(5, 8).view(">u4")[:, ::-1], id="view-dtype"),
        pytest.param(lambda: np.arange(10.0)[3], id="numpy-scalar"),
    ],
)
def test_noncontiguous_stored_c_contiguous(spath, make):
    src = make()
    want = np.asarray(src).copy(order="C")  # (ascontiguousarray would make a scalar 1-d)
    with mmstore.Store(spath) as s:
        s.put("x", src)
        got = s.get("x")
        assert_bit_exact(got, want)
        assert got.flags.c_contiguous
    # the data file is raw C-order bytes
    dats = [f for f in os.listdir(spath) if f.endswith(".dat")]
    with open(os.path.join(spath, dats[0]), "rb") as f:
        assert f.read() == want.tobytes()


def test_readonly_source_and_memmap_source(spath, tmp_path):
    src = np.arange(50.0)
    src.flags.writeable = False
    mm = np.memmap(tmp_path / "m.bin", dtype="<i8", mode="w+", shape=(30,))
    mm[:] = np.arange(30)
    with mmstore.Store(spath) as s:
        s.put("ro", src)
        s.put("mm", mm)
        s.put("self", s.get("ro")[::2])  # a get() result (read-only view of a map) put back
        assert_bit_exact(s["ro"], src)
        assert_bit_exact(s["mm"], np.arange(30, dtype="<i8"))
        assert_bit_exact(s["self"], src[::2])
        s.put("ro", s.get("ro") * 2)  # replace with data computed from its own map
        assert_bit_exact(s["ro"], src * 2)
    del mm


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: np.array([1, "a", None], dtype=object), id="object"),
        pytest.param(lambda: np.zeros(3, [("a", "<i4"), ("o", "O")]), id="struct-with-object"),
        pytest.param(lambda: np.zeros(3, [("n", [("o", "O")])]), id="nested-object"),
        pytest.param(lambda: np.zeros(2, [("o", "O", (2,))]), id="subarray-object"),
        pytest.param(lambda: np.array(None, dtype=object), id="object-0d"),
        pytest.param(lambda: np.zeros(0, dtype=object), id="object-empty"),
    ],
)
def test_object_dtypes_refused(spath, bad):
    with mmstore.Store(spath) as s:
        with pytest.raises(ValueError) as ei:
            s.put("x", bad())
        assert is_err(ei.value, ValueError), repr(ei.value)
        assert "\n" not in str(ei.value).strip()
        assert "x" not in s
        assert len(s) == 0
        with pytest.raises(ValueError) as ei:
            s.create("g", dtype=bad().dtype, shape=(0,), growable=True)
        assert is_err(ei.value, ValueError)
        assert "g" not in s
    # nothing was left behind on disk
    leftovers = [f for f in os.listdir(spath) if f.endswith((".dat", ".json", ".tmp")) and f != "mmstore.json"]
    assert leftovers == []


# --------------------------------------------------------------------------- names

BAD_NAMES = [
    "",
    "/abs",
    "/",
    "a//b",
    "a/",
    "..",
    "../x",
    "a/../b",
    "a/./b",
    ".",
    "./a",
    ".hidden",
    "a/.b",
    "a\x00b",
    "a\nb",
    "a\tb",
    "a\rb",
    "\x7f",
    "a\u200bb",
    "a\u202eb",
    "x" * 2000,
    "a/" + "y" * 300,
    " lead",
    "trail ",
    "mmstore",
    "g.json/x",
    "g.dat/x",
    "a\\..\\b/../c",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:30] for n in BAD_NAMES])
def test_bad_names_refused(spath, tmp_path, name):
    with mmstore.Store(spath) as s:
        with pytest.raises(ValueError) as ei:
            s.put(name, np.zeros(2))
        assert is_err(ei.value, ValueError), repr(ei.value)
        msg = str(ei.value)
        assert msg and "\n" not in msg.strip(), msg
        for op in (
            lambda: s.get(name),
            lambda: s.info(name),
            lambda: s.delete(name),
            lambda: s.create(name, dtype="<i4", shape=(0,), growable=True),
        ):
            with pytest.raises((ValueError, KeyError)) as ei2:
                op()
            assert isinstance(ei2.value, mmstore.MmstoreError)
        assert len(s) == 0
    # nothing escaped the store
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_good_unusual_names(spath):
    names = ["a.b", "a-b_c", "g/s/t/u/v", "café", "数据/集", "a b", "x.json.y", "g/x.json", "n" * 200]
    with mmstore.Store(spath) as s:
        for i, n in enumerate(names):
            s.put(n, np.array([i]))
        assert sorted(s) == sorted(names)
        for i, n in enumerate(names):
            assert_bit_exact(s[n], np.array([i]))


# --------------------------------------------------------------------------- multi-process core


def test_writer_process_reader_process_exact_bytes(spath, children):
    w = children(
        """
        s = mmstore.Store(sys.argv[1])
        rng = np.random.default_rng(7)
        a = rng.integers(0, 2**63, size=(300, 1000), dtype=np.int64)
        s.put("shared/a", a, attrs={"seed": 7})
        say("PUT", a.sum() % 1000003)
        hear()
        s.close()
        """,
        spath,
    )
    wsum = int(w.expect("PUT"))
    r = children(
        """
        s = mmstore.Store(sys.argv[1], mode="r")
        a = s.get("shared/a")
        b = np.random.default_rng(7).integers(0, 2**63, size=(300, 1000), dtype=np.int64)
        say("EQ", bool(np.array_equal(a, b)), a.sum() % 1000003, s.attrs("shared/a")["seed"], a.flags.writeable)
        """,
        spath,
    )
    assert r.expect("EQ").split() == ["True", str(wsum), "7", "False"]
    w.send("go")
    assert w.finish() == 0, w.err
    assert r.finish() == 0, r.err


def test_reader_process_keeps_old_snapshot_during_replacements(spath, children):
    with mmstore.Store(spath) as s:
        s.put("x", np.full(1 << 16, 0, dtype=np.int64))
    r = children(
        """
        s = mmstore.Store(sys.argv[1], mode="r")
        snaps = []
        while True:
            cmd = hear()
            if cmd == "get":
                a = s.get("x")
                snaps.append(a)
                say("GOT", int(a[0]))
            elif cmd == "check":
                ok = all(bool((a == a[0]).all()) for a in snaps)
                say("CHECK", ok, ",".join(str(int(a[0])) for a in snaps))
                break
        """,
        spath,
    )
    expected = []
    with mmstore.Store(spath) as s:
        for i in range(1, 41):
            s.put("x", np.full(1 << 16, i, dtype=np.int64))
            if i % 4 == 0:
                r.send("get")
                expected.append(int(r.expect("GOT")))
                assert expected[-1] == i  # a get after a commit sees that commit
    r.send("check")
    ok, vals = r.expect("CHECK").split()
    assert ok == "True"
    assert vals == ",".join(map(str, expected))
    assert r.finish() == 0, r.err


def test_concurrent_writer_processes_lose_no_commit(spath, children):
    mmstore.Store(spath).close()
    procs = [
        children(
            """
            s = mmstore.Store(sys.argv[1], timeout=120)
            k = int(sys.argv[2])
            say("READY")
            hear()
            for i in range(25):
                s.put(f"w{k}/d{i}", np.full(100, k * 1000 + i))
                s.put("common", np.full(10, k * 1000 + i))
            say("DONE")
            """,
            spath,
            k,
        )
        for k in range(4)
    ]
    for p in procs:
        p.expect("READY")
    for p in procs:
        p.send("go")
    for p in procs:
        p.expect("DONE", timeout=180)
        assert p.finish() == 0, p.err
    with mmstore.Store(spath, mode="r") as s:
        assert len(s) == 4 * 25 + 1
        for k in range(4):
            for i in range(25):
                assert_bit_exact(s[f"w{k}/d{i}"], np.full(100, k * 1000 + i))
        c = s["common"]
        assert int(c[0]) in {k * 1000 + 24 for k in range(4)}
        assert (c == c[0]).all()
        assert s.info("common")["generation"] == 100


# --------------------------------------------------------------------------- growable datasets

TICK = np.dtype([("t", "<f8"), ("price", "<f4"), ("size", "<i4")])


def test_create_growable_commits_at_once(spath, children):
    with mmstore.Store(spath) as s:
        w = s.create("ticks", dtype=TICK, shape=(0,), growable=True)
        try:
            assert "ticks" in s
            assert s.get("ticks").shape == (0,)
            assert s.get("ticks").dtype == TICK
            r = children(
                """
                s = mmstore.Store(sys.argv[1], mode="r")
                say("SEE", "ticks" in s, s.get("ticks").shape, s.info("ticks")["generation"])
                """,
                spath,
            )
            assert r.expect("SEE").startswith("True (0,)")
            assert r.finish() == 0, r.err
        finally:
            w.close()


def test_writer_append_setitem_len_flush(spath):
    with mmstore.Store(spath) as s:
        with s.create("ticks", dtype=TICK, shape=(0,), growable=True) as w:
            assert len(w) == 0
            w.append((1.0, 101.5, 10))
            assert len(w) == 1
            block = np.zeros(100, TICK)
            block["t"] = np.arange(100) + 2.0
            w.append(block)
            assert len(w) == 101
            r = s.open_reader("ticks")
            assert len(r.array) == 0  # nothing flushed yet
            assert s.get("ticks").shape == (0,)
            w.flush()
            r.refresh()
            assert len(r.array) == 101
            assert r.array[0]["price"] == np.float32(101.5)
            w[5] = (-1.0, 2.5, 99)
            w.flush()
            r.refresh()
            assert tuple(r.array[5].tolist()) == (-1.0, 2.5, 99)
            assert not r.array.flags.writeable
            assert mapped_base(r.array) is not None
            r.close()
        got = s.get("ticks")
        assert got.shape == (101,)
        assert got[0]["t"] == 1.0 and got[100]["t"] == 101.0
        assert tuple(got[5].tolist()) == (-1.0, 2.5, 99)
        assert s.info("ticks")["shape"][0] == 101


def test_writer_close_without_flush_publishes(spath):
    with mmstore.Store(spath) as s:
        w = s.create("g", dtype="<i8", shape=(0,), growable=True)
        w.append(np.arange(10))
        w.close()
        assert_bit_exact(s.get("g"), np.arange(10, dtype="<i8"))


def test_growable_2d_rows(spath):
    with mmstore.Store(spath) as s:
        with s.create("m", dtype="<f4", shape=(0, 3), growable=True) as w:
            w.append(np.ones((2, 3), "<f4"))
            w.append(np.array([1, 2, 3], "<f4"))  # one row
            w[0] = [7, 8, 9]
            w.flush()
        got = s.get("m")
        assert got.shape == (3, 3)
        assert_bit_exact(got, np.array([[7, 8, 9], [1, 1, 1], [1, 2, 3]], "<f4"))


def test_append_refuses_lossy_or_wrong_rows(spath):
    with mmstore.Store(spath) as s:
        with s.create("g", dtype="<i4", shape=(0, 2), growable=True) as w:
            w.append(np.array([[1, 2]], "<i4"))
            for bad in (np.array([[1.5, 2.0]]), np.array([[2**40, 1]]), np.zeros((1, 3), "<i4")):
                with pytest.raises(ValueError) as ei:
                    w.append(bad)
                assert isinstance(ei.value, mmstore.MmstoreError)
            assert len(w) == 1
            w.flush()
        assert_bit_exact(s.get("g"), np.array([[1, 2]], "<i4"))


def test_big_growth(spath):
    with mmstore.Store(spath) as s, s.create("g", dtype="<u8", shape=(0,), growable=True) as w:
        for i in range(200):
            w.append(np.arange(i * 5000, (i + 1) * 5000, dtype="<u8"))
        w.flush()
        r = s.open_reader("g")
        assert len(r.array) == 1_000_000
        assert (r.array == np.arange(1_000_000, dtype="<u8")).all()
        r.close()


def test_open_writer_reopens_and_continues(spath):
    with mmstore.Store(spath) as s, s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
        w.append(np.arange(5))
    with mmstore.Store(spath) as s:
        with s.open_writer("g") as w:
            assert len(w) == 5
            w.append(np.arange(5, 8))
            w[0] = 100
            w.flush()
        want = np.arange(8, dtype="<i8")
        want[0] = 100
        assert_bit_exact(s.get("g"), want)


def test_open_writer_on_put_dataset_edits_in_place(spath):
    with mmstore.Store(spath) as s:
        s.put("f", np.arange(6, dtype="<i4"))
        old = s.get("f")
        with s.open_writer("f") as w:
            w[2] = 42
            w.flush()
        want = np.arange(6, dtype="<i4")
        want[2] = 42
        assert_bit_exact(s.get("f"), want)
        assert old.shape == (6,)


def test_create_existing_without_exist_ok_refused(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
        with pytest.raises(mmstore.MmstoreError):
            s.create("x", dtype="<i4", shape=(0,), growable=True)
        assert_bit_exact(s["x"], np.arange(3))


def test_reader_process_sees_only_committed_rows_and_refresh_and_wait(spath, children):
    with mmstore.Store(spath) as s:
        w = s.create("ticks", dtype="<i8", shape=(0,), growable=True)
        try:
            w.append(np.arange(5))
            w.flush()
            w.append(np.arange(5, 8))  # not flushed
            r = children(
                """
                s = mmstore.Store(sys.argv[1], mode="r")
                r = s.open_reader("ticks")
                say("LEN", len(r.array), ",".join(map(str, r.array.tolist())), r.array.flags.writeable)
                hear()
                r.refresh()
                say("LEN", len(r.array))
                hear()
                r.wait(50, timeout=120)
                say("WAITED", len(r.array), bool((r.array[:50] == np.arange(50)).all()))
                r.close()
                """,
                spath,
            )
            assert r.expect("LEN").split() == ["5", "0,1,2,3,4", "False"]
            w.flush()
            r.send("refresh")
            assert r.expect("LEN") == "8"
            r.send("wait")
            for i in range(8, 50):
                w.append(i)
                if i % 10 == 0:
                    w.flush()
            w.flush()
            n, ok = r.expect("WAITED", timeout=120).split()
            assert int(n) >= 50 and ok == "True"
            assert r.finish() == 0, r.err
        finally:
            w.close()


def test_reader_wait_returns_on_timeout(spath):
    with mmstore.Store(spath) as s:
        s.create("g", dtype="<i8", shape=(0,), growable=True).close()
        with s.open_reader("g") as r:
            r.wait(5, timeout=0.05)  # nothing will come: must return (or report), not hang
            assert len(r.array) == 0


def test_reader_of_follower_processes_every_row_once(spath, children):
    with mmstore.Store(spath) as s:
        s.create("g", dtype=[("i", "<u8"), ("c", "<u8")], shape=(0,), growable=True).close()
    followers = [
        children(
            """
            s = mmstore.Store(sys.argv[1], mode="r")
            r = s.open_reader("g")
            say("READY")
            seen = 0
            bad = 0
            while seen < 20000:
                r.wait(seen + 1, timeout=120)
                a = r.array
                new = a[seen:]
                bad += int((new["c"] != new["i"] * np.uint64(2654435761)).sum())
                bad += int((new["i"] != np.arange(seen, seen + len(new), dtype=np.uint64)).sum())
                seen = len(a)
            say("SEEN", seen, bad)
            """,
            spath,
        )
        for _ in range(2)
    ]
    for f in followers:
        f.expect("READY")
    with mmstore.Store(spath) as s, s.open_writer("g") as w:
        rng = random.Random(5)
        i = 0
        while i < 20000:
            n = min(rng.randint(1, 700), 20000 - i)
            idx = np.arange(i, i + n, dtype=np.uint64)
            rows = np.zeros(n, [("i", "<u8"), ("c", "<u8")])
            rows["i"] = idx
            rows["c"] = idx * np.uint64(2654435761)
            w.append(rows)
            w.flush()
            i += n
    for f in followers:
        assert f.expect("SEEN", timeout=180).split() == ["20000", "0"]
        assert f.finish() == 0, f.err


# --------------------------------------------------------------------------- locking

HOLD_WRITER = """
s = mmstore.Store(sys.argv[1])
name = sys.argv[2]
if sys.argv[3] == "create":
    w = s.create(name, dtype="<i8", shape=(0,), growable=True)
else:
    w = s.open_writer(name)
w.append(np.arange(3))
w.flush()
say("HOLDING")
hear()
w.close()
say("RELEASED")
"""


def test_second_writer_in_another_process_times_out(spath, children):
    h = children(HOLD_WRITER, spath, "ticks", "create")
    h.expect("HOLDING")
    t = children(
        """
        s = mmstore.Store(sys.argv[1], timeout=0.5)
        for what in ("open_writer", "put", "delete"):
            try:
                if what == "open_writer":
                    s.open_writer("ticks").close()
                elif what == "put":
                    s.put("ticks", np.zeros(2))
                else:
                    s.delete("ticks")
                say("NOERR", what)
            except Exception as e:
                say("ERR", what, type(e).__name__, isinstance(e, mmstore.LockTimeout),
                    isinstance(e, TimeoutError), isinstance(e, mmstore.MmstoreError), repr(str(e)))
        """,
        spath,
    )
    for what in ("open_writer", "put", "delete"):
        line = t.readline()
        parts = line.split(" ", 6)
        assert parts[0] == "ERR" and parts[1] == what, line
        assert parts[3:6] == ["True", "True", "True"], line
        assert "ticks" in parts[6] and "lock" in parts[6].lower(), f"LockTimeout should name the lock: {line}"
    assert t.finish() == 0, t.err
    h.send("release")
    h.expect("RELEASED")
    assert h.finish() == 0, h.err
    # after release, a new writer gets it
    with mmstore.Store(spath, timeout=30) as s, s.open_writer("ticks") as w:
        assert len(w) == 3


def test_second_writer_same_process_times_out(spath):
    with mmstore.Store(spath, timeout=0.3) as s, s.create("g", dtype="<i4", shape=(0,), growable=True) as w:
        with pytest.raises(TimeoutError) as ei:
            s.open_writer("g")
        assert isinstance(ei.value, mmstore.LockTimeout)
        assert isinstance(ei.value, mmstore.MmstoreError)
        s2 = mmstore.Store(spath, timeout=0.3)
        with pytest.raises(mmstore.LockTimeout):
            s2.open_writer("g")
        s2.close()
        w.append(1)


def test_writers_to_different_datasets_do_not_block(spath, children):
    h = children(HOLD_WRITER, spath, "a", "create")
    h.expect("HOLDING")
    o = children(
        """
        s = mmstore.Store(sys.argv[1], timeout=30)
        with s.create("b", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(4))
            w.flush()
        s.put("c", np.arange(2))
        s.put("grp/d", np.arange(2))
        s.delete("c")
        say("OK", sorted(s))
        """,
        spath,
    )
    assert o.expect("OK") == "['a', 'b', 'grp/d']"
    assert o.finish() == 0, o.err
    h.send("release")
    h.expect("RELEASED")
    assert h.finish() == 0, h.err


def test_lock_released_when_writer_is_killed(spath, children):
    h = children(HOLD_WRITER, spath, "g", "create")
    h.expect("HOLDING")
    h.kill()
    with mmstore.Store(spath, timeout=30) as s, s.open_writer("g") as w:
        assert len(w) == 3
        w.append(3)
    with mmstore.Store(spath, "r") as s:
        assert_bit_exact(s["g"], np.arange(4, dtype="<i8"))


# --------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_reopens(spath):
    s = mmstore.Store(spath, timeout=0.5)
    s.put("x", np.arange(10))
    a = s.get("x")
    w = s.create("held", dtype="<i8", shape=(0,), growable=True)
    w.append(np.arange(3))
    w.flush()
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r_fd)
            msgs = []
            msgs.append(("inherited-array", bool((a == np.arange(10)).all())))
            c = mmstore.Store(spath, timeout=0.5)
            msgs.append(("get", bool((c.get("x") == np.arange(10)).all())))
            c.put("from_child", np.arange(5))
            msgs.append(("put", bool((c.get("from_child") == np.arange(5)).all())))
            with c.create("child_g", dtype="<i4", shape=(0,), growable=True) as cw:
                cw.append(np.arange(3, dtype="<i4"))
                cw.flush()
            msgs.append(("create", True))
            # the parent's writer lock is the parent's: the child must not get a second writer
            try:
                c.open_writer("held").close()
                msgs.append(("held-locked", False))
            except mmstore.LockTimeout:
                msgs.append(("held-locked", True))
            rd = c.open_reader("held")
            msgs.append(("reader", len(rd.array) == 3))
            rd.close()
            c.close()
            os.write(w_fd, repr(msgs).encode())
            code = 0
        except BaseException as e:
            os.write(w_fd, f"EXC {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w_fd)
    chunks = []
    while True:
        b = os.read(r_fd, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r_fd)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, out
    msgs = dict(eval(out))
    assert all(msgs.values()), msgs
    # parent still works, its writer still holds and can write
    w.append(np.arange(3, 6))
    w.flush()
    w.close()
    assert_bit_exact(s.get("held"), np.arange(6, dtype="<i8"))
    assert_bit_exact(s.get("from_child"), np.arange(5))
    assert_bit_exact(s.get("child_g"), np.arange(3, dtype="<i4"))
    s.close()


# --------------------------------------------------------------------------- crashes

KILL_PUTTER = """
s = mmstore.Store(sys.argv[1])
N = int(sys.argv[2])
k = int(sys.argv[3])
say("READY")
while True:
    k += 1
    say("PUT", k)
    s.put("x", np.full(N, k, dtype=np.int64))
    say("DONE", k)
"""


def _listing(path):
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), path))
    return sorted(out)


def test_sigkill_mid_put_leaves_old_or_new_and_cleans_temp_files(spath, children):
    N = (16 << 20) // 8
    with mmstore.Store(spath) as s:
        s.put("x", np.full(N, 0, dtype=np.int64))
    rng = random.Random(42)
    prev = 0  # the value committed before each trial
    for trial in range(int(os.environ.get("BB_PUT_TRIALS", "10"))):
        c = children(KILL_PUTTER, spath, N, (trial + 1) * 1000)
        c.expect("READY")
        c.expect("PUT")
        for _ in range(rng.randint(0, 3)):
            c.readline()
        time.sleep(rng.uniform(0, 0.1))  # a random instant (not a synchronisation)
        os.kill(c.p.pid, signal.SIGKILL)
        c.p.wait(WAIT)
        c.drain_lines()
        puts = [int(ln.split()[1]) for ln in c.lines if ln.startswith("PUT")]
        dones = [int(ln.split()[1]) for ln in c.lines if ln.startswith("DONE")]
        old = dones[-1] if dones else prev
        allowed = {old, puts[-1]}
        with mmstore.Store(spath, mode="a") as s:  # writable open: runs recovery
            a = s.get("x")
            assert a.shape == (N,)
            v = int(a[0])
            assert (a == v).all(), f"trial {trial}: torn data"
            assert v in allowed, (trial, v, allowed)
            prev = v
        files = _listing(spath)
        tmps = [f for f in files if f.endswith(".tmp")]
        dats = [f for f in files if f.endswith(".dat")]
        assert tmps == [], f"trial {trial}: temp files left after a writable open: {tmps}"
        assert len(dats) == 1, f"trial {trial}: unreferenced data files left: {dats}"
    with mmstore.Store(spath, mode="r") as s:
        assert s.info("x")["nbytes"] == N * 8


GROW_KILL = """
s = mmstore.Store(sys.argv[1], timeout=30)
seed = int(sys.argv[2])
rng = np.random.default_rng(seed)
dt = np.dtype([("i", "<u8"), ("c", "<u8")])
if "g" in s:
    w = s.open_writer("g")
else:
    w = s.create("g", dtype=dt, shape=(0,), growable=True)
n = len(w)
say("START", n)
while True:
    k = int(rng.integers(1, 3000))
    idx = np.arange(n, n + k, dtype=np.uint64)
    rows = np.zeros(k, dt)
    rows["i"] = idx
    rows["c"] = idx * np.uint64(2654435761) + np.uint64(12345)
    w.append(rows)
    n += k
    if rng.random() < 0.5:
        say("FLUSHING", n)
        w.flush()
        say("FLUSHED", n)
"""


def test_sigkill_mid_append_keeps_flushed_rows_and_next_writer_continues(spath, children):
    rng = random.Random(7)
    committed = 0
    for trial in range(int(os.environ.get("BB_APPEND_TRIALS", "6"))):
        c = children(GROW_KILL, spath, trial)
        start = int(c.expect("START"))
        assert start == committed, f"trial {trial}: a new writer starts at {start}, committed was {committed}"
        for _ in range(rng.randint(1, 40)):
            c.readline()
        os.kill(c.p.pid, signal.SIGKILL)
        c.p.wait(WAIT)
        c.drain_lines()
        flushed = [int(ln.split()[1]) for ln in c.lines if ln.startswith("FLUSHED")]
        flushing = [int(ln.split()[1]) for ln in c.lines if ln.startswith("FLUSHING")]
        with mmstore.Store(spath, mode="a") as s:
            with s.open_reader("g") as r:
                a = r.array
                L = len(a)
                lo = flushed[-1] if flushed else committed
                allowed = {lo}
                if flushing and flushing[-1] > lo:
                    allowed.add(flushing[-1])  # killed mid-flush: old or new length
                assert L in allowed, (trial, L, allowed)
                assert (a["i"] == np.arange(L, dtype=np.uint64)).all(), "torn or lost rows"
                assert (a["c"] == np.arange(L, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)).all()
            assert s.get("g").shape == (L,)
            assert s.info("g")["shape"][0] == L
            files = _listing(spath)
        assert [f for f in files if f.endswith(".tmp")] == []
        assert len([f for f in files if f.endswith(".dat")]) == 1
        committed = L


def test_unflushed_rows_invisible_after_writer_killed(spath, children):
    c = children(
        """
        s = mmstore.Store(sys.argv[1])
        w = s.create("g", dtype="<i8", shape=(0,), growable=True)
        w.append(np.arange(10)); w.flush()
        w.append(np.arange(10, 5000))
        say("APPENDED")
        hear()
        """,
        spath,
    )
    c.expect("APPENDED")
    c.kill()
    with mmstore.Store(spath) as s:
        assert_bit_exact(s.get("g"), np.arange(10, dtype="<i8"))
        with s.open_writer("g") as w:
            assert len(w) == 10
            w.append(np.arange(10, 12))
        assert_bit_exact(s.get("g"), np.arange(12, dtype="<i8"))


def test_planted_leftovers_of_dead_writer_cleaned_by_writable_open_only(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
    # simulate a dead writer: an unreferenced data file and a temp sidecar
    stray_dat = os.path.join(spath, "x.0123456789abcdef.dat")
    stray_tmp = os.path.join(spath, ".x.fedcba9876543210.tmp")
    with open(stray_dat, "wb") as f:
        f.write(b"\x00" * 24)
    with open(stray_tmp, "w") as f:
        f.write('{"format":"mmstore-dataset"')
    with mmstore.Store(spath, mode="r") as s:
        assert_bit_exact(s["x"], np.arange(3))
    assert os.path.exists(stray_dat) and os.path.exists(stray_tmp)  # a reader repairs nothing
    with mmstore.Store(spath, mode="a") as s:
        assert_bit_exact(s["x"], np.arange(3))
    assert not os.path.exists(stray_dat)
    assert not os.path.exists(stray_tmp)


# --------------------------------------------------------------------------- read-only store, other uid

NOBODY = 65534


@pytest.fixture
def ro_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534")
    d = tempfile.mkdtemp(prefix="mmstore-bb-ro-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    import shutil

    for root, dirs, _files in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
    shutil.rmtree(d, ignore_errors=True)


def _chmod_readonly(path):
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o555)
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)


def test_reader_as_other_user_on_unwritable_store(ro_dir, children):
    spath = os.path.join(ro_dir, "store")
    dt = np.dtype([("a", "<i4"), ("b", ">f8")])
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(100.0), attrs={"k": 1})
        s.put("grp/y", np.zeros(3, dt))
        with s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(7))
    _chmod_readonly(spath)
    c = children(
        """
        assert os.getuid() == 65534
        p = sys.argv[1]
        assert not os.access(p, os.W_OK)
        s = mmstore.Store(p, mode="r")
        a = s.get("x")
        say("X", float(a.sum()), s.attrs("x")["k"], sorted(s), len(s), "x" in s, tuple(s.info("grp/y")["shape"]))
        y = s["grp/y"]
        say("Y", y.dtype.descr)
        r = s.open_reader("g")
        say("G", len(r.array), r.array.tolist())
        r.refresh()
        say("G2", len(r.array))
        try:
            s.put("z", np.zeros(1))
            say("PUT", "noerror")
        except Exception as e:
            say("PUT", type(e).__name__, isinstance(e, PermissionError), isinstance(e, mmstore.MmstoreError))
        try:
            s.get("missing")
        except Exception as e:
            say("MISSING", isinstance(e, KeyError))
        r.close()
        s.close()
        say("END")
        """,
        spath,
        as_user=NOBODY,
    )
    assert c.expect("X") == f"4950.0 1 {['g', 'grp/y', 'x']} 3 True {(3,)}"
    assert c.expect("Y") == str(dt.descr)
    assert c.expect("G") == f"7 {list(range(7))}"
    assert c.expect("G2") == "7"
    assert c.expect("PUT").split() == ["ReadOnlyError", "True", "True"]
    assert c.expect("MISSING") == "True"
    c.expect("END")
    assert c.finish() == 0, c.err
    # and the reader left nothing behind
    assert not any(f.endswith(".tmp") for f in _listing(spath))


def test_unprivileged_follower_of_root_writer(ro_dir, children):
    """Readers need no write permission: a follower that cannot write a single file of the
    store still sees every flushed row (root's writer owns every file, mode 0644/0755)."""
    spath = os.path.join(ro_dir, "store")
    old = os.umask(0o022)
    try:
        s = mmstore.Store(spath)
        w = s.create("g", dtype="<i8", shape=(0,), growable=True)
    finally:
        os.umask(old)
    try:
        w.append(np.arange(5))
        w.flush()
        c = children(
            """
            s = mmstore.Store(sys.argv[1], mode="r")
            r = s.open_reader("g")
            say("LEN", len(r.array))
            r.wait(1000, timeout=120)
            a = r.array
            say("DONE", len(a), bool((a[:1000] == np.arange(1000)).all()))
            """,
            spath,
            as_user=NOBODY,
        )
        assert c.expect("LEN") == "5"
        for i in range(5, 1000, 50):
            w.append(np.arange(i, min(i + 50, 1000)))
            w.flush()
        n, ok = c.expect("DONE", timeout=120).split()
        assert int(n) == 1000 and ok == "True"
        assert c.finish() == 0, c.err
    finally:
        w.close()
        s.close()


# --------------------------------------------------------------------------- more edge cases


def test_bool_bytes_other_than_0_1_roundtrip(spath):
    raw = np.array([0, 1, 2, 255], np.uint8).view(np.bool_)
    with mmstore.Store(spath) as s:
        s.put("b", raw)
        assert s.get("b").view(np.uint8).tolist() == [0, 1, 2, 255]


def test_store_accepts_pathlike(tmp_path):
    with mmstore.Store(tmp_path / "st") as s:
        s.put("x", np.arange(2))
    with mmstore.Store(tmp_path / "st", mode="r") as s:
        assert_bit_exact(s["x"], np.arange(2))


def test_non_store_directory_refused(tmp_path):
    d = tmp_path / "notastore"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    for mode in ("r", "r+", "a", "w-"):
        with pytest.raises((mmstore.MmstoreError, OSError)):
            mmstore.Store(d, mode=mode)
    assert sorted(os.listdir(d)) == ["precious.txt"]


def test_groups_are_not_datasets_and_dataset_and_group_can_share_a_name(spath):
    with mmstore.Store(spath) as s:
        s.put("a", np.arange(1))
        s.put("a/b", np.arange(2))
        s.put("g/x", np.arange(3))
        assert sorted(s) == ["a", "a/b", "g/x"]
        with pytest.raises(KeyError):
            s["g"]
        del s["a"]
        assert sorted(s) == ["a/b", "g/x"]
        assert_bit_exact(s["a/b"], np.arange(2))


def test_non_nfc_and_non_str_names(spath):
    with mmstore.Store(spath) as s:
        with pytest.raises(ValueError) as ei:
            s.put("cafe\u0301", np.zeros(1))
        assert isinstance(ei.value, mmstore.MmstoreError)
        for bad in (123, b"x", None):
            with pytest.raises((TypeError, ValueError)) as ei:
                s.put(bad, np.zeros(1))
            assert isinstance(ei.value, mmstore.MmstoreError), repr(ei.value)
        assert len(s) == 0


def test_bad_create_arguments(spath):
    with mmstore.Store(spath) as s:
        for kw in ({"dtype": "O", "shape": (0,)}, {"dtype": "<i4", "shape": (-1,)}):
            with pytest.raises(ValueError) as ei:
                s.create("g", growable=True, **kw)
            assert isinstance(ei.value, mmstore.MmstoreError), repr(ei.value)
        assert "g" not in s


def test_fixed_size_create_filled_in_place(spath):
    with mmstore.Store(spath) as s:
        with s.create("f", dtype="<f8", shape=(3, 4)) as w:
            w[1] = np.arange(4.0)
            w.flush()
        want = np.zeros((3, 4))
        want[1] = np.arange(4.0)
        assert_bit_exact(s.get("f"), want)


def test_get_fresh_after_other_process_deletes_and_recreates(spath, children):
    with mmstore.Store(spath) as s:
        s.put("x", np.full(8, 1, dtype="<i8"), attrs={"v": 1})
        assert int(s.get("x")[0]) == 1 and s.attrs("x") == {"v": 1}
        gen1 = s.info("x")["generation"]
        c = children(
            """
            s = mmstore.Store(sys.argv[1])
            s.delete("x")
            say("DELETED")
            hear()
            s.put("x", np.full(8, 2, dtype="<i8"), attrs={"v": 2})
            say("PUT")
            hear()
            """,
            spath,
        )
        c.expect("DELETED")
        assert "x" not in s
        with pytest.raises(KeyError):
            s.get("x")
        assert len(s) == 0
        c.send("go")
        c.expect("PUT")
        # same name, same shape and dtype, generation restarts: must not be served from a cache
        assert int(s.get("x")[0]) == 2
        assert s.attrs("x") == {"v": 2}
        assert s.info("x")["generation"] == gen1  # a new dataset of the same name starts over
        c.send("bye")
        assert c.finish() == 0, c.err


def test_reader_len_and_follow(spath):
    with mmstore.Store(spath) as s:
        with s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(10))
            w.flush()
            w.append(np.arange(10, 25))
            w.flush()
        with s.open_reader("g") as r:
            assert len(r) == 25
            blocks = list(r.follow(start=0, idle_timeout=0.05))
            got = np.concatenate(blocks) if blocks else np.zeros(0, "<i8")
            assert_bit_exact(got, np.arange(25, dtype="<i8"))


def test_reader_array_survives_delete_and_replace_of_growable(spath):
    with mmstore.Store(spath) as s:
        with s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(1000))
        r = s.open_reader("g")
        a = r.array
        s.put("g", np.arange(3, dtype="<i2"))  # replace the growable dataset by a fixed one
        assert_bit_exact(a, np.arange(1000, dtype="<i8"))
        b = s.get("g")
        s.delete("g")
        assert_bit_exact(a, np.arange(1000, dtype="<i8"))
        assert_bit_exact(b, np.arange(3, dtype="<i2"))
        r.close()
        assert_bit_exact(a, np.arange(1000, dtype="<i8"))


def test_info_and_get_report_committed_length_while_writer_active(spath, children):
    c = children(
        """
        s = mmstore.Store(sys.argv[1])
        w = s.create("g", dtype="<i4", shape=(0,), growable=True)
        w.append(np.arange(7, dtype="<i4")); w.flush()
        w.append(np.arange(3, dtype="<i4"))  # unflushed
        say("READY")
        hear()
        w.close()
        """,
        spath,
    )
    c.expect("READY")
    with mmstore.Store(spath, mode="r") as s:
        assert tuple(s.info("g")["shape"]) == (7,)
        assert s.info("g")["nbytes"] == 28
        assert_bit_exact(s.get("g"), np.arange(7, dtype="<i4"))
    c.send("close")
    assert c.finish() == 0, c.err
    with mmstore.Store(spath, mode="r") as s:
        assert_bit_exact(s.get("g"), np.concatenate([np.arange(7), np.arange(3)]).astype("<i4"))


BLOCKED_PUT = """
s = mmstore.Store(sys.argv[1])
def blocks():
    for i in range(4):
        yield np.full((1000, 10), i, dtype="<i8")
        say("BLOCK", i)
        hear()
s.put_blocks(sys.argv[2], blocks())
say("COMMITTED")
"""


def test_recovery_does_not_remove_a_live_writers_data_file(spath, children):
    with mmstore.Store(spath) as s:
        s.put("x", np.zeros(3))
    c = children(BLOCKED_PUT, spath, "x")
    c.expect("BLOCK")
    dats_before = [f for f in os.listdir(spath) if f.endswith(".dat")]
    assert len(dats_before) == 2  # the committed generation and the one being written
    for _ in range(3):  # writable opens run recovery while the writer is alive
        with mmstore.Store(spath, mode="a") as s:
            assert_bit_exact(s["x"], np.zeros(3))
        c.send("next")
        c.readline()
    c.send("last")  # the generator asks for its input once more after the last block
    c.expect("COMMITTED")
    assert c.finish() == 0, c.err
    with mmstore.Store(spath, mode="r") as s:
        want = np.concatenate([np.full((1000, 10), i, dtype="<i8") for i in range(4)])
        assert_bit_exact(s["x"], want)


def test_killed_streaming_put_leftover_removed_by_next_writable_open(spath, children):
    with mmstore.Store(spath) as s:
        s.put("grp/sub/x", np.arange(3))
    for name in ("grp/sub/x", "grp/sub/newname"):
        c = children(BLOCKED_PUT, spath, name)
        c.expect("BLOCK")
        c.kill()
        d = os.path.join(spath, "grp", "sub")
        leftovers = [f for f in os.listdir(d) if f.endswith(".dat")]
        assert len(leftovers) >= 2  # the committed file and the dead writer's
        with mmstore.Store(spath, mode="r") as s:
            assert sorted(s) == ["grp/sub/x"]
            assert_bit_exact(s["grp/sub/x"], np.arange(3))
        with mmstore.Store(spath, mode="a") as s:
            assert sorted(s) == ["grp/sub/x"]
        files = _listing(spath)
        dats = [f for f in files if f.endswith(".dat")]
        assert len(dats) == 1, f"unreferenced data files left after a writable open: {dats}"
        assert [f for f in files if f.endswith(".tmp")] == []


def test_planted_leftovers_in_groups_and_for_unknown_names(spath):
    with mmstore.Store(spath) as s:
        s.put("g/h/x", np.arange(3))
    d = os.path.join(spath, "g", "h")
    planted = [
        os.path.join(d, "x.00000000000000aa.dat"),
        os.path.join(d, ".x.00000000000000bb.tmp"),
        os.path.join(d, "ghost.00000000000000cc.dat"),  # first put of a new name, killed
        os.path.join(d, ".ghost.00000000000000dd.tmp"),
    ]
    for p in planted:
        with open(p, "wb") as f:
            f.write(b"\x01" * 16)
    with mmstore.Store(spath, mode="a") as s:
        assert sorted(s) == ["g/h/x"]
    left = [p for p in planted if os.path.exists(p)]
    assert left == [], f"leftovers not cleaned: {left}"
    with mmstore.Store(spath, mode="r") as s:
        assert_bit_exact(s["g/h/x"], np.arange(3))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_with_inherited_handles(spath):
    s = mmstore.Store(spath, timeout=0.5)
    s.put("x", np.full(4, 1))
    assert int(s.get("x")[0]) == 1  # cached in the parent before the fork
    w = s.create("held", dtype="<i8", shape=(0,), growable=True)
    w.append(np.arange(3))
    w.flush()
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            assert os.read(to_child_r, 1) == b"g"
            res = {}
            res["fresh-get-through-inherited-handle"] = int(s.get("x")[0])
            s.put("y", np.arange(2))
            res["put-through-inherited-handle"] = bool((s.get("y") == np.arange(2)).all())
            try:
                w.append(np.arange(100, 103))
                w.flush()
                res["inherited-writer"] = "wrote"
            except mmstore.MmstoreError as e:
                res["inherited-writer"] = type(e).__name__
            os.write(to_parent_w, repr(res).encode())
            code = 0
        except BaseException as e:
            os.write(to_parent_w, f"EXC {e!r}".encode())
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    s.put("x", np.full(4, 2))  # a commit after the fork
    os.write(to_child_w, b"g")
    os.close(to_child_w)
    chunks = []
    while True:
        b = os.read(to_parent_r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(to_parent_r)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, out
    res = eval(out)
    assert res["fresh-get-through-inherited-handle"] == 2
    assert res["put-through-inherited-handle"] is True
    # the parent is the writer: the child's inherited copy must not write as a second writer
    assert res["inherited-writer"] != "wrote", res
    w.close()
    assert_bit_exact(s.get("held"), np.arange(3, dtype="<i8"))
    assert_bit_exact(s.get("y"), np.arange(2))
    s.close()


def test_other_user_cannot_write_and_gets_permission_errors(ro_dir, children):
    spath = os.path.join(ro_dir, "store")
    old = os.umask(0o022)
    try:
        with mmstore.Store(spath) as s:
            s.put("x", np.arange(4))
            s.put("secret", np.arange(4))
    finally:
        os.umask(old)
    for f in os.listdir(spath):
        if f.startswith("secret"):
            os.chmod(os.path.join(spath, f), 0o600)
    c = children(
        """
        p = sys.argv[1]
        def show(tag, fn):
            try:
                fn()
                say(tag, "noerror")
            except Exception as e:
                say(tag, type(e).__name__, isinstance(e, PermissionError), isinstance(e, mmstore.MmstoreError))
        def open_a_and_put():
            s = mmstore.Store(p, mode="a")
            try:
                s.put("z", np.zeros(1))
            finally:
                s.close()
        show("PUT", open_a_and_put)
        s = mmstore.Store(p, mode="r")
        show("SECRET", lambda: s.get("secret"))
        say("X", s.get("x").tolist())
        """,
        spath,
        as_user=NOBODY,
    )
    put = c.expect("PUT").split()
    assert put[1:] == ["True", "True"], put
    sec = c.expect("SECRET").split()
    assert sec[1:] == ["True", "True"], sec
    assert c.expect("X") == "[0, 1, 2, 3]"
    assert c.finish() == 0, c.err
    with mmstore.Store(spath, mode="r") as s:
        assert sorted(s) == ["secret", "x"]


def test_new_name_invisible_until_committed(spath, children):
    mmstore.Store(spath).close()
    c = children(BLOCKED_PUT, spath, "fresh")
    c.expect("BLOCK")
    with mmstore.Store(spath, mode="r") as s:
        assert "fresh" not in s
        assert list(s) == [] and len(s) == 0
        with pytest.raises(KeyError):
            s.get("fresh")
    for _ in range(4):
        c.send("next")
    c.expect("BLOCK")
    c.expect("BLOCK")
    c.expect("BLOCK")
    c.expect("COMMITTED")
    assert c.finish() == 0, c.err
    with mmstore.Store(spath, mode="r") as s:
        assert list(s) == ["fresh"]
        assert s["fresh"].shape == (4000, 10)


def test_put_on_dataset_with_open_writer_in_same_handle_times_out(spath):
    with mmstore.Store(spath, timeout=0.3) as s:
        with s.create("g", dtype="<i4", shape=(0,), growable=True) as w:
            w.append(np.arange(3, dtype="<i4"))
            w.flush()
            for op in (lambda: s.put("g", np.zeros(1)), lambda: s.delete("g")):
                with pytest.raises(TimeoutError) as ei:
                    op()
                assert isinstance(ei.value, mmstore.LockTimeout)
            w.append(np.int32(3))
        assert_bit_exact(s["g"], np.arange(4, dtype="<i4"))


def test_growable_needs_a_first_axis_and_fixed_datasets_do_not_grow(spath):
    with mmstore.Store(spath) as s:
        with pytest.raises(ValueError) as ei:
            s.create("z", dtype="<i4", shape=(), growable=True)
        assert isinstance(ei.value, mmstore.MmstoreError)
        assert "z" not in s
        with s.create("f", dtype="<i4", shape=(3,)) as w, pytest.raises(mmstore.MmstoreError):
            w.append(np.int32(1))
        assert_bit_exact(s["f"], np.zeros(3, "<i4"))


def test_append_accepts_lossless_conversions(spath):
    with mmstore.Store(spath) as s:
        with s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(3, dtype=">i8"))
            w.append(np.arange(3, 5, dtype="<i2"))
            w.append(5)
            w[-1] = 50
            assert len(w) == 6
        assert_bit_exact(s["g"], np.array([0, 1, 2, 3, 4, 50], "<i8"))


def test_writer_array_is_writable_view(spath):
    with mmstore.Store(spath) as s:
        with s.create("g", dtype="<f8", shape=(0, 2), growable=True) as w:
            w.append(np.zeros((4, 2)))
            arr = w.array
            assert arr.flags.writeable
            assert arr.shape[0] == 4
            arr[2, 1] = 7.5
            w.flush()
        assert s["g"][2, 1] == 7.5


def test_reader_in_other_process_follows_growth_past_capacity(spath, children):
    with mmstore.Store(spath) as s:
        w = s.create("g", dtype="<u8", shape=(0,), growable=True)
        try:
            w.append(np.arange(2, dtype="<u8"))
            w.flush()
            c = children(
                """
                s = mmstore.Store(sys.argv[1], mode="r")
                r = s.open_reader("g")
                first = r.array
                say("LEN", len(first))
                r.wait(3_000_000, timeout=120)
                a = r.array
                say("GROWN", len(a), bool((a == np.arange(len(a), dtype=np.uint64)).all()), first.tolist())
                """,
                spath,
            )
            assert c.expect("LEN") == "2"
            for i in range(2, 3_000_000, 500_000):
                w.append(np.arange(i, min(i + 500_000, 3_000_000), dtype="<u8"))
            w.flush()
            assert c.expect("GROWN", timeout=120) == "3000000 True [0, 1]"
            assert c.finish() == 0, c.err
        finally:
            w.close()


@pytest.mark.parametrize(
    "dt",
    [
        pytest.param(np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]}), id="reordered"),
        pytest.param(np.dtype({"names": ["a", "b"], "formats": ["<i8", "<i4"], "offsets": [0, 2]}), id="overlapping"),
        pytest.param(np.dtype({"names": [], "formats": [], "itemsize": 8}), id="no-fields"),
        pytest.param(np.dtype([("a", "<i4"), ("e", "V0")]), id="zero-size-field"),
    ],
)
def test_odd_structured_dtypes_roundtrip_or_refused_cleanly(spath, dt):
    arr = _random_bytes_array(dt, (5,)) if dt.itemsize else np.zeros(5, dt)
    with mmstore.Store(spath) as s:
        try:
            s.put("x", arr)
        except ValueError as e:
            assert isinstance(e, mmstore.MmstoreError), repr(e)
            assert "x" not in s
            return
        got = s.get("x")
        assert got.dtype == arr.dtype
        assert got.dtype.fields == arr.dtype.fields
        assert bits(got) == bits(arr)


# --------------------------------------------------------------------------- header validation (invariant 6)


def _sidecar(spath, name):
    return os.path.join(spath, name + ".json")


def _datafile(spath, name):
    import json

    with open(_sidecar(spath, name)) as f:
        h = json.load(f)
    return os.path.join(os.path.dirname(_sidecar(spath, name)), h["data_file"]), h


def _edit_sidecar(spath, name, **changes):
    import json

    p = _sidecar(spath, name)
    with open(p) as f:
        h = json.load(f)
    h.update(changes)
    with open(p + ".new", "w") as f:
        json.dump(h, f)
    os.replace(p + ".new", p)


def _write(path, data, mode="w"):
    with open(path, mode) as f:
        f.write(data)


CORRUPTIONS = {
    "truncated-data": lambda sp: os.truncate(_datafile(sp, "bad")[0], 100),
    "empty-data": lambda sp: os.truncate(_datafile(sp, "bad")[0], 0),
    "extended-data": lambda sp: _write(_datafile(sp, "bad")[0], b"\0" * 8, "ab"),
    "missing-data": lambda sp: os.unlink(_datafile(sp, "bad")[0]),
    "bad-json": lambda sp: _write(_sidecar(sp, "bad"), '{"format": "mmstore-dataset", '),
    "empty-sidecar": lambda sp: _write(_sidecar(sp, "bad"), ""),
    "wrong-shape": lambda sp: _edit_sidecar(sp, "bad", shape=[1000, 1000]),
    "negative-shape": lambda sp: _edit_sidecar(sp, "bad", shape=[-8]),
    "wrong-dtype": lambda sp: _edit_sidecar(sp, "bad", dtype="<c16"),
    "object-dtype": lambda sp: _edit_sidecar(sp, "bad", dtype="|O"),
    "garbage-dtype": lambda sp: _edit_sidecar(sp, "bad", dtype="not a dtype"),
    "wrong-offset": lambda sp: _edit_sidecar(sp, "bad", offset=64),
    "negative-offset": lambda sp: _edit_sidecar(sp, "bad", offset=-8),
    "escaping-data-file": lambda sp: _edit_sidecar(sp, "bad", data_file="../good.json"),
    "future-version": lambda sp: _edit_sidecar(sp, "bad", version=99),
    "not-an-object": lambda sp: _write(_sidecar(sp, "bad"), "[1, 2, 3]\n"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_dataset_gives_format_error_and_hides_nothing(spath, children, kind):
    with mmstore.Store(spath) as s:
        s.put("good", np.arange(10, dtype="<f8"))
        s.put("bad", np.arange(512, dtype="<i8"))
    CORRUPTIONS[kind](spath)
    # run in a child so that a SIGBUS/crash shows up as a failure, not as a dead test run
    c = children(
        """
        s = mmstore.Store(sys.argv[1], mode="r")
        say("LIST", sorted(s))
        for what in ("get", "info", "attrs", "open_reader"):
            try:
                x = getattr(s, what)("bad")
                if what == "get":
                    x = int(np.asarray(x).view(np.uint8).sum())
                if what == "open_reader":
                    x = int(np.asarray(x.array).view(np.uint8).sum())
                say("OP", what, "noerror")
            except Exception as e:
                say("OP", what, type(e).__name__, isinstance(e, mmstore.FormatError), isinstance(e, ValueError),
                    isinstance(e, mmstore.MmstoreError), "bad" in str(e), json.dumps(str(e)))
        say("GOOD", s.get("good").tolist())
        """,
        spath,
    )
    assert c.expect("LIST") == "['bad', 'good']"
    for what in ("get", "info", "attrs", "open_reader"):
        line = c.expect("OP")
        parts = line.split(" ", 6)
        if (
            what in ("info", "attrs")
            and kind
            in (
                "truncated-data",
                "empty-data",
                "extended-data",
                "missing-data",
                "wrong-shape",
                "wrong-dtype",
                "wrong-offset",
            )
            and parts[1] == "noerror"
        ):
            # a header-only operation need not look at the data file; these headers are
            # self-consistent and only disagree with the data file's size (get must catch it)
            continue
        # parts[1] is the class name: a subclass of FormatError is fine
        assert parts[0] == what and parts[2:6] == ["True", "True", "True", "True"], (kind, line)
    assert c.expect("GOOD") == str([float(x) for x in range(10)])
    assert c.finish() == 0, c.err


GROW_CORRUPTIONS = {
    "length-past-capacity": (8, (10**12).to_bytes(8, "little")),
    "length-just-past-file": (8, None),  # filled in below: capacity + 1
    "bad-magic": (0, b"XXXXXXXX"),
}


@pytest.mark.parametrize("kind", sorted(GROW_CORRUPTIONS))
def test_corrupt_growable_control_block_is_format_error_not_sigbus(spath, children, kind):
    with mmstore.Store(spath) as s:
        s.put("good", np.arange(3))
        with s.create("bad", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(10))
    data, h = _datafile(spath, "bad")
    off, payload = GROW_CORRUPTIONS[kind]
    if payload is None:
        capacity = (os.path.getsize(data) - h["offset"]) // 8
        payload = (capacity + 1).to_bytes(8, "little")
    fd = os.open(data, os.O_WRONLY)
    try:
        os.pwrite(fd, payload, off)
    finally:
        os.close(fd)
    c = children(
        """
        s = mmstore.Store(sys.argv[1], mode="r")
        for what in ("get", "open_reader"):
            try:
                x = getattr(s, what)("bad")
                a = x if what == "get" else x.array
                say("OP", what, "noerror", len(a), int(np.asarray(a).sum()))
            except Exception as e:
                say("OP", what, type(e).__name__, isinstance(e, mmstore.FormatError), "bad" in str(e))
        say("GOOD", s.get("good").tolist())
        """,
        spath,
    )
    for what in ("get", "open_reader"):
        line = c.expect("OP")
        assert line.split()[:4] == [what, "FormatError", "True", "True"], (kind, line, c.stderr_now())
    assert c.expect("GOOD") == "[0, 1, 2]"
    assert c.finish() == 0, c.err


def test_newer_manifest_version_refused(spath):
    import json

    with mmstore.Store(spath) as s:
        s.put("x", np.arange(2))
    p = os.path.join(spath, "mmstore.json")
    with open(p) as f:
        m = json.load(f)
    m["version"] = 999
    with open(p, "w") as f:
        json.dump(m, f)
    with pytest.raises(mmstore.FormatError) as ei:
        mmstore.Store(spath, mode="r")
    assert "upgrade" in str(ei.value).lower()
    assert isinstance(ei.value, ValueError)


# --------------------------------------------------------------------------- concurrent store creation and fork hazards


def test_concurrent_w_minus_exactly_one_wins(spath, children):
    procs = [
        children(
            """
            say("READY")
            hear()
            try:
                s = mmstore.Store(sys.argv[1], mode="w-")
                s.put("who", np.array([int(sys.argv[2])]))
                s.close()
                say("RESULT", "won")
            except Exception as e:
                say("RESULT", type(e).__name__, isinstance(e, mmstore.MmstoreError), isinstance(e, FileExistsError))
            """,
            spath,
            k,
        )
        for k in range(4)
    ]
    for p in procs:
        p.expect("READY")
    for p in procs:
        p.send("go")
    results = [p.expect("RESULT") for p in procs]
    for p in procs:
        assert p.finish() == 0, p.err
    assert results.count("won") == 1, results
    for r in results:
        if r != "won":
            assert r.split()[1:] == ["True", "True"], r
    with mmstore.Store(spath, mode="r") as s:
        assert list(s) == ["who"]


def test_concurrent_mode_a_creation_all_succeed(spath, children):
    procs = [
        children(
            """
            say("READY")
            hear()
            with mmstore.Store(sys.argv[1], mode="a") as s:
                s.put(f"p{sys.argv[2]}", np.array([int(sys.argv[2])]))
            say("OK")
            """,
            spath,
            k,
        )
        for k in range(4)
    ]
    for p in procs:
        p.expect("READY")
    for p in procs:
        p.send("go")
    for p in procs:
        p.expect("OK")
        assert p.finish() == 0, p.err
    with mmstore.Store(spath, mode="r") as s:
        assert sorted(s) == ["p0", "p1", "p2", "p3"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_closing_inherited_writer_does_not_release_parents_lock(spath, children):
    import gc

    s = mmstore.Store(spath, timeout=0.5)
    w = s.create("held", dtype="<i8", shape=(0,), growable=True)
    w.append(np.arange(3))
    w.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                w.close()
            except mmstore.MmstoreError:
                pass
            try:
                s.close()
            except mmstore.MmstoreError:
                pass
            gc.collect()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent still is the only writer of "held"
    c = children(
        """
        s = mmstore.Store(sys.argv[1], timeout=0.5)
        try:
            s.open_writer("held").close()
            say("R", "got-the-lock")
        except mmstore.LockTimeout:
            say("R", "LockTimeout")
        """,
        spath,
    )
    assert c.expect("R") == "LockTimeout", "a forked child's close() released the parent's writer lock"
    assert c.finish() == 0, c.err
    w.append(np.arange(3, 5))
    w.flush()
    w.close()
    assert_bit_exact(s.get("held"), np.arange(5, dtype="<i8"))
    s.close()


def test_reader_wait_without_min_len_wakes_on_any_flush(spath, children):
    with mmstore.Store(spath) as s:
        w = s.create("g", dtype="<i8", shape=(0,), growable=True)
        try:
            c = children(
                """
                s = mmstore.Store(sys.argv[1], mode="r")
                r = s.open_reader("g")
                say("READY", len(r.array))
                r.wait(timeout=120)
                say("WOKE", len(r.array))
                """,
                spath,
            )
            assert c.expect("READY") == "0"
            w.append(np.int64(1))
            w.flush()
            assert c.expect("WOKE", timeout=120) == "1"
            assert c.finish() == 0, c.err
        finally:
            w.close()


def test_items_keys_values(spath):
    with mmstore.Store(spath) as s:
        s["a"] = np.arange(2)
        s["g/b"] = np.arange(3)
        assert sorted(s.keys()) == ["a", "g/b"]
        d = dict(s.items())
        assert sorted(d) == ["a", "g/b"]
        assert_bit_exact(d["g/b"], np.arange(3))
        assert sorted(len(v) for v in s.values()) == [2, 3]
        assert list(s.keys("g")) == ["g/b"] or list(s.keys("g/")) == ["g/b"]


# --------------------------------------------------------------------------- more API edges


def test_two_handles_in_one_process_never_serve_stale_data(spath):
    a = mmstore.Store(spath)
    b = mmstore.Store(spath)
    try:
        a.put("x", np.full(4, 1))
        assert int(b.get("x")[0]) == 1
        assert int(a.get("x")[0]) == 1
        b.put("x", np.full(4, 2))
        assert int(a.get("x")[0]) == 2
        assert a.info("x")["generation"] == 2
        b.delete("x")
        assert "x" not in a
        with pytest.raises(KeyError):
            a.get("x")
        b.put("x", np.full(4, 3), attrs={"k": 3})
        assert int(a["x"][0]) == 3 and a.attrs("x") == {"k": 3}
        with b.create("g", dtype="<i4", shape=(0,), growable=True) as w:
            w.append(np.arange(5, dtype="<i4"))
            w.flush()
            assert a.get("g").shape == (5,)
    finally:
        a.close()
        b.close()


def test_attrs_edge_values(spath):
    with mmstore.Store(spath) as s:
        attrs = {"big": 2**70, "neg": -(2**63), "f": 1e308, "tiny": 5e-324, "empty": {}, "list": [], "s": '\u0000\n"\\'}
        s.put("x", np.zeros(1), attrs=attrs)
        assert s.attrs("x") == attrs
        assert s.info("x")["attrs"] == attrs
        for bad in ([1, 2], "text", {1: "non-str key"}, {"f": np.float64("inf")}):
            with pytest.raises((ValueError, TypeError)) as ei:
                s.put("y", np.zeros(1), attrs=bad)
            assert isinstance(ei.value, mmstore.MmstoreError), repr(ei.value)
        assert "y" not in s


@pytest.mark.parametrize("value", [10**400, -(2**1100)], ids=["1e400-int", "-2^1100-int"])
def test_attrs_integer_beyond_double_range_refused(spath, value):
    """docs/FORMAT.md, sidecar table: attrs are 'plain JSON (strict: no NaN or Infinity, no
    number beyond a double's range)'. A float 1e400 is refused when a sidecar is read; an
    integer of the same size must not be written either (a C or JavaScript reader of the
    format parses JSON numbers as doubles and would get infinity)."""
    with mmstore.Store(spath) as s:
        with pytest.raises(ValueError) as ei:
            s.put("y", np.zeros(1), attrs={"n": value})
        assert isinstance(ei.value, mmstore.MmstoreError)
        assert "y" not in s


def test_put_waits_for_a_writer_that_releases_within_timeout(spath, children):
    import threading

    h = children(HOLD_WRITER, spath, "g", "create")
    h.expect("HOLDING")
    t = threading.Timer(0.5, lambda: h.send("release"))
    t.start()
    try:
        with mmstore.Store(spath, timeout=120) as s:
            s.put("g", np.arange(2, dtype="<i2"))  # waits for the lock, then replaces
            assert_bit_exact(s["g"], np.arange(2, dtype="<i2"))
    finally:
        t.join()
    h.expect("RELEASED")
    assert h.finish() == 0, h.err


def test_name_length_limits(spath):
    with mmstore.Store(spath) as s:
        s.put("é" * 100, np.zeros(1))  # 200 bytes of UTF-8: the limit
        with pytest.raises(ValueError):
            s.put("é" * 100 + "a", np.zeros(1))  # 201 bytes
        long_ok = "/".join(["p" * 99] * 10) + "/" + "q" * 24  # 1024 characters
        assert len(long_ok) == 1024
        s.put(long_ok, np.zeros(1))
        with pytest.raises(ValueError):
            s.put(long_ok + "q", np.zeros(1))  # 1025 characters
        assert sorted(s) == sorted(["é" * 100, long_ok])


def test_append_nested_tuple_rows(spath):
    dt = np.dtype([("a", [("b", "<i2"), ("c", ">f4", (2,))]), ("d", "S3")])
    with mmstore.Store(spath) as s:
        with s.create("g", dtype=dt, shape=(0,), growable=True) as w:
            w.append(((1, (2.0, 3.0)), b"xyz"))
            w.append(np.array([((4, (5.0, 6.0)), b"ab")], dt))
            w[0] = ((7, (8.0, 9.0)), b"q")
        want = np.array([((7, (8.0, 9.0)), b"q"), ((4, (5.0, 6.0)), b"ab")], dt)
        assert_bit_exact(s["g"], want)


def test_readonly_store_flush_and_close_are_harmless(spath):
    with mmstore.Store(spath) as s:
        s.put("x", np.arange(3))
    before = _listing(spath)
    r = mmstore.Store(spath, mode="r")
    r.flush()
    r.close()
    r.close()
    assert _listing(spath) == before


def test_timestamps_are_posix_seconds(spath):
    import time as _t

    with mmstore.Store(spath) as s:
        s.put("x", np.zeros(1))
        i = s.info("x")
        now = _t.time()
        assert abs(i["created"] - now) < 3600 and abs(i["modified"] - now) < 3600
