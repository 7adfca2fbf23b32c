"""Black-box acceptance tests for the mmstore CLI (issue 4) and the cache (issue 5).

Written from DESIGN.md, the issue texts, README.md, docs/HDF5.md and `mmstore --help`
only. Every CLI call runs the installed command in a real subprocess; every
multi-process cache behaviour runs in real processes that synchronise through files.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
import mmstore  # noqa: E402

MMSTORE = str(Path(sys.executable).parent / "mmstore")
TIMEOUT = 120
ENV = dict(os.environ, COLUMNS="250", NO_COLOR="1", PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------- helpers
def run(*args, input=None, text=True, cwd=None, timeout=TIMEOUT, module=False):
    cmd = ([sys.executable, "-m", "mmstore.cli"] if module else [MMSTORE]) + [str(a) for a in args]
    return subprocess.run(cmd, input=input, capture_output=True, text=text, cwd=cwd, timeout=timeout, env=ENV)


def ok(*args, **kw):
    p = run(*args, **kw)
    out = p.stdout if isinstance(p.stdout, str) else p.stdout.decode(errors="replace")
    err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode(errors="replace")
    assert p.returncode == 0, f"mmstore {args} -> {p.returncode}\nstdout:{out[-2000:]}\nstderr:{err[-2000:]}"
    return p


def assert_one_line_error(p, code=1, *must_contain):
    err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode(errors="replace")
    out = p.stdout if isinstance(p.stdout, str) else p.stdout.decode(errors="replace")
    assert p.returncode == code, f"expected exit {code}, got {p.returncode}\n{out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    for word in must_contain:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def assert_usage_error(p):
    err = p.stderr + p.stdout
    assert p.returncode == 2, (p.returncode, err)
    assert "Traceback" not in err


def same(a, b):
    """Bit-exact: same dtype, shape and bytes."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


REC = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i2"), ("t", "<i2")])


def sample_arrays():
    rng = np.random.default_rng(1234)
    nested = np.dtype([("id", "<u8"), ("xy", "<f4", (2,)), ("meta", [("flag", "?"), ("tag", "S3")])])
    nest = np.zeros(5, nested)
    nest["id"] = np.arange(5)
    nest["xy"] = rng.random((5, 2))
    nest["meta"]["flag"] = [True, False, True, False, True]
    nest["meta"]["tag"] = [b"a", b"bb", b"ccc", b"", b"z"]
    rec = np.zeros(4, REC)
    rec["chr"] = [b"chr1", b"chr2", b"chrX", b"chrM"]
    rec["pos"] = [1, 2**31 - 1, -5, 0]
    rec["pct"] = [0.5, 0.1, np.nan, -0.0]
    rec["c"] = [1, 2, 3, 4]
    rec["t"] = [-1, -2, 32767, -32768]
    return {
        "f8": rng.standard_normal((7, 3)),
        "f4_special": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38], "<f4"),
        "i1": np.array([-128, 0, 127], "i1"),
        "u8": np.array([0, 2**64 - 1, 12345], "<u8"),
        "be_i4": np.arange(10, dtype=">i4"),
        "bool": np.array([True, False, True]),
        "c16": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype("c16"),
        "dt": np.array(["2020-01-01T00:00:00.123", "NaT", "1969-12-31T23:59:59"], "datetime64[ms]"),
        "td": np.array([1, -2, 3], "timedelta64[s]"),
        "bytes": np.array([b"abc", b"", b"xy\x00z"], "S4"),
        "unicode": np.array(["héllo", "", "日本語"], "<U5"),
        "rec": rec,
        "nested": nest,
        "scalar": np.array(3.25),
        "empty": np.zeros((0, 4), "<i2"),
        "grp/sub/deep": np.arange(24, dtype="<u2").reshape(2, 3, 4),
    }


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


# ---------------------------------------------------------------------------- basics
def test_import_mmstore_does_not_import_cli_deps():
    code = (
        "import sys, mmstore; bad = [m for m in ('typer', 'rich', 'h5py') if m in sys.modules];"
        "print(repr(bad)); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize(
    "cmd",
    [
        "",
        "put",
        "get",
        "ls",
        "info",
        "rm",
        "verify",
        "recover",
        "tail",
        "compact",
        "import",
        "demo",
        "cache",
        "cache info",
        "cache clear",
    ],
)
def test_help_for_every_command(cmd):
    p = ok(*([*cmd.split(), "--help"]))
    assert "Usage" in p.stdout


def test_python_dash_m_cli_works(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(5))
    ok("put", tmp_path / "s", "a", tmp_path / "a.npy", module=True)
    p = ok("ls", tmp_path / "s", "--json", module=True)
    assert [d["name"] for d in json.loads(p.stdout)] == ["a"]


# ---------------------------------------------------------------------------- put/get npy
def test_put_get_npy_roundtrip_every_dtype(tmp_path, store_path):
    arrays = sample_arrays()
    for name, arr in arrays.items():
        src = tmp_path / f"in_{name.replace('/', '_')}.npy"
        np.save(src, arr)
        ok("put", store_path, name, src)
    for name, arr in arrays.items():
        out = tmp_path / f"out_{name.replace('/', '_')}.npy"
        ok("get", store_path, name, "-o", out)
        same(np.load(out), arr)
        # and the library sees the same array
    with mmstore.Store(store_path, "r") as s:
        assert sorted(s.keys()) == sorted(arrays)
        for name, arr in arrays.items():
            same(s.get(name), arr)


def test_get_to_piped_stdout_is_npy_stream(tmp_path, store_path):
    arrays = sample_arrays()
    for name in ("f8", "rec", "unicode", "scalar", "empty", "dt"):
        src = tmp_path / "x.npy"
        np.save(src, arrays[name])
        ok("put", store_path, name, src)
        p = ok("get", store_path, name, text=False)
        same(np.load(io.BytesIO(p.stdout)), arrays[name])


def test_put_from_stdin_dash(store_path):
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(50, 6)).astype("<i8")
    buf = io.BytesIO()
    np.save(buf, arr)
    ok("put", store_path, "from/stdin", "-", input=buf.getvalue(), text=False)
    with mmstore.Store(store_path, "r") as s:
        same(s["from/stdin"], arr)


def test_put_large_npy_streams_and_roundtrips(tmp_path, store_path):
    arr = np.random.default_rng(5).random((3_000_000, 3))  # ~69 MiB
    np.save(tmp_path / "big.npy", arr)
    ok("--quiet", "put", store_path, "big", tmp_path / "big.npy")
    ok("--quiet", "get", store_path, "big", "-o", tmp_path / "big_out.npy")
    same(np.load(tmp_path / "big_out.npy", mmap_mode="r"), arr)


def test_put_npz_one_dataset_per_member(tmp_path, store_path):
    a, b = np.arange(5.0), np.array([[1, 2], [3, 4]], "i2")
    np.savez(tmp_path / "in.npz", alpha=a, beta=b)
    ok("put", store_path, "bundle", tmp_path / "in.npz")
    with mmstore.Store(store_path, "r") as s:
        assert sorted(s.keys()) == ["bundle/alpha", "bundle/beta"]
        same(s["bundle/alpha"], a)
        same(s["bundle/beta"], b)


def test_put_from_hdf5_dataset(tmp_path, store_path):
    arr = np.arange(60, dtype="<f4").reshape(10, 6)
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f.create_dataset("g/data", data=arr)
    ok("put", store_path, "fromh5", f"{tmp_path / 'src.h5'}:/g/data")
    with mmstore.Store(store_path, "r") as s:
        same(s["fromh5"], arr)


def test_put_attrs_parsed_as_json_when_possible(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    ok(
        "put",
        store_path,
        "a",
        tmp_path / "a.npy",
        "--attr",
        "unit=px",
        "--attr",
        "n=3",
        "--attr",
        "list=[1, 2]",
        "--attr",
        "flag=true",
        "--attr",
        "eq=a=b",
    )
    p = ok("info", store_path, "a", "--json")
    attrs = json.loads(p.stdout)["attrs"]
    assert attrs == {"unit": "px", "n": 3, "list": [1, 2], "flag": True, "eq": "a=b"}


def test_put_replaces_existing_dataset(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    np.save(tmp_path / "b.npy", np.arange(10.0))
    ok("put", store_path, "x", tmp_path / "a.npy")
    g1 = json.loads(ok("info", store_path, "x", "--json").stdout)["generation"]
    ok("put", store_path, "x", tmp_path / "b.npy")
    info = json.loads(ok("info", store_path, "x", "--json").stdout)
    assert info["generation"] > g1
    with mmstore.Store(store_path, "r") as s:
        same(s["x"], np.arange(10.0))


# ---------------------------------------------------------------------------- text input
def test_put_csv_plain_float_roundtrip(tmp_path, store_path):
    arr = np.random.default_rng(3).standard_normal((40, 5))
    arr[0, 0] = 1e-300
    arr[1, 1] = -0.0
    arr[2, 2] = 123456789.123456789
    np.savetxt(tmp_path / "in.csv", arr, delimiter=",", fmt="%.17g")
    ok("put", store_path, "t", tmp_path / "in.csv")
    with mmstore.Store(store_path, "r") as s:
        same(s["t"], arr)
    # get -o csv then put it back: bit-exact
    ok("get", store_path, "t", "-o", tmp_path / "out.csv")
    ok("put", store_path, "t2", tmp_path / "out.csv", "--dtype", "f8")
    with mmstore.Store(store_path, "r") as s:
        same(s["t2"], arr)


def test_put_txt_whitespace_default_and_skip_rows(tmp_path, store_path):
    (tmp_path / "in.txt").write_text("# header line\nsecond header\n1 2 3\n4   5\t6\n7 8 9\n")
    ok("put", store_path, "w", tmp_path / "in.txt", "--skip-rows", "2", "--dtype", "i4")
    with mmstore.Store(store_path, "r") as s:
        same(s["w"], np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], "i4"))


def test_put_csv_custom_delimiter_structured_genomic(tmp_path, store_path):
    lines = ["chr;pos;pct;c;t"]
    rows = []
    rng = np.random.default_rng(7)
    for i in range(500):
        r = (
            f"chr{i % 23 + 1}".encode(),
            int(rng.integers(0, 2**31 - 1)),
            float(np.float32(rng.random())),
            int(rng.integers(0, 1000)),
            int(rng.integers(0, 1000)),
        )
        rows.append(r)
        lines.append(f"{r[0].decode()};{r[1]};{np.float32(r[2])};{r[3]};{r[4]}")
    (tmp_path / "g.csv").write_text("\n".join(lines) + "\n")
    ok(
        "put",
        store_path,
        "genome/chr",
        tmp_path / "g.csv",
        "--delimiter",
        ";",
        "--skip-rows",
        "1",
        "--dtype",
        "chr:S10,pos:i4,pct:f4,c:i2,t:i2",
    )
    expected = np.array(rows, REC)
    with mmstore.Store(store_path, "r") as s:
        got = s["genome/chr"]
        assert got.dtype.names == REC.names
        for f in REC.names:
            assert np.array_equal(got[f], expected[f]), f
    # get -o .txt, then put back with the dtype info shows -> same values
    ok("get", store_path, "genome/chr", "-o", tmp_path / "back.txt")
    dt = json.loads(ok("info", store_path, "genome/chr", "--json").stdout)["dtype"]
    ok("put", store_path, "genome/back", tmp_path / "back.txt", "--dtype", dt)
    with mmstore.Store(store_path, "r") as s:
        same(s["genome/back"], s["genome/chr"])


def test_text_roundtrip_of_tricky_dtypes(tmp_path, store_path):
    arrs = sample_arrays()
    for name in ("f4_special", "bool", "dt", "td", "u8", "i1", "rec"):
        np.save(tmp_path / "a.npy", arrs[name])
        ok("put", store_path, name, tmp_path / "a.npy")
        for suffix in (".csv", ".txt"):
            out = tmp_path / f"{name}{suffix}"
            ok("get", store_path, name, "-o", out)
            dt = json.loads(ok("info", store_path, name, "--json").stdout)["dtype"]
            ok("put", store_path, f"back/{name}{suffix[1:]}", out, "--dtype", dt)
            with mmstore.Store(store_path, "r") as s:
                same(s[f"back/{name}{suffix[1:]}"], arrs[name])


def test_csv_quoted_field_with_delimiter_roundtrip(tmp_path, store_path):
    arr = np.zeros(3, [("name", "S12"), ("v", "<i4")])
    arr["name"] = [b"a,b", b"plain", b'q"x']
    arr["v"] = [1, 2, 3]
    np.save(tmp_path / "a.npy", arr)
    ok("put", store_path, "q", tmp_path / "a.npy")
    ok("get", store_path, "q", "-o", tmp_path / "q.csv")
    dt = json.loads(ok("info", store_path, "q", "--json").stdout)["dtype"]
    ok("put", store_path, "q2", tmp_path / "q.csv", "--dtype", dt)
    with mmstore.Store(store_path, "r") as s:
        same(s["q2"], arr)


def test_malformed_csv_names_line_and_column(tmp_path, store_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5,6\n7,oops,9\n")
    p = run("put", store_path, "bad", tmp_path / "bad.csv", "--dtype", "i4")
    line = assert_one_line_error(p, 1, "line 3")
    assert "column 2" in line.lower() or "col 2" in line.lower(), line
    # the failed put leaves no dataset behind (and removes the store it created)
    assert not (store_path / "bad.json").exists()


def test_csv_ragged_row_is_an_error(tmp_path, store_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5\n7,8,9\n")
    p = run("put", store_path, "bad", tmp_path / "bad.csv")
    assert_one_line_error(p, 1, "line 2")


def test_failed_put_removes_store_it_created(tmp_path, store_path):
    (tmp_path / "bad.csv").write_text("1,2\nx,y\n")
    p = run("put", store_path, "bad", tmp_path / "bad.csv", "--dtype", "i4")
    assert p.returncode == 1
    assert not store_path.exists()


# ---------------------------------------------------------------------------- get options
def test_get_slice(tmp_path, store_path):
    arr = np.arange(1000 * 3, dtype="<i8").reshape(1000, 3)
    np.save(tmp_path / "a.npy", arr)
    ok("put", store_path, "a", tmp_path / "a.npy")
    for spec, sl in (
        ("100:200", slice(100, 200)),
        ("::7", slice(None, None, 7)),
        ("-5:", slice(-5, None)),
        ("990:2000", slice(990, 2000)),
    ):
        p = ok("get", store_path, "a", "--slice", spec, text=False)
        same(np.load(io.BytesIO(p.stdout)), arr[sl])
    ok("get", store_path, "a", "--slice", "10:20", "-o", tmp_path / "s.csv")
    got = np.loadtxt(tmp_path / "s.csv", delimiter=",", dtype="<i8")
    assert np.array_equal(got, arr[10:20])


def test_get_bad_slice_is_an_error(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(10))
    ok("put", store_path, "a", tmp_path / "a.npy")
    p = run("get", store_path, "a", "--slice", "a:b")
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr


def test_get_unknown_suffix_is_an_error(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(10))
    ok("put", store_path, "a", tmp_path / "a.npy")
    p = run("get", store_path, "a", "-o", tmp_path / "out.xyz")
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr
    assert not (tmp_path / "out.xyz").exists() or (tmp_path / "out.xyz").stat().st_size == 0


# ---------------------------------------------------------------------------- ls / info / rm
def _populate(tmp_path, store_path, arrays=None):
    arrays = (
        arrays
        if arrays is not None
        else {"a": np.arange(3), "g/b": np.ones((2, 2)), "g/c": np.zeros(4, "u1"), "h/d": np.arange(5.0)}
    )
    for name, arr in arrays.items():
        np.save(tmp_path / "tmp.npy", arr)
        ok("put", store_path, name, tmp_path / "tmp.npy")
    return arrays


def test_ls_json_and_table(tmp_path, store_path):
    arrays = _populate(tmp_path, store_path)
    entries = json.loads(ok("ls", store_path, "--json").stdout)
    assert sorted(e["name"] for e in entries) == sorted(arrays)
    for e in entries:
        arr = arrays[e["name"]]
        assert np.dtype(e["dtype"]) == arr.dtype
        assert tuple(e["shape"]) == arr.shape
    table = ok("ls", store_path).stdout
    for name in arrays:
        assert name in table
    for header in ("name", "dtype", "shape", "size", "modified"):
        assert header in table.lower()


def test_ls_prefix_and_default_store(tmp_path, store_path):
    _populate(tmp_path, store_path)
    entries = json.loads(ok("ls", store_path, "g", "--json").stdout)
    assert sorted(e["name"] for e in entries) == ["g/b", "g/c"]
    # STORE defaults to the current directory
    entries = json.loads(ok("ls", "--json", cwd=store_path).stdout)
    assert len(entries) == 4


def test_ls_empty_store_json(tmp_path):
    with mmstore.Store(tmp_path / "empty"):
        pass
    assert json.loads(ok("ls", tmp_path / "empty", "--json").stdout) == []


def test_info_json(tmp_path, store_path):
    arr = np.zeros((4, 5), "<f4")
    np.save(tmp_path / "a.npy", arr)
    ok("put", store_path, "grp/a", tmp_path / "a.npy", "--attr", "k=v")
    info = json.loads(ok("info", store_path, "grp/a", "--json").stdout)
    assert info["name"] == "grp/a"
    assert np.dtype(info["dtype"]) == arr.dtype
    assert tuple(info["shape"]) == (4, 5)
    assert info["nbytes"] == arr.nbytes
    assert info["attrs"] == {"k": "v"}
    assert "generation" in info and "created" in info and "modified" in info
    text = ok("info", store_path, "grp/a").stdout
    assert "grp/a" in text and ("float32" in text or "<f4" in text)


def test_rm_one_and_many(tmp_path, store_path):
    _populate(tmp_path, store_path)
    ok("rm", store_path, "a")
    ok("rm", store_path, "g/b", "g/c")
    names = [e["name"] for e in json.loads(ok("ls", store_path, "--json").stdout)]
    assert names == ["h/d"]


def test_rm_missing_dataset_is_error(tmp_path, store_path):
    _populate(tmp_path, store_path)
    p = run("rm", store_path, "nope")
    assert_one_line_error(p, 1, "nope")
    names = [e["name"] for e in json.loads(ok("ls", store_path, "--json").stdout)]
    assert len(names) == 4


def test_rm_reader_keeps_array(tmp_path, store_path):
    arr = np.arange(100_000, dtype="<f8")
    np.save(tmp_path / "a.npy", arr)
    ok("put", store_path, "a", tmp_path / "a.npy")
    with mmstore.Store(store_path, "r") as s:
        held = s.get("a")
        ok("rm", store_path, "a")
        assert "a" not in mmstore.Store(store_path, "r")
        same(held, arr)


# ---------------------------------------------------------------------------- errors
def test_missing_store_errors(tmp_path):
    missing = tmp_path / "nostore"
    for args in (
        ("get", missing, "x"),
        ("info", missing, "x"),
        ("ls", missing),
        ("rm", missing, "x"),
        ("verify", missing),
        ("compact", missing, tmp_path / "o.h5"),
        ("tail", missing, "x", "--idle-timeout", "1"),
    ):
        p = run(*args)
        assert_one_line_error(p, 1)
        assert not missing.exists(), f"{args[0]} created the missing store"
    assert not (tmp_path / "o.h5").exists()


def test_missing_dataset_errors(tmp_path, store_path):
    _populate(tmp_path, store_path)
    for args in (
        ("get", store_path, "zz"),
        ("info", store_path, "zz"),
        ("get", store_path, "zz", "-o", tmp_path / "zz.npy"),
        ("tail", store_path, "zz", "--idle-timeout", "1"),
    ):
        assert_one_line_error(run(*args), 1, "zz")
    assert not (tmp_path / "zz.npy").exists()


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a//b", "a/./b", "bad\x01name", "", "a/"])
def test_bad_name_errors(tmp_path, store_path, bad):
    np.save(tmp_path / "a.npy", np.arange(3))
    p = run("put", store_path, bad, tmp_path / "a.npy")
    assert p.returncode in (1, 2), p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "escape").exists()


def test_bad_name_one_line_exit1(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    assert_one_line_error(run("put", store_path, "../escape", tmp_path / "a.npy"), 1)
    _populate(tmp_path, store_path)
    assert_one_line_error(run("get", store_path, "../escape"), 1)


@pytest.mark.parametrize("dtype", ["zz", "not_a_dtype", "O", "chr:S10,pos", "f8,,"])
def test_bad_dtype_errors(tmp_path, store_path, dtype):
    (tmp_path / "in.csv").write_text("1,2\n3,4\n")
    p = run("put", store_path, "x", tmp_path / "in.csv", "--dtype", dtype)
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    if p.returncode == 1:
        assert_one_line_error(p, 1)
    assert not (store_path / "x.json").exists()


def test_unreadable_inputs(tmp_path, store_path):
    (tmp_path / "garbage.npy").write_bytes(b"this is not an npy file at all")
    (tmp_path / "trunc.npy").write_bytes(b"")
    buf = io.BytesIO()
    np.save(buf, np.arange(1000.0))
    (tmp_path / "short.npy").write_bytes(buf.getvalue()[:500])
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "notzip.npz").write_bytes(b"PK garbage")
    (tmp_path / "nothdf.h5").write_bytes(b"nope")
    with h5py.File(tmp_path / "ok.h5", "w") as f:
        f["d"] = np.arange(3)
    srcs = [
        tmp_path / "missing.npy",
        tmp_path / "garbage.npy",
        tmp_path / "trunc.npy",
        tmp_path / "short.npy",
        tmp_path / "dir.npy",
        tmp_path / "notzip.npz",
        f"{tmp_path / 'nothdf.h5'}:/d",
        f"{tmp_path / 'ok.h5'}:/missing",
    ]
    for src in srcs:
        p = run("put", store_path, "x", src)
        assert_one_line_error(p, 1)
    p = run("put", store_path, "x", "-", input=b"garbage", text=False)
    assert p.returncode == 1 and b"Traceback" not in p.stderr
    assert not store_path.exists() or "x" not in mmstore.Store(store_path, "r")


def test_object_npy_refused(tmp_path, store_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert_one_line_error(run("put", store_path, "o", tmp_path / "obj.npy"), 1)


def test_usage_errors_exit_2(tmp_path, store_path):
    _populate(tmp_path, store_path)
    assert_usage_error(run("no-such-command"))
    assert_usage_error(run("get", store_path))
    assert_usage_error(run("put", store_path, "x"))
    assert_usage_error(run("ls", store_path, "--no-such-option"))
    assert_usage_error(run("put", store_path, "x", "a.csv", "--skip-rows", "-1"))
    assert_usage_error(run("tail", store_path, "a", "--count", "0"))


def test_debug_shows_traceback(tmp_path, store_path):
    _populate(tmp_path, store_path)
    p = run("--debug", "get", store_path, "zz")
    assert p.returncode != 0
    assert "Traceback" in p.stderr


# ---------------------------------------------------------------------------- verify / recover
def _data_file(store_path, name):
    return Path(json.loads(ok("info", store_path, name, "--json").stdout)["data_file"])


def test_verify_ok_and_detects_corruption_then_recover(tmp_path, store_path):
    arrays = _populate(tmp_path, store_path)
    ok("verify", store_path)
    df = _data_file(store_path, "g/b")
    raw = bytearray(df.read_bytes())
    raw[-1] ^= 0xFF
    df.write_bytes(bytes(raw))
    p = run("verify", store_path)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr + p.stdout
    assert "g/b" in p.stdout + p.stderr
    p = run("recover", store_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "g/b" in p.stdout + p.stderr
    ok("verify", store_path)
    # never deletes: something was moved to quarantine; the others are intact
    q = store_path / ".quarantine"
    assert q.exists() and any(q.rglob("*"))
    with mmstore.Store(store_path, "r") as s:
        for name, arr in arrays.items():
            if name != "g/b":
                same(s[name], arr)
        assert "g/b" not in s


def test_verify_detects_corrupt_sidecar(tmp_path, store_path):
    _populate(tmp_path, store_path)
    (store_path / "a.json").write_text("{ not json")
    p = run("verify", store_path)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr + p.stdout
    # a corrupt dataset never hides the others
    p = ok("get", store_path, "h/d", text=False)
    same(np.load(io.BytesIO(p.stdout)), np.arange(5.0))


def test_recover_clean_store_exit0(tmp_path, store_path):
    _populate(tmp_path, store_path)
    ok("recover", store_path)
    ok("verify", store_path)


# ---------------------------------------------------------------------------- tail
def test_tail_follows_growable(tmp_path, store_path):
    dt = np.dtype([("t", "<f8"), ("v", "<i4")])
    with mmstore.Store(store_path) as s:
        w = s.create("ticks", dtype=dt, shape=(0,), growable=True)
        w.append(np.array([(i, i * 10) for i in range(5)], dt))
        w.flush()
        proc = subprocess.Popen(
            [MMSTORE, "tail", store_path, "ticks", "-n", "2", "--count", "3", "--idle-timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        try:
            first = [proc.stdout.readline(), proc.stdout.readline()]
            assert [ln.split()[1] for ln in first] == ["30", "40"], first
            w.append(np.array([(5, 50), (6, 60)], dt))
            w.append(np.array([(7, 70)], dt))
            w.append(np.array([(8, 80)], dt))  # not flushed
            w.flush()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            w.close()
    assert proc.returncode == 0, err
    vals = [ln.split()[1] for ln in out.splitlines() if ln.strip()]
    assert vals == ["50", "60", "70"], out


def test_tail_fixed_size_prints_last_rows_and_exits(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(20, dtype="i4"))
    ok("put", store_path, "a", tmp_path / "a.npy")
    p = ok("tail", store_path, "a", "-n", "3")
    assert [ln.strip() for ln in p.stdout.splitlines() if ln.strip()] == ["17", "18", "19"]


def test_tail_idle_timeout_stops(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        with s.create("g", dtype="<i8", shape=(0,), growable=True) as w:
            w.append(np.arange(4, dtype="<i8"))
            w.flush()
        p = ok("tail", store_path, "g", "-n", "10", "--idle-timeout", "0.5")
    assert [ln.strip() for ln in p.stdout.splitlines() if ln.strip()] == ["0", "1", "2", "3"]


# ---------------------------------------------------------------------------- compact / import
def test_compact_every_dataset_attrs_and_dtypes(tmp_path, store_path):
    arrays = sample_arrays()
    with mmstore.Store(store_path) as s:
        for name, arr in arrays.items():
            s.put(name, arr, attrs={"name": name, "n": 1, "nested": {"a": [1, 2]}})
    out = tmp_path / "out.h5"
    ok("compact", store_path, out)
    with h5py.File(out, "r") as f:
        seen = []
        f.visititems(lambda n, o: seen.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(seen) == sorted(arrays)
        for name, arr in arrays.items():
            d = f[name]
            assert json.loads(d.attrs["mmstore.attrs"]) == {"name": name, "n": 1, "nested": {"a": [1, 2]}}
            assert d.attrs["name"] in (name, name.encode())
            assert int(d.attrs["n"]) == 1
            assert "mmstore.dtype" in d.attrs
            if arr.dtype.kind in "biufcSV" and arr.dtype.names is None:
                same(d[()], arr)
        # documented conventions
        dt = f["dt"][()]
        assert dt.dtype == np.dtype("<i8")
        assert np.array_equal(dt, arrays["dt"].view("<i8"))
        assert dt[1] == np.iinfo(np.int64).min
        u = f["unicode"][()]
        assert u.shape == (3, 5) and u.dtype.kind == "u" and u.dtype.itemsize == 4
        assert (
            np.array_equal(u.view("<U5").reshape(3), arrays["unicode"])
            or "".join(chr(c) for c in u[2] if c) == "日本語"
        )
        rec = f["rec"][()]
        assert rec.dtype.names == REC.names
        for fld in REC.names:
            assert np.array_equal(rec[fld], arrays["rec"][fld], equal_nan=fld == "pct")
        assert f["rec"].dtype.fields["pos"][1] == REC.fields["pos"][1]
    # import gives back the same store
    back = tmp_path / "back"
    ok("import", out, back)
    with mmstore.Store(back, "r") as s:
        assert sorted(s.keys()) == sorted(arrays)
        for name, arr in arrays.items():
            same(s[name], arr)
            assert s.attrs(name) == {"name": name, "n": 1, "nested": {"a": [1, 2]}}


def test_compact_growable_only_committed_rows(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        w = s.create("log", dtype="<i4", shape=(0, 2), growable=True)
        w.append(np.arange(20, dtype="<i4").reshape(10, 2))
        w.flush()
        w.append(np.full((5, 2), -1, "<i4"))  # not flushed
        try:
            out = tmp_path / "g.h5"
            ok("compact", store_path, out)
        finally:
            w.close()
    with h5py.File(out, "r") as f:
        assert f["log"].shape == (10, 2)
        assert np.array_equal(f["log"][()], np.arange(20, dtype="<i4").reshape(10, 2))
    ok("import", out, tmp_path / "b")
    with mmstore.Store(tmp_path / "b", "r") as s:
        same(s["log"], np.arange(20, dtype="<i4").reshape(10, 2))


@pytest.mark.parametrize("comp", ["gzip", "lzf"])
def test_compact_compression(tmp_path, store_path, comp):
    arr = np.zeros((20000, 10), "<f8")
    with mmstore.Store(store_path) as s:
        s.put("z", arr)
        s.put("s", np.array(5))
        s.put("e", np.zeros((0, 3)))
    out = tmp_path / "c.h5"
    ok("compact", store_path, out, "--compression", comp)
    with h5py.File(out, "r") as f:
        assert f["z"].compression == comp
        assert f["z"].chunks is not None
        same(f["z"][()], arr)
        assert f["s"].chunks is None and f["s"][()] == 5
        assert f["e"].shape == (0, 3) and f["e"].chunks is None
    assert out.stat().st_size < arr.nbytes // 10


def test_compact_chunks_fitted(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        s.put("small", np.arange(10, dtype="<i4"))
        s.put("big", np.zeros((50000, 100), "u1"))
        s.put("three", np.zeros((50000, 3, 7), "u1"))
    out = tmp_path / "k.h5"
    ok("compact", store_path, out, "--chunks", "1000,64")
    with h5py.File(out, "r") as f:
        assert f["small"].chunks == (10,)
        assert f["big"].chunks == (1000, 64)
        assert f["three"].chunks == (1000, 3, 7)
    ok("compact", store_path, tmp_path / "a.h5", "--chunks", "auto")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["big"].chunks is not None


def test_compact_bad_options(tmp_path, store_path):
    _populate(tmp_path, store_path)
    for opts in (("--compression", "zstd-nope"), ("--chunks", "x,y"), ("--chunks", "0,-1")):
        p = run("compact", store_path, tmp_path / "o.h5", *opts)
        assert p.returncode in (1, 2), (opts, p.stderr)
        assert "Traceback" not in p.stderr
        assert not (tmp_path / "o.h5").exists()
    assert not any(tmp_path.glob(".o.h5*"))


def test_compact_only(tmp_path, store_path):
    _populate(tmp_path, store_path)
    ok("compact", store_path, tmp_path / "g.h5", "--only", "g")
    with h5py.File(tmp_path / "g.h5", "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == ["g/b", "g/c"]
    p = run("compact", store_path, tmp_path / "none.h5", "--only", "nothing")
    assert_one_line_error(p, 1)
    assert not (tmp_path / "none.h5").exists()


def test_compact_dataset_and_group_conflict(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        s.put("a", np.arange(3))
        s.put("a/b", np.arange(4))
    p = run("compact", store_path, tmp_path / "x.h5")
    line = assert_one_line_error(p, 1)
    assert "a/b" in line and "a" in line
    assert not (tmp_path / "x.h5").exists()
    ok("compact", store_path, tmp_path / "a.h5", "--only", "a")
    ok("compact", store_path, tmp_path / "ab.h5", "--only", "a/")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert isinstance(f["a"], h5py.Dataset)
    with h5py.File(tmp_path / "ab.h5", "r") as f:
        assert np.array_equal(f["a/b"][()], np.arange(4))


def test_compact_replaces_existing_output(tmp_path, store_path):
    _populate(tmp_path, store_path)
    out = tmp_path / "o.h5"
    out.write_bytes(b"old junk")
    ok("compact", store_path, out)
    with h5py.File(out, "r") as f:
        assert "a" in f


def test_library_export_import(tmp_path, store_path):
    arrays = sample_arrays()
    with mmstore.Store(store_path) as s:
        for name, arr in arrays.items():
            s.put(name, arr, attrs={"k": name})
        mmstore.export_hdf5(s, tmp_path / "lib.h5")
    with mmstore.Store(tmp_path / "lib_back") as s2:
        mmstore.import_hdf5(tmp_path / "lib.h5", s2)
        for name, arr in arrays.items():
            same(s2[name], arr)
            assert s2.attrs(name) == {"k": name}


def test_import_foreign_h5_skips_and_exits_1(tmp_path):
    src = tmp_path / "foreign.h5"
    with h5py.File(src, "w") as f:
        f["ok/data"] = np.arange(10.0)
        f["ok/data"].attrs["unit"] = "m"
        f["ok/data"].attrs["scale"] = 2.5
        f.create_dataset("vlen", data=["a", "bb"], dtype=h5py.string_dtype())
    p = run("import", src, tmp_path / "st")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr + p.stdout
    assert "vlen" in p.stdout + p.stderr
    with mmstore.Store(tmp_path / "st", "r") as s:
        same(s["ok/data"], np.arange(10.0))
        assert s.attrs("ok/data") == {"unit": "m", "scale": 2.5}
        assert "vlen" not in s


def test_import_only_and_errors(tmp_path, store_path):
    _populate(tmp_path, store_path)
    ok("compact", store_path, tmp_path / "o.h5")
    ok("import", tmp_path / "o.h5", tmp_path / "st", "--only", "g")
    with mmstore.Store(tmp_path / "st", "r") as s:
        assert sorted(s.keys()) == ["g/b", "g/c"]
    assert_one_line_error(run("import", tmp_path / "o.h5", tmp_path / "st2", "--only", "zzz"), 1)
    assert_one_line_error(run("import", tmp_path / "missing.h5", tmp_path / "st3"), 1)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert_one_line_error(run("import", tmp_path / "junk.h5", tmp_path / "st4"), 1)


def _h5_valid(path, expected):
    with h5py.File(path, "r") as f:
        for name, arr in expected.items():
            if not np.array_equal(f[name][()], arr):
                return False
    return True


def test_killed_compact_never_leaves_partial_output(tmp_path, store_path):
    rng = np.random.default_rng(11)
    expected = {f"d{i}": rng.random((2_000_000,)) for i in range(4)}  # 4 x 15 MiB
    with mmstore.Store(store_path) as s:
        for name, arr in expected.items():
            s.put(name, arr)
    out = tmp_path / "out.h5"
    old = tmp_path / "old_store"
    with mmstore.Store(old) as s:
        s.put("marker", np.arange(7))
    rnd = random.Random(99)
    killed_before_done = 0
    for trial in range(8):
        if trial % 2 == 1:  # half the trials have an old OUT.h5 that must stay intact
            ok("compact", old, out)
            had_old = True
        else:
            if out.exists():
                out.unlink()
            had_old = False
        proc = subprocess.Popen(
            [MMSTORE, "--quiet", "compact", store_path, out, "--compression", "gzip"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        time.sleep(rnd.uniform(0.2, 2.5))  # a random point of the export, not a timing assertion
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        if rc == -signal.SIGKILL:
            killed_before_done += 1
        # OUT.h5 is the old file, the complete new one, or absent: never partial
        if out.exists():
            with h5py.File(out, "r") as f:
                names = set(f.keys())
            if names == {"marker"}:
                assert had_old
                assert _h5_valid(out, {"marker": np.arange(7)})
            else:
                assert names == set(expected), names
                assert _h5_valid(out, expected)
        else:
            assert not had_old, "the old OUT.h5 vanished"
    assert killed_before_done >= 1, "no trial killed a running export; the test proved nothing"
    # the next export succeeds and removes the dead exporters' temp files
    ok("compact", store_path, out)
    assert _h5_valid(out, expected)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.h5")]
    assert leftovers == [], leftovers


# ---------------------------------------------------------------------------- demo
def test_demo_runs_and_prints_timings_beside_pickle_baseline():
    p = ok("demo", "--arrays", "2", "--megabytes", "2", "--readers", "2", timeout=300)
    out = p.stdout.lower()
    assert "mmstore" in out
    assert "pickl" in out or "queue" in out
    times = re.findall(r"\d+(?:\.\d+)?\s*(?:ms|s|us|µs)\b", p.stdout)
    assert len(times) >= 2, p.stdout


# ---------------------------------------------------------------------------- cache: helpers
WORKER = textwrap.dedent(r"""
    import json, os, sys, time
    import numpy as np
    import mmstore

    cache_path, log_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    args = sys.argv[4:]
    cache = mmstore.Cache(cache_path, max_bytes=int(os.environ.get("MAXB", str(2**30))))

    def log(line):
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (line + "\n").encode())
        os.close(fd)

    @cache.memoize
    def compute(k, n):
        log(f"compute {k} {os.getpid()}")
        hang = os.environ.get("HANG_FILE")
        if hang and os.path.exists(hang):
            open(hang + ".started", "w").close()
            time.sleep(3600)
        slow = float(os.environ.get("SLOW", "0"))
        if slow:
            time.sleep(slow)   # widens the race window; asserts nothing about time
        return np.arange(n, dtype="<i8") * (k + 1)

    if mode == "calls":
        go = os.environ.get("GO_FILE")
        if go:
            open(os.environ["READY_DIR"] + f"/{os.getpid()}", "w").close()
            while not os.path.exists(go):
                time.sleep(0.005)
        n = int(os.environ.get("N", "1000"))
        bad = 0
        for k in map(int, args):
            if os.environ.get("CALLING_FILE"):
                open(os.environ["CALLING_FILE"], "w").close()
            r = compute(k, n)
            exp = np.arange(n, dtype="<i8") * (k + 1)
            if r.dtype != exp.dtype or r.shape != exp.shape or not np.array_equal(r, exp):
                bad += 1
            if r.flags.writeable:
                bad += 1000
        print(json.dumps({"bad": bad}))
    """)


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def spawn(worker, cache, log, *keys, env=None):
    e = dict(ENV)
    e.update(env or {})
    return subprocess.Popen(
        [sys.executable, str(worker), str(cache), str(log), "calls", *map(str, keys)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def compute_counts(log):
    counts = {}
    if not Path(log).exists():
        return counts
    for line in Path(log).read_text().splitlines():
        _, k, _pid = line.split()
        counts[int(k)] = counts.get(int(k), 0) + 1
    return counts


# ---------------------------------------------------------------------------- cache tests
def test_memoize_hit_in_second_process_without_recompute(tmp_path, worker):
    cache, log = tmp_path / "cache", tmp_path / "log"
    assert finish(spawn(worker, cache, log, 1, 2))["bad"] == 0
    assert compute_counts(log) == {1: 1, 2: 1}
    # a fresh process (a restart) gets hits
    assert finish(spawn(worker, cache, log, 1, 2, 1))["bad"] == 0
    assert compute_counts(log) == {1: 1, 2: 1}
    c = mmstore.Cache(cache)
    st = c.stats()
    assert st["hits"] >= 3 and st["misses"] >= 2 and st["entries"] == 2


def test_cache_results_readonly_zero_copy(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    big = np.arange(4_000_000, dtype="<f8")
    c.set("big", big)
    a = c.get("big")
    b = c.get("big")
    same(a, big)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    assert not a.flags.owndata
    # two hits map the same pages, no copy
    assert np.shares_memory(a, b) or a.__array_interface__["data"][0] == b.__array_interface__["data"][0]

    calls = []

    @c.memoize
    def f(x):
        calls.append(1)
        return x * 2

    r1 = f(np.arange(10))
    r2 = f(np.arange(10))
    assert not r2.flags.writeable
    same(r1, np.arange(10) * 2)
    same(r2, np.arange(10) * 2)
    assert len(calls) == 1


def test_memoize_keys_distinguish_dtype_shape_values_and_bind_kwargs(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    calls = []

    @c.memoize
    def f(x, k=3, *, scale=1.0):
        calls.append((x.dtype.str, x.shape, k, scale))
        return np.asarray(x, dtype="f8") * k * scale

    base = np.arange(6, dtype="<i4")
    f(base)
    f(base.astype("<i8"))  # dtype differs
    f(base.reshape(2, 3))  # shape differs
    f(base + 1)  # values differ
    f(base.astype(">i4"))  # byte order differs: a different array description
    assert len(calls) == 5
    f(base.copy())  # same value -> hit
    f(base, 3)  # default made explicit -> hit
    f(base, k=3)  # keyword -> hit
    f(x=base, k=3, scale=1.0)
    f(scale=1.0, k=3, x=base)  # kwargs order -> hit
    assert len(calls) == 5
    f(base, k=4)
    f(base, scale=2.0)
    assert len(calls) == 7
    # result of the byte-swapped call is right
    same(f(base.astype(">i4")), base.astype("f8") * 3)
    # non-contiguous view with the same values as a contiguous array: same key or not, value correct
    v = np.arange(12, dtype="<i4")[::2]
    same(f(v), v.astype("f8") * 3)


def test_memoize_tuples_and_dicts_of_arrays(tmp_path):
    # README: results may be tuples, lists and dicts (str keys) of arrays, numbers, str, None
    # (one level: a dict inside a tuple is not promised)
    c = mmstore.Cache(tmp_path / "c")
    calls = []

    @c.memoize
    def g(n):
        calls.append(n)
        return (np.arange(n), np.arange(n) ** 2, "x", 3, None, 1.5)

    @c.memoize
    def h(n):
        calls.append(n)
        return {"a": np.arange(n), "sq": np.arange(n) ** 2, "name": "x", "k": 3, "none": None}

    r, r2 = g(4), g(4)
    d, d2 = h(4), h(4)
    assert len(calls) == 2
    for res in (r, r2):
        assert isinstance(res, tuple) and len(res) == 6
        same(res[0], np.arange(4))
        same(res[1], np.arange(4) ** 2)
        assert res[2:] == ("x", 3, None, 1.5) and type(res[3]) is int and type(res[5]) is float
    for res in (d, d2):
        assert isinstance(res, dict) and set(res) == {"a", "sq", "name", "k", "none"}
        same(res["a"], np.arange(4))
        same(res["sq"], np.arange(4) ** 2)
        assert res["name"] == "x" and res["k"] == 3 and res["none"] is None
    assert not r2[0].flags.writeable and not d2["sq"].flags.writeable


def test_memoize_unhashable_argument_clear_error(tmp_path):
    c = mmstore.Cache(tmp_path / "c")

    @c.memoize
    def h(x):
        return np.zeros(1)

    class Opaque:
        pass

    with pytest.raises(TypeError) as ei:
        h(Opaque())
    assert isinstance(ei.value, mmstore.MmstoreError)
    assert "Opaque" in str(ei.value) or "x" in str(ei.value)
    with pytest.raises(TypeError):
        h(np.array([object()], dtype=object))


def test_cache_api_basics(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    assert c.get("missing") is None
    assert c.get("missing", 5) == 5
    assert "k" not in c and len(c) == 0
    c.set("k", np.arange(3))
    c.set(("tuple", 1), np.ones(2))
    c.set(b"bytes", np.zeros(1))
    assert "k" in c and ("tuple", 1) in c and b"bytes" in c and len(c) == 3
    n = []
    assert np.array_equal(c.get_or_compute("g", lambda: n.append(1) or np.arange(2)), np.arange(2))
    assert np.array_equal(c.get_or_compute("g", lambda: n.append(1) or np.arange(2)), np.arange(2))
    assert n == [1]
    c.delete("k")
    assert "k" not in c and c.get("k") is None
    c.clear()
    assert len(c) == 0
    st = c.stats()
    for key in ("hits", "misses", "evictions", "bytes"):
        assert key in st
    assert st["bytes"] == 0


def test_cache_max_bytes_eviction_lru(tmp_path):
    mib = 2**20
    c = mmstore.Cache(tmp_path / "c", max_bytes=5 * mib)
    held = None
    for i in range(20):
        c.set(i, np.full(mib // 8, i, "<i8"))
        if i == 0:
            held = c.get(0)
        if i >= 1:
            c.get(1)  # keep 1 recently used
        st = c.stats()
        assert st["bytes"] <= 5 * mib, st
        present = [k for k in range(i + 1) if k in c]
        assert len(present) * mib <= 5 * mib, present
    assert 1 in c, "the most recently used entry was evicted"
    assert 19 in c
    assert 0 not in c and 2 not in c
    assert c.stats()["evictions"] >= 14
    # a process holding an evicted entry keeps its valid old mapping
    assert np.all(held == 0) and held.shape == (mib // 8,)
    # eviction is seen by a new process too (restart)
    code = "import mmstore, json; c = mmstore.Cache({!r}); print(json.dumps([k for k in range(20) if k in c]))".format(
        str(tmp_path / "c")
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    present = json.loads(p.stdout)
    assert 1 in present and 19 in present and len(present) <= 5


def test_cache_max_bytes_under_concurrent_inserts(tmp_path):
    mib = 2**20
    path = tmp_path / "c"
    mmstore.Cache(path, max_bytes=4 * mib)
    code = textwrap.dedent("""
        import sys, numpy as np, mmstore
        c = mmstore.Cache(sys.argv[1], max_bytes=4 * 2**20)
        base = int(sys.argv[2])
        worst = 0
        for i in range(25):
            c.set(base * 1000 + i, np.full(2**20 // 8, base * 1000 + i, "<i8"))
            worst = max(worst, c.stats()["bytes"])
            v = c.get(base * 1000 + i)
            if v is not None and not (v == base * 1000 + i).all():
                print("TORN"); sys.exit(3)
        print(worst)
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for b in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, out + err
        assert int(out.strip()) <= 4 * mib
    c = mmstore.Cache(path, max_bytes=4 * mib)
    assert c.stats()["bytes"] <= 4 * mib
    present = [(b, i) for b in range(3) for i in range(25) if b * 1000 + i in c]
    assert 1 <= len(present) <= 4


def test_cache_value_larger_than_max_bytes(tmp_path):
    c = mmstore.Cache(tmp_path / "c", max_bytes=1000)
    with pytest.raises(ValueError):
        c.set("big", np.zeros(10_000, "u1"))
    calls = []

    @c.memoize
    def f():
        calls.append(1)
        return np.zeros(10_000, "u1")

    same(f(), np.zeros(10_000, "u1"))  # returned uncached
    same(f(), np.zeros(10_000, "u1"))
    assert len(calls) == 2
    assert c.stats()["bytes"] <= 1000


def test_cache_ttl_expiry(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    c.set("short", np.arange(3), ttl=0.3)
    c.set("long", np.arange(3), ttl=3600)
    deadline = time.monotonic() + 60
    while "short" in c and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "short" not in c and c.get("short") is None
    assert "long" in c
    c2 = mmstore.Cache(tmp_path / "d", ttl=0.2)
    c2.set("x", np.arange(2))
    time.sleep(0.5)
    assert c2.get("x") is None


def test_cache_survives_restart_and_stats_summed(tmp_path):
    path = tmp_path / "c"
    code1 = (
        "import mmstore, numpy as np, sys; c = mmstore.Cache(sys.argv[1]);"
        "c.set('persist', np.arange(100, dtype='<u2')); c.get('persist'); c.get('nope')"
    )
    code2 = (
        "import mmstore, numpy as np, sys, json; c = mmstore.Cache(sys.argv[1]);"
        "v = c.get('persist'); print(json.dumps({'v': v.tolist(), 'dt': v.dtype.str, 'w': bool(v.flags.writeable)}))"
    )
    subprocess.run([sys.executable, "-c", code1, str(path)], check=True, timeout=TIMEOUT)
    p = subprocess.run(
        [sys.executable, "-c", code2, str(path)], capture_output=True, text=True, check=True, timeout=TIMEOUT
    )
    res = json.loads(p.stdout)
    assert res == {"v": list(range(100)), "dt": "<u2", "w": False}
    st = mmstore.Cache(path).stats()
    assert st["hits"] == 2 and st["misses"] == 1, st


def test_concurrent_memoize_each_key_once_no_torn_results(tmp_path, worker):
    cache, log = tmp_path / "cache", tmp_path / "log"
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    keys = list(range(8))
    rnd = random.Random(5)
    procs = []
    for _ in range(6):
        ks = keys[:]
        rnd.shuffle(ks)
        procs.append(
            spawn(
                worker,
                cache,
                log,
                *ks,
                env={"GO_FILE": str(go), "READY_DIR": str(ready), "SLOW": "0.2", "N": str(500_000)},
            )
        )
    wait_for(lambda: len(list(ready.iterdir())) == 6, 120, "workers ready")
    go.touch()
    for p in procs:
        assert finish(p, timeout=300)["bad"] == 0
    counts = compute_counts(log)
    assert set(counts) == set(keys)
    assert all(v == 1 for v in counts.values()), counts


def test_killed_computing_process_does_not_poison_key(tmp_path, worker):
    cache, log = tmp_path / "cache", tmp_path / "log"
    hang = tmp_path / "hang"
    hang.touch()
    a = spawn(worker, cache, log, 42, env={"HANG_FILE": str(hang)})
    try:
        wait_for(lambda: Path(str(hang) + ".started").exists(), 60, "A computing")
        hang.unlink()
        # B asks for the same key while A holds it, then A dies: B must take over
        calling = tmp_path / "b_calling"
        b = spawn(worker, cache, log, 42, env={"CALLING_FILE": str(calling)})
        wait_for(lambda: calling.exists(), 60, "B calling")
        time.sleep(0.5)  # let B reach its wait on A's key (not a timing assertion)
        assert b.poll() is None, "B finished while A still held the key"
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
        assert finish(b, timeout=120)["bad"] == 0
    finally:
        if a.poll() is None:
            a.kill()
        a.communicate(timeout=60)
    # the key is now cached and healthy: a third process hits
    before = compute_counts(log).get(42, 0)
    assert finish(spawn(worker, cache, log, 42), timeout=120)["bad"] == 0
    assert compute_counts(log).get(42, 0) == before
    c = mmstore.Cache(cache)
    assert c.stats()["entries"] >= 1


def test_killed_computer_before_any_waiter(tmp_path, worker):
    cache, log = tmp_path / "cache", tmp_path / "log"
    hang = tmp_path / "hang"
    hang.touch()
    a = spawn(worker, cache, log, 7, env={"HANG_FILE": str(hang)})
    wait_for(lambda: Path(str(hang) + ".started").exists(), 60, "A computing")
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=60)
    hang.unlink()
    assert finish(spawn(worker, cache, log, 7), timeout=120)["bad"] == 0
    assert compute_counts(log)[7] == 2


def test_no_stale_hit_after_other_process_sets(tmp_path):
    path = tmp_path / "c"
    c = mmstore.Cache(path)
    c.set("k", np.zeros(3))
    same(c.get("k"), np.zeros(3))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import mmstore, numpy as np, sys; mmstore.Cache(sys.argv[1]).set('k', np.ones(3))",
            str(path),
        ],
        check=True,
        timeout=TIMEOUT,
    )
    same(c.get("k"), np.ones(3))
    subprocess.run(
        [sys.executable, "-c", "import mmstore, sys; mmstore.Cache(sys.argv[1]).delete('k')", str(path)],
        check=True,
        timeout=TIMEOUT,
    )
    assert c.get("k") is None


def test_cache_cli_info_and_clear(tmp_path):
    path = tmp_path / "c"
    c = mmstore.Cache(path, max_bytes=2**20)
    c.set("a", np.arange(10, dtype="<i8"))
    c.set("b", np.arange(5, dtype="<i8"))
    c.get("a")
    c.get("zz")
    # (a live process adds its hit/miss counts to the shared ones in batches, documented in
    # Cache.stats: stats() publishes them now)
    c.stats()
    info = json.loads(ok("cache", "info", path, "--json").stdout)
    assert info["entries"] == 2
    assert info["bytes"] >= 120
    assert info["hits"] >= 1 and info["misses"] >= 1
    assert "evictions" in info
    text = ok("cache", "info", path).stdout.lower()
    assert "entries" in text and "hits" in text
    ok("cache", "clear", path)
    assert len(c) == 0 and c.get("a") is None
    assert json.loads(ok("cache", "info", path, "--json").stdout)["entries"] == 0
    assert_one_line_error(run("cache", "info", tmp_path / "nocache"), 1)
    assert not (tmp_path / "nocache").exists()


# ---------------------------------------------------------------------------- more CLI behaviour
def test_get_preview_on_a_terminal(tmp_path, store_path):
    import pty

    arr = np.arange(12.0).reshape(3, 4)
    np.save(tmp_path / "a.npy", arr)
    ok("put", store_path, "a", tmp_path / "a.npy")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [MMSTORE, "get", str(store_path), "a"], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=ENV
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(master)
    out = b"".join(chunks)
    assert not out.startswith(b"\x93NUMPY"), "wrote binary .npy to a terminal"
    text = out.decode(errors="replace")
    assert "float64" in text or "<f8" in text
    assert "(3, 4)" in text or "3, 4" in text
    assert "11." in text


def test_no_progress_output_when_not_a_terminal(tmp_path, store_path):
    # progress bars only on a terminal; --quiet: "No progress bars or chatter"
    arr = np.random.default_rng(1).random((4_000_000, 2))
    np.save(tmp_path / "big.npy", arr)
    for quiet in ((), ("--quiet",)):
        steps = (
            ("put", store_path, "big", tmp_path / "big.npy"),
            ("compact", store_path, tmp_path / "o.h5"),
            ("import", tmp_path / "o.h5", tmp_path / "imp"),
            ("verify", store_path),
            ("get", store_path, "big", "-o", tmp_path / "o.npy"),
        )
        for step in steps:
            p = ok(*quiet, *step)
            for bar in ("\r", "\x1b[", "━", "%"):
                assert bar not in p.stderr, (step, p.stderr)
            if quiet:
                assert p.stderr.strip() == "", (step, p.stderr)


RSS_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def _peak_rss_mib(*args):
    p = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, MMSTORE, "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().splitlines()[-1]) / 1024


def test_put_large_text_streams_in_bounded_memory(tmp_path, store_path):
    rng = np.random.default_rng(2)
    arr = rng.random((1_000_000, 8))
    src = tmp_path / "big.csv"
    with open(src, "w") as f:
        for block in np.array_split(arr, 20):
            np.savetxt(f, block, delimiter=",", fmt="%.17g")
    text_mib = src.stat().st_size / 2**20
    assert text_mib > 140
    peak = _peak_rss_mib("put", store_path, "big", src)
    assert peak < 0.75 * text_mib, f"peak RSS {peak:.0f} MiB for a {text_mib:.0f} MiB text file"
    with mmstore.Store(store_path, "r") as s:
        same(s["big"], arr)


def test_compact_in_bounded_memory(tmp_path, store_path):
    rng = np.random.default_rng(3)
    with mmstore.Store(store_path) as s:
        for i in range(3):
            s.put(f"d{i}", rng.random(80 * 2**20 // 8))  # 3 x 80 MiB
    peak = _peak_rss_mib("compact", store_path, tmp_path / "o.h5")
    assert peak < 160, f"compact of 240 MiB peaked at {peak:.0f} MiB RSS"
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert f["d2"].shape == (80 * 2**20 // 8,)


def test_parallel_puts_into_a_new_store(tmp_path, store_path):
    srcs = []
    for i in range(4):
        rec = np.zeros(200, REC)
        rec["chr"] = f"chr{i}".encode()
        rec["pos"] = np.arange(200) + i * 1000
        rec["pct"] = np.linspace(0, 1, 200, dtype="f4")
        rec["c"] = i
        rec["t"] = -i
        path = tmp_path / f"part{i}.txt"
        with open(path, "w") as f:
            for r in rec:
                f.write(f"{r['chr'].decode()} {r['pos']} {r['pct']} {r['c']} {r['t']}\n")
        srcs.append((path, rec))
    procs = [
        subprocess.Popen(
            [
                MMSTORE,
                "put",
                str(store_path),
                f"genome/part{i}",
                str(path),
                "--dtype",
                "chr:S10,pos:i4,pct:f4,c:i2,t:i2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for i, (path, _) in enumerate(srcs)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    # read them all from another process
    for i, (_, rec) in enumerate(srcs):
        got = np.load(io.BytesIO(ok("get", store_path, f"genome/part{i}", text=False).stdout))
        same(got, rec)
    ok("compact", store_path, tmp_path / "g.h5")
    with h5py.File(tmp_path / "g.h5", "r") as f:
        for i, (_, rec) in enumerate(srcs):
            got = f[f"genome/part{i}"][()]
            for fld in REC.names:
                assert np.array_equal(got[fld], rec[fld])


def test_import_replaces_same_names_and_keeps_others(tmp_path, store_path):
    with mmstore.Store(tmp_path / "src") as s:
        s.put("x", np.arange(5))
    ok("compact", tmp_path / "src", tmp_path / "o.h5")
    with mmstore.Store(store_path) as s:
        s.put("x", np.zeros(2))
        s.put("y", np.ones(3))
    ok("import", tmp_path / "o.h5", store_path)
    with mmstore.Store(store_path, "r") as s:
        same(s["x"], np.arange(5))
        same(s["y"], np.ones(3))


def test_info_and_get_of_growable_show_committed_rows(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        w = s.create("g", dtype="<f4", shape=(0, 3), growable=True)
        w.append(np.ones((7, 3), "<f4"))
        w.flush()
        w.append(np.ones((100, 3), "<f4"))
        try:
            info = json.loads(ok("info", store_path, "g", "--json").stdout)
            assert tuple(info["shape"]) == (7, 3)
            entries = json.loads(ok("ls", store_path, "--json").stdout)
            assert tuple(entries[0]["shape"]) == (7, 3)
            got = np.load(io.BytesIO(ok("get", store_path, "g", text=False).stdout))
            same(got, np.ones((7, 3), "<f4"))
        finally:
            w.close()


def test_ls_corrupt_dataset_does_not_hide_others(tmp_path, store_path):
    _populate(tmp_path, store_path)
    (store_path / "a.json").write_text("{ corrupt")
    p = run("ls", store_path, "--json")
    assert "Traceback" not in p.stderr
    names = [e["name"] for e in json.loads(p.stdout)]
    assert {"g/b", "g/c", "h/d"} <= set(names)


def test_recover_and_verify_missing_store(tmp_path):
    assert_one_line_error(run("recover", tmp_path / "none"), 1)
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------- more cache behaviour
def test_evicted_entry_stays_valid_in_another_process(tmp_path):
    path = tmp_path / "c"
    mib = 2**20
    c = mmstore.Cache(path, max_bytes=3 * mib)
    c.set("victim", np.full(mib // 8, 7, "<i8"))
    held = c.get("victim")
    code = textwrap.dedent("""
        import sys, numpy as np, mmstore
        c = mmstore.Cache(sys.argv[1], max_bytes=3 * 2**20)
        for i in range(10):
            c.set(f"k{i}", np.full(2**20 // 8, i, "<i8"))
        print("victim" in c)
    """)
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
    assert "victim" not in c
    assert held.shape == (mib // 8,) and np.all(held == 7)


def test_memoize_version_and_key(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    calls = []

    def make(version):
        @c.memoize(version=version)
        def f(x):
            calls.append(version)
            return np.array([x, version])

        return f

    f1, f2 = make(1), make(2)
    same(f1(5), np.array([5, 1]))
    same(f2(5), np.array([5, 2]))
    same(f1(5), np.array([5, 1]))
    assert calls == [1, 2]

    @c.memoize(key=lambda x, noise: x)
    def g(x, noise):
        calls.append("g")
        return np.array([x])

    g(1, object())
    g(1, object())
    assert calls.count("g") == 1


def test_memoize_ttl(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    calls = []

    @c.memoize(ttl=0.2)
    def f(x):
        calls.append(x)
        return np.array([x])

    f(1)
    f(1)
    n = len(calls)
    assert n in (1, 2)
    time.sleep(0.5)  # past the ttl; not a timing assertion
    f(1)
    assert len(calls) == n + 1


def test_concurrent_get_or_compute_cross_process(tmp_path):
    path = tmp_path / "c"
    log = tmp_path / "log"
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import os, sys, time, numpy as np, mmstore
        path, log, ready, go = sys.argv[1:5]
        c = mmstore.Cache(path)
        open(os.path.join(ready, str(os.getpid())), "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        def compute():
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"x\\n"); os.close(fd)
            time.sleep(0.3)
            return np.arange(2_000_000, dtype="<f8")
        r = c.get_or_compute("shared", compute)
        ok = r.shape == (2_000_000,) and bool((r == np.arange(2_000_000)).all())
        print("OK" if ok else "BAD")
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(log), str(ready), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    wait_for(lambda: len(list(ready.iterdir())) == 4, 120, "ready")
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        assert out.strip() == "OK"
    assert log.read_text().count("x") == 1


# ---------------------------------------------------------------------------- edge cases
def test_text_edge_cases(tmp_path, store_path):
    # CRLF line endings
    (tmp_path / "crlf.csv").write_bytes(b"1,2\r\n3,4\r\n")
    ok("put", store_path, "crlf", tmp_path / "crlf.csv", "--dtype", "i8")
    # one column -> one row per line
    (tmp_path / "col.txt").write_text("1.5\n2.5\n3.5\n")
    ok("put", store_path, "col", tmp_path / "col.txt")
    # a delimiter given on the command line for a .txt
    (tmp_path / "pipe.txt").write_text("1|2|3\n4|5|6\n")
    ok("put", store_path, "pipe", tmp_path / "pipe.txt", "--delimiter", "|", "--dtype", "u2")
    # a file with no trailing newline
    (tmp_path / "nonl.csv").write_text("1,2\n3,4")
    ok("put", store_path, "nonl", tmp_path / "nonl.csv", "--dtype", "i4")
    with mmstore.Store(store_path, "r") as s:
        same(s["crlf"], np.array([[1, 2], [3, 4]], "i8"))
        assert np.array_equal(np.asarray(s["col"]).ravel(), [1.5, 2.5, 3.5])
        same(s["pipe"], np.array([[1, 2, 3], [4, 5, 6]], "u2"))
        same(s["nonl"], np.array([[1, 2], [3, 4]], "i4"))


def test_text_int_overflow_is_an_error(tmp_path, store_path):
    (tmp_path / "o.csv").write_text("1,2\n3,300\n")
    line = assert_one_line_error(run("put", store_path, "o", tmp_path / "o.csv", "--dtype", "i1"), 1, "line 2")
    assert "column 2" in line


def test_text_wrong_field_count_for_record_dtype(tmp_path, store_path):
    (tmp_path / "r.txt").write_text("chr1 1 0.5 1 2\nchr2 2 0.5 1\n")
    assert_one_line_error(
        run("put", store_path, "r", tmp_path / "r.txt", "--dtype", "chr:S10,pos:i4,pct:f4,c:i2,t:i2"), 1, "line 2"
    )


def test_text_string_too_long_for_field_is_an_error(tmp_path, store_path):
    (tmp_path / "r.txt").write_text("chr1 1\nchromosome_far_too_long 2\n")
    p = run("put", store_path, "r", tmp_path / "r.txt", "--dtype", "chr:S4,pos:i4")
    assert_one_line_error(p, 1, "line 2")


def test_text_float_overflow_is_an_error(tmp_path, store_path):
    (tmp_path / "f.txt").write_text("1.0\n1e39\n")
    p = run("put", store_path, "f", tmp_path / "f.txt", "--dtype", "f4")
    assert_one_line_error(p, 1, "line 2")


def test_text_lossless_cells_still_accepted(tmp_path, store_path):
    # control for the two tests above: exact fits, inf/nan spelled out, are fine
    (tmp_path / "r.txt").write_text("chr1 1 inf\nchrX 2 nan\nabcd 3 3.4e38\n")
    ok("put", store_path, "r", tmp_path / "r.txt", "--dtype", "chr:S4,pos:i4,v:f4")
    with mmstore.Store(store_path, "r") as s:
        r = s["r"]
        assert list(r["chr"]) == [b"chr1", b"chrX", b"abcd"]
        assert np.isinf(r["v"][0]) and np.isnan(r["v"][1]) and np.isfinite(r["v"][2])


def test_empty_text_file(tmp_path, store_path):
    (tmp_path / "e.csv").write_text("")
    p = run("put", store_path, "e", tmp_path / "e.csv", "--dtype", "f8")
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr
    if p.returncode == 0:
        with mmstore.Store(store_path, "r") as s:
            assert s["e"].size == 0 and s["e"].dtype == np.dtype("f8")


def test_get_output_to_missing_directory(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    ok("put", store_path, "a", tmp_path / "a.npy")
    assert_one_line_error(run("get", store_path, "a", "-o", tmp_path / "nodir" / "o.npy"), 1)


def test_get_overwrites_output(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    ok("put", store_path, "a", tmp_path / "a.npy")
    (tmp_path / "o.npy").write_bytes(b"x" * 100000)
    ok("get", store_path, "a", "-o", tmp_path / "o.npy")
    same(np.load(tmp_path / "o.npy"), np.arange(3))


def test_put_fortran_order_npy(tmp_path, store_path):
    arr = np.asfortranarray(np.arange(12, dtype="<i4").reshape(3, 4))
    np.save(tmp_path / "f.npy", arr)
    ok("put", store_path, "f", tmp_path / "f.npy")
    got = np.load(io.BytesIO(ok("get", store_path, "f", text=False).stdout))
    assert got.shape == (3, 4) and np.array_equal(got, arr)


def test_unicode_names_and_attrs_through_hdf5(tmp_path, store_path):
    with mmstore.Store(store_path) as s:
        s.put(
            "données/température",
            np.arange(3.0),
            attrs={"unité": "°C", "tags": ["a", "b"], "vals": [1.5, 2.5], "big": 2**70, "": 1},
        )
    ok("compact", store_path, tmp_path / "u.h5")
    with h5py.File(tmp_path / "u.h5", "r") as f:
        d = f["données/température"]
        assert json.loads(d.attrs["mmstore.attrs"])["big"] == 2**70
        u = d.attrs["unité"]
        assert (u.decode() if isinstance(u, bytes) else u) == "°C"
        assert list(d.attrs["vals"]) == [1.5, 2.5]
    ok("import", tmp_path / "u.h5", tmp_path / "b")
    with mmstore.Store(tmp_path / "b", "r") as s:
        assert s.attrs("données/température") == {
            "unité": "°C",
            "tags": ["a", "b"],
            "vals": [1.5, 2.5],
            "big": 2**70,
            "": 1,
        }


def test_compound_with_unicode_and_datetime_fields_roundtrip(tmp_path, store_path):
    dt = np.dtype([("name", "<U4"), ("when", "<M8[us]"), ("dur", "<m8[ns]"), ("v", ">f8", (2, 2))])
    arr = np.zeros(3, dt)
    arr["name"] = ["ab", "çé", ""]
    arr["when"] = np.array(["2021-05-01T12:00:00.5", "NaT", "1900-01-01"], "M8[us]")
    arr["dur"] = [1, -1, 0]
    arr["v"] = np.arange(12).reshape(3, 2, 2)
    with mmstore.Store(store_path) as s:
        s.put("c", arr)
    ok("compact", store_path, tmp_path / "c.h5", "--compression", "gzip", "--chunks", "2")
    ok("import", tmp_path / "c.h5", tmp_path / "b")
    with mmstore.Store(tmp_path / "b", "r") as s:
        same(s["c"], arr)


def test_tail_structured_output_reads_back(tmp_path, store_path):
    dt = np.dtype([("chr", "S6"), ("pos", "<i4"), ("pct", "<f4")])
    rows = np.array([(b"chr1", 10, 0.25), (b"chr2", 20, 0.5), (b"chrX", 30, 0.125)], dt)
    with mmstore.Store(store_path) as s, s.create("r", dtype=dt, shape=(0,), growable=True) as w:
        w.append(rows)
        w.flush()
    p = ok("tail", store_path, "r", "-n", "2", "--idle-timeout", "0.2")
    (tmp_path / "t.txt").write_text(p.stdout)
    ok("put", store_path, "back", tmp_path / "t.txt", "--dtype", "chr:S6,pos:<i4,pct:<f4")
    with mmstore.Store(store_path, "r") as s:
        same(s["back"], rows[1:])


def test_memoize_array_key_by_content_not_layout(tmp_path):
    c = mmstore.Cache(tmp_path / "c")
    calls = []

    @c.memoize
    def f(x):
        calls.append(1)
        return np.zeros(1)

    a = np.arange(12, dtype="<i8").reshape(3, 4)
    f(a)
    f(np.asfortranarray(a))
    spaced = np.zeros(24, "<i8")
    spaced[::2] = np.arange(12)
    view = spaced[::2].reshape(3, 4)
    assert not view.flags.c_contiguous
    f(view)
    assert len(calls) == 1
    f(np.float32(1.0))
    f(np.float64(1.0))
    assert len(calls) == 3
    f("a")
    f(b"a")
    assert len(calls) == 5
    f((1, 2))
    f((1, 2, 3))
    assert len(calls) == 7


def test_cache_clear_while_another_process_holds_results(tmp_path):
    path = tmp_path / "c"
    c = mmstore.Cache(path)
    c.set("x", np.arange(1_000_000, dtype="<i8"))
    held = c.get("x")
    subprocess.run([MMSTORE, "cache", "clear", str(path)], check=True, timeout=TIMEOUT, capture_output=True)
    assert c.get("x") is None
    assert np.array_equal(held, np.arange(1_000_000))


def test_rm_with_one_missing_name(tmp_path, store_path):
    _populate(tmp_path, store_path)
    p = run("rm", store_path, "a", "zz_missing")
    assert_one_line_error(p, 1, "zz_missing")
    names = {e["name"] for e in json.loads(ok("ls", store_path, "--json").stdout)}
    assert {"g/b", "g/c", "h/d"} <= names


def test_ls_prefix_is_a_group_not_a_string_prefix(tmp_path, store_path):
    _populate(tmp_path, store_path, {"g/a": np.arange(2), "gx/b": np.arange(2), "g": np.arange(1)})
    names = sorted(e["name"] for e in json.loads(ok("ls", store_path, "g", "--json").stdout))
    assert "gx/b" not in names and "g/a" in names


def test_get_slice_on_scalar_is_an_error(tmp_path, store_path):
    np.save(tmp_path / "s.npy", np.array(1.5))
    ok("put", store_path, "s", tmp_path / "s.npy")
    p = run("get", store_path, "s", "--slice", "0:1")
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr


def test_tail_zero_last_rows(tmp_path, store_path):
    np.save(tmp_path / "a.npy", np.arange(5))
    ok("put", store_path, "a", tmp_path / "a.npy")
    p = ok("tail", store_path, "a", "-n", "0")
    assert p.stdout.strip() == ""


def test_two_concurrent_compacts_to_same_output(tmp_path, store_path):
    rng = np.random.default_rng(4)
    with mmstore.Store(store_path) as s:
        for i in range(3):
            s.put(f"d{i}", rng.random(1_000_000))
    out = tmp_path / "o.h5"
    procs = [
        subprocess.Popen(
            [MMSTORE, "compact", str(store_path), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    with mmstore.Store(store_path, "r") as s, h5py.File(out, "r") as f:
        for i in range(3):
            assert np.array_equal(f[f"d{i}"][()], s[f"d{i}"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.h5")]


def test_npz_member_failure_keeps_earlier_members(tmp_path, store_path):
    # README: each member committed on its own; a member that fails stops after the ones before it
    np.savez(tmp_path / "m.npz", a_first=np.arange(3), b_bad=np.array([None, {}], dtype=object), c_last=np.arange(2))
    p = run("put", store_path, "m", tmp_path / "m.npz")
    assert_one_line_error(p, 1)
    with mmstore.Store(store_path, "r") as s:
        same(s["m/a_first"], np.arange(3))
        assert "m/b_bad" not in s


def test_import_skips_unsupported_names_and_bad_attrs(tmp_path):
    src = tmp_path / "f.h5"
    with h5py.File(src, "w") as f:
        f["good"] = np.arange(4)
        f["good"].attrs["nan"] = np.nan
        f["good"].attrs["ok"] = 3
        f["good"].attrs["bytes"] = np.bytes_(b"caf\xc3\xa9")
        f[".hidden"] = np.arange(2)
        f["g/soft"] = h5py.SoftLink("/good")
    p = run("import", src, tmp_path / "st")
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    assert ".hidden" in p.stdout + p.stderr
    with mmstore.Store(tmp_path / "st", "r") as s:
        same(s["good"], np.arange(4))
        assert s.attrs("good") == {"ok": 3, "bytes": "café"}
        assert sorted(s.keys()) == ["good"]


def test_nested_memoized_calls_across_processes_do_not_deadlock(tmp_path):
    path = tmp_path / "c"
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import os, sys, time, numpy as np, mmstore
        path, ready, go, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        c = mmstore.Cache(path)

        @c.memoize
        def inner(k):
            time.sleep(0.3)
            return np.array([k * 10])

        @c.memoize
        def outer(a, b):
            x = inner(a)
            time.sleep(0.3)
            y = inner(b)
            return np.concatenate([x, y])

        open(os.path.join(ready, str(os.getpid())), "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        r = outer(first, 1 - first)
        print(r.tolist())
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(ready), str(go), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        wait_for(lambda: len(list(ready.iterdir())) == 2, 120, "ready")
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0][0]) == [0, 10] and json.loads(outs[1][0]) == [10, 0]


def test_killed_setter_never_leaves_a_torn_entry(tmp_path):
    path = tmp_path / "c"
    n = 4_000_000  # 32 MiB per value
    code = textwrap.dedent("""
        import sys, numpy as np, mmstore
        c = mmstore.Cache(sys.argv[1])
        N = int(sys.argv[2])
        i = 0
        while True:
            c.set("k" + str(i % 6), np.full(N, i, "<i8"))
            print(i, flush=True)
            i += 1
    """)
    rnd = random.Random(8)
    for _trial in range(5):
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        p.stdout.readline()  # at least one set done
        time.sleep(rnd.uniform(0.0, 0.8))  # a random point of a later set
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        c = mmstore.Cache(path)
        for k in range(6):
            v = c.get(f"k{k}")
            if v is not None:
                assert v.shape == (n,) and v.dtype == np.dtype("<i8")
                assert v[0] == v[-1] and np.all(v == v[0]), f"torn entry k{k}"
        c.close()
    # and the cache still works
    c = mmstore.Cache(path)
    c.set("after", np.arange(3))
    same(c.get("after"), np.arange(3))
