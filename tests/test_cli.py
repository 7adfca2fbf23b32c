"""The installed `mmstore` command, run in subprocesses."""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT

BIN = Path(sys.executable).parent
GENOMIC = "chr:S10,pos:i4,pct:f4,c:i4,t:i4"
GENOMIC_DTYPE = np.dtype([("chr", "S10"), ("pos", "<i4"), ("pct", "<f4"), ("c", "<i4"), ("t", "<i4")])


def mmstore_cli(*args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    executable = BIN / "mmstore"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "mmstore.cli"]
    result = subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mmstore {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_import_mmstore_does_not_import_cli_or_hdf5_packages() -> None:
    code = "import sys, mmstore; print(sorted(m for m in ('typer', 'rich', 'h5py') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_put_get_npy_round_trip(tmp_path: Path) -> None:
    array = np.arange(30, dtype=">i2").reshape(10, 3)
    np.save(tmp_path / "in.npy", array)
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "a/b", str(tmp_path / "in.npy"), "--attr", "unit=px", "--attr", "scale=0.5")
    mmstore_cli("get", store, "a/b", "-o", str(tmp_path / "out.npy"))
    got = np.load(tmp_path / "out.npy")
    assert got.dtype == array.dtype and (got == array).all()
    assert mmstore.Store(store, "r").attrs("a/b") == {"unit": "px", "scale": 0.5}


def test_stdin_and_stdout_npy_streams(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    buffer = io.BytesIO()
    np.save(buffer, np.linspace(0, 1, 1001))
    mmstore_cli("put", store, "x", "-", stdin=buffer.getvalue())
    result = mmstore_cli("get", store, "x")  # stdout is a pipe: an .npy stream
    np.testing.assert_array_equal(np.load(io.BytesIO(result.stdout)), np.linspace(0, 1, 1001))
    result = mmstore_cli("get", store, "x", "--slice", "100:105")
    np.testing.assert_array_equal(np.load(io.BytesIO(result.stdout)), np.linspace(0, 1, 1001)[100:105])


def test_npz_members_go_under_the_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", first=np.arange(3), second=np.ones((2, 2)))
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "bundle", str(tmp_path / "in.npz"))
    with mmstore.Store(store, "r") as opened:
        assert opened.keys() == ["bundle/first", "bundle/second"]


def test_text_put_and_csv_get(tmp_path: Path) -> None:
    (tmp_path / "g.txt").write_text("chr pos pct c t\nchr1 10 0.5 3 7\nchrX 20 0.25 1 2\n")
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "g", str(tmp_path / "g.txt"), "--dtype", GENOMIC, "--skip-rows", "1")
    with mmstore.Store(store, "r") as opened:
        got = opened.get("g")
        assert got.dtype == GENOMIC_DTYPE
        assert got.tolist() == [(b"chr1", 10, 0.5, 3, 7), (b"chrX", 20, 0.25, 1, 2)]
    mmstore_cli("get", store, "g", "-o", str(tmp_path / "g.csv"))
    assert (tmp_path / "g.csv").read_text() == "chr1,10,0.5,3,7\nchrX,20,0.25,1,2\n"
    (tmp_path / "m.csv").write_text("1,2\n3,4\n")
    mmstore_cli("put", store, "m", str(tmp_path / "m.csv"))
    assert mmstore.Store(store, "r").get("m").tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_big_text_file_streams_in_blocks(tmp_path: Path) -> None:
    rows = 200_000  # several parse blocks
    path = tmp_path / "big.csv"
    with open(path, "w") as out:
        for i in range(rows):
            out.write(f"{i},{i * 0.5}\n")
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "big", str(path), "--dtype", "i:i8,v:f8")
    got = mmstore.Store(store, "r").get("big")
    assert len(got) == rows and got["i"][-1] == rows - 1 and got["v"][-1] == (rows - 1) * 0.5


def test_ls_info_rm_json(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("a/x", np.zeros((2, 3), np.float32), attrs={"k": 1})
        opened.put("b", np.arange(4))
    listing = json.loads(mmstore_cli("ls", store, "--json").stdout)
    assert [item["name"] for item in listing] == ["a/x", "b"]
    assert listing[0]["shape"] == [2, 3] and listing[0]["dtype"] == "<f4" and listing[0]["attrs"] == {"k": 1}
    table = mmstore_cli("ls", store, "a").stdout.decode()
    assert "a/x" in table and "b " not in table
    info = json.loads(mmstore_cli("info", store, "b", "--json").stdout)
    assert info["generation"] == 1 and info["nbytes"] == 32
    mmstore_cli("rm", store, "a/x", "b")
    assert json.loads(mmstore_cli("ls", store, "--json").stdout) == []


def test_names_and_dtypes_with_brackets_are_shown_as_they_are(tmp_path: Path) -> None:
    """Square brackets are Rich markup: ls, the get preview and cache info print them literally."""
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("sec", np.array(["2020-01-01"], "M8[s]"))
        opened.put("a[b]/c", np.arange(1))
        opened.put("name[s]", np.arange(2))
    table = mmstore_cli("ls", store).stdout.decode()
    assert "<M8[s]" in table and "a[b]/c" in table and "name[s]" in table
    from mmstore import cli

    with cli.out.capture() as captured:
        cli._preview("name[s]", np.array(["2020-01-01"], "M8[s]"))
    assert captured.get().startswith("name[s]  dtype datetime64[s]")
    with cli.out.capture() as captured:  # (nor emoji codes)
        cli._preview(":smile:", np.array([":thumbs_up:"]))
    assert captured.get().startswith(":smile:  dtype") and ":thumbs_up:" in captured.get()


def test_put_of_a_bad_npy_file_says_what_is_wrong(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    text = tmp_path / "text.npy"
    text.write_text("1,2,3\n")
    whole = tmp_path / "whole.npy"
    np.save(whole, np.arange(10_000.0))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(whole.read_bytes()[:5000])
    result = mmstore_cli("put", store, "x", str(text), check=False)
    assert result.returncode == 1 and "not an .npy" in one_line_error(result) and "pickle" not in one_line_error(result)
    result = mmstore_cli("put", store, "x", str(truncated), check=False)
    assert result.returncode == 1 and "truncated.npy: truncated .npy file (5000 bytes" in one_line_error(result)
    mmstore_cli("put", store, "x", str(whole))
    assert mmstore.Store(store, "r").get("x")[-1] == 9999.0


def test_csv_fields_holding_delimiters_or_quotes_round_trip(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    kind = np.dtype([("s", "U12"), ("n", "<i4")])
    rows = np.array(
        [("héllo", 1), ("a,b", 2), ('say "hi"', 3), ("", 4), ("x#y", 5), ("two words", 6), ("a\u00a0b\x0bc", 7)],
        kind,
    )
    with mmstore.Store(store) as opened:
        opened.put("t", rows)
    for suffix in (".csv", ".tsv", ".txt"):
        out = tmp_path / f"t{suffix}"
        mmstore_cli("get", store, "t", "-o", str(out))
        mmstore_cli("put", store, f"back{suffix}", str(out), "--dtype", "s:U12,n:i4")
        with mmstore.Store(store, "r") as opened:
            np.testing.assert_array_equal(opened.get(f"back{suffix}"), rows)
    assert '"a,b",2' in (tmp_path / "t.csv").read_text()


def test_a_put_or_import_that_cannot_work_creates_no_store(tmp_path: Path) -> None:
    """A missing source, a bad name, an unknown source type, an .npz with a bad member
    name, or a file that is not HDF5: refused before the store is opened (and created)."""
    store = tmp_path / "never"
    good = tmp_path / "good.npy"
    np.save(good, np.arange(3))
    (tmp_path / "t.xyz").write_text("x")
    (tmp_path / "notes.h5").write_text("not HDF5")
    np.savez(tmp_path / "bad.npz", a=np.arange(2), **{".hidden": np.arange(2)})
    cases = [
        (["put", str(store), "x", str(tmp_path / "missing.npy")], 1, "missing.npy"),
        (["put", str(store), "../x", str(good)], 1, "invalid dataset name"),
        (["put", str(store), "x", str(tmp_path / "t.xyz")], 2, "unknown source type"),
        (["put", str(store), "x", str(tmp_path / "bad.npz")], 1, "'x/.hidden'"),
        (["import", str(tmp_path / "missing.h5"), str(store)], 1, "missing.h5"),
        (["import", str(tmp_path / "notes.h5"), str(store)], 1, "notes.h5: not an HDF5 file"),
    ]
    for args, code, message in cases:
        result = mmstore_cli(*args, check=False)
        assert result.returncode == code and message in one_line_error(result), (args, result.stderr)
        assert not store.exists(), args


def test_put_from_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """The check for a missing source must not open it: a FIFO can be opened only once."""
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_text("1\n2\n3\n"), daemon=True)
    feeder.start()
    result = mmstore_cli("put", str(tmp_path / "s"), "x", str(fifo), check=False)  # (bounded by PROCESS_TIMEOUT)
    feeder.join(PROCESS_TIMEOUT)
    assert not feeder.is_alive()
    if result.returncode == 0:
        assert mmstore.Store(str(tmp_path / "s"), "r").get("x").tolist() == [1.0, 2.0, 3.0]
    else:
        assert result.returncode == 1 and "Traceback" not in result.stderr.decode()


def test_tail_of_a_0d_dataset_says_why_it_shows_nothing(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("z", np.float64(3.5))
    result = mmstore_cli("tail", store, "z", check=False)
    assert result.returncode == 1 and "0-d" in one_line_error(result)


def test_read_only_advice_speaks_of_commands_not_modes() -> None:
    from mmstore import cli

    message = cli._one_line(mmstore.ReadOnlyError("store '/s' is not writable; open it with mode='r'"))
    assert "mode=" not in message and "ls, info, get and verify can still read it" in message


def test_verify_recover_exit_codes(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("ok", np.arange(4))
        opened.put("bad", np.arange(1000))
        data_file = opened.info("bad")["data_file"]
    assert mmstore_cli("verify", store).returncode == 0
    with open(data_file, "r+b") as handle:
        handle.write(b"\xff\xff")
    result = mmstore_cli("verify", store, check=False)
    assert result.returncode == 1 and b"bad" in result.stdout and b"checksum" in result.stdout
    result = mmstore_cli("recover", store)
    assert b"quarantined bad" in result.stdout
    assert mmstore_cli("verify", store).returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["get", "{tmp}/missing-store", "x"], 1, "no mmstore store"),
        (["get", "{store}", "missing"], 1, "no dataset 'missing'"),
        (["put", "{store}", "../escape", "{npy}"], 1, "invalid dataset name"),
        (["put", "{store}", "x", "{tmp}/does-not-exist.npy"], 1, "No such file"),
        (["put", "{store}", "x", "{txt}", "--dtype", "q99"], 2, "not a dtype"),
        (["put", "{store}", "x", "{badtxt}", "--dtype", GENOMIC], 1, "line 3, column 2 ('pos'): cannot parse 'abc'"),
        (["put", "{store}", "x", "{badtxt2}", "--dtype", GENOMIC], 1, "line 2: 4 columns, expected 5"),
        (["put", "{store}", "x", "{badcsv}", "--dtype", "f8"], 1, "line 3: column 3 is missing"),
        (["get", "{store}", "y", "--slice", "a:b"], 2, "--slice"),
        (["get", "{store}", "y", "--slice", "1:2:0"], 2, "--slice STEP cannot be zero"),
        (["compact", "{store}", "{tmp}/o.h5", "--compression", "zip"], 2, "--compression"),
        (["put", "{store}", "x", "{tmp}/data.xyz"], 2, "unknown source type"),
        (["nosuchcommand"], 2, ""),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    store = tmp_path / "s"
    with mmstore.Store(store) as opened:
        opened.put("y", np.arange(3))
    np.save(tmp_path / "ok.npy", np.arange(3))
    (tmp_path / "ok.txt").write_text("chr1 1 0.5 1 1\n")
    (tmp_path / "bad.txt").write_text("chr1 1 0.5 1 1\nchr2 2 0.5 1 1\nchr3 abc 0.5 1 1\n")
    (tmp_path / "bad2.txt").write_text("chr1 1 0.5 1 1\nchr2 2 0.5 1\n")
    (tmp_path / "data.xyz").write_text("?")
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5,6\n7,8\n")
    values = {
        "tmp": str(tmp_path), "store": str(store), "npy": str(tmp_path / "ok.npy"),
        "txt": str(tmp_path / "ok.txt"), "badtxt": str(tmp_path / "bad.txt"), "badtxt2": str(tmp_path / "bad2.txt"),
        "badcsv": str(tmp_path / "bad.csv"),
    }  # fmt: skip
    result = mmstore_cli(*(arg.format(**values) for arg in args), check=False)
    assert result.returncode == code, result.stderr
    if code == 1:
        assert fragment in one_line_error(result)
    else:
        assert fragment in result.stderr.decode()
    assert "x" not in mmstore.Store(store, "r")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = mmstore_cli("--debug", "get", str(tmp_path / "nope"), "x", check=False)
    assert result.returncode != 0 and b"Traceback" in result.stderr


def test_tail_prints_rows(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened, opened.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(25))
    result = mmstore_cli("tail", store, "t", "-n", "3", "--idle-timeout", "0.05")
    assert result.stdout.decode().split() == ["22", "23", "24"]


def test_compact_and_import_round_trip(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("genome/a", np.zeros(3, GENOMIC_DTYPE), attrs={"sample": "a", "depth": [1, 2]})
        opened.put("times", np.array(["2024-01-01T00:00", "NaT"], "M8[m]"))
        opened.put("names", np.array(["αβγ", "x"], "<U3"))
        opened.put("other/z", np.arange(4.0))
    out = tmp_path / "out.h5"
    mmstore_cli("compact", store, str(out), "--compression", "gzip", "--chunks", "auto")
    with h5py.File(out, "r") as h5:
        assert h5["genome/a"].dtype == GENOMIC_DTYPE
        assert h5["genome/a"].attrs["sample"] == "a"
        assert list(h5["genome/a"].attrs["depth"]) == [1, 2]
        assert h5["times"].attrs["mmstore.dtype"] == '"<M8[m]"'
        assert h5["genome/a"].compression == "gzip"
    mmstore_cli("compact", store, str(tmp_path / "only.h5"), "--only", "genome")
    with h5py.File(tmp_path / "only.h5", "r") as h5:
        assert list(h5) == ["genome"]
    back = str(tmp_path / "back")
    mmstore_cli("import", str(out), back)
    with mmstore.Store(store, "r") as a, mmstore.Store(back, "r") as b:
        assert a.keys() == b.keys()
        for name in a:
            assert a.get(name).dtype == b.get(name).dtype
            assert a.get(name).tobytes() == b.get(name).tobytes()
            assert a.attrs(name) == b.attrs(name)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temp files left beside the output"


def test_genomics_example_script(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "example_genomics.sh"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(script), str(tmp_path / "work"), "3", "5000"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 15000 records in genomics.h5 match" in result.stdout


def test_compact_fits_an_explicit_chunk_shape_to_every_dataset(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("small", np.arange(10, dtype=np.int64))
    result = mmstore_cli("compact", store, str(tmp_path / "o.h5"), "--compression", "lzf", "--chunks", "1000")
    assert result.returncode == 0
    with h5py.File(tmp_path / "o.h5", "r") as h5:
        assert h5["small"].chunks == (10,) and h5["small"][...].tolist() == list(range(10))
    with mmstore.Store(store) as opened:
        opened.put("table", np.arange(12.0).reshape(4, 3))
        opened.put("scalar", np.array(3))
        opened.put("empty", np.zeros((0, 2)))
    mmstore_cli("compact", store, str(tmp_path / "o2.h5"), "--chunks", "2")
    with h5py.File(tmp_path / "o2.h5", "r") as h5:
        chunks = {name: h5[name].chunks for name in h5}
        assert chunks == {"small": (2,), "table": (2, 3), "scalar": None, "empty": None}
        assert h5["table"][...].tolist() == np.arange(12.0).reshape(4, 3).tolist()
    result = mmstore_cli("compact", store, str(tmp_path / "o3.h5"), "--chunks", "2,0", check=False)
    assert result.returncode == 2 and "--chunks" in result.stderr.decode()


def test_global_flags_after_the_subcommand_and_rm_all_or_nothing(tmp_path: Path) -> None:
    source = tmp_path / "a.npy"
    np.save(source, np.arange(5))
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "a", str(source), "--quiet")
    missing = mmstore_cli("get", store, "zzz", "--debug", check=False)
    assert missing.returncode == 1 and b"Traceback" in missing.stderr  # --debug took effect
    partial = mmstore_cli("rm", store, "a", "zzz", check=False)
    assert partial.returncode == 1 and "zzz" in one_line_error(partial)
    with mmstore.Store(store, "r") as opened:
        assert "a" in opened  # nothing was deleted
    mmstore_cli("rm", store, "a")
    with mmstore.Store(store, "r") as opened:
        assert "a" not in opened


def test_cache_commands_refuse_a_store_that_is_not_a_cache(tmp_path: Path) -> None:
    with mmstore.Store(tmp_path / "s") as store:
        store.put("x", np.arange(3))
    before = sorted(os.listdir(tmp_path / "s"))
    for command in ("info", "clear"):
        result = mmstore_cli("cache", command, str(tmp_path / "s"), check=False)
        assert result.returncode == 1 and "not a cache" in one_line_error(result)
    assert sorted(os.listdir(tmp_path / "s")) == before


def test_npz_members_and_npy_streams_keep_their_shapes(tmp_path: Path) -> None:
    """Members are streamed in row blocks; 0-d and empty members keep their exact shapes."""
    members = {"a": np.arange(10), "s": np.float64(3.5), "e": np.zeros((0, 3)), "m": np.ones((1000, 7), ">i2")}
    np.savez_compressed(tmp_path / "z.npz", **members)
    store = str(tmp_path / "s")
    mmstore_cli("put", store, "z", str(tmp_path / "z.npz"))
    buffer = io.BytesIO()
    np.save(buffer, np.int32(7))
    mmstore_cli("put", store, "scalar", "-", stdin=buffer.getvalue())
    np.save(tmp_path / "big.npy", np.arange(9_000_000, dtype="<f8").reshape(-1, 9))  # above the block size
    mmstore_cli("put", store, "big", str(tmp_path / "big.npy"))
    with mmstore.Store(store, "r") as opened:
        for member, value in members.items():
            got = opened.get(f"z/{member}")
            assert got.shape == np.shape(value) and got.dtype == np.asarray(value).dtype
            assert got.tobytes() == np.asarray(value).tobytes()
        assert opened.get("scalar").shape == () and opened.get("scalar") == 7
        np.testing.assert_array_equal(opened.get("big"), np.arange(9_000_000, dtype="<f8").reshape(-1, 9))
        assert opened.verify().ok


def test_get_output_never_uses_a_fixed_temp_name(tmp_path: Path) -> None:
    """A leftover (or another get's) `.out.npy.partial` is neither truncated nor renamed."""
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("x", np.arange(1000.0))
    other = tmp_path / ".out.npy.partial"
    other.write_bytes(b"another writer's bytes")
    mmstore_cli("get", store, "x", "-o", str(tmp_path / "out.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.arange(1000.0))
    assert other.read_bytes() == b"another writer's bytes"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [".out.npy.partial"]


def test_concurrent_gets_to_one_output_each_write_a_whole_file(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    arrays = {"a": np.arange(2_000_000, dtype=np.int64), "b": -np.arange(2_000_000, dtype=np.int64)}
    with mmstore.Store(store) as opened:
        for name, array in arrays.items():
            opened.put(name, array)
    out = tmp_path / "out.npy"
    command = [str(BIN / "mmstore")] if (BIN / "mmstore").exists() else [sys.executable, "-m", "mmstore.cli"]
    for _round in range(3):
        processes = [
            subprocess.Popen([*command, "get", store, name, "-o", str(out)], stderr=subprocess.PIPE) for name in arrays
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
            assert process.returncode == 0, stderr.decode()
        got = np.load(out)
        assert any(np.array_equal(got, array) for array in arrays.values())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_failed_get_output_leaves_no_temp_file_and_names_the_output(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("u", np.array(["fine", "a\ud800b"]))  # a lone surrogate: not UTF-8
    result = mmstore_cli("get", store, "u", "-o", str(tmp_path / "u.csv"), check=False)
    message = one_line_error(result)
    assert result.returncode == 1 and "u.csv line 2" in message and "'\\ud800'" in message, message
    assert os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_get_output_leaves_no_temp_file(tmp_path: Path, signum: int, code: int) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("big", np.random.default_rng(0).random((300_000, 2)))  # seconds of CSV formatting
    out = tmp_path / "out" / "big.csv"
    out.parent.mkdir()
    command = [str(BIN / "mmstore")] if (BIN / "mmstore").exists() else [sys.executable, "-m", "mmstore.cli"]
    process = subprocess.Popen([*command, "get", store, "big", "-o", str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not os.listdir(out.parent):  # the temp file appears: the write has begun
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == code, stderr.decode()
    assert os.listdir(out.parent) == [], "neither the output nor a temp file"


SUBARRAY_DTYPE = np.dtype([("id", "<i4"), ("v", "<f8", (3,)), ("tag", "S2", (2,)), ("long", "<f4", (12,))])


def test_sub_array_fields_are_written_one_column_per_element(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    rows = np.zeros(2, SUBARRAY_DTYPE)
    rows[0] = (1, [1 / 3, 2 / 3, 1.0], [b"ab", b"cd"], np.arange(12) / 7)
    rows[1] = (-2, [1e-300, -0.0, 2.5], [b"x", b""], np.full(12, 0.1))
    with mmstore.Store(store) as opened:
        opened.put("r", rows)
        with opened.create("g", SUBARRAY_DTYPE, (0,), growable=True) as writer:
            writer.append(rows)
    dtype_text = json.loads(mmstore_cli("info", store, "r", "--json").stdout)["dtype"]
    assert dtype_text == "id:<i4,v:(3,)<f8,tag:(2,)S2,long:(12,)<f4"
    mmstore_cli("get", store, "r", "-o", str(tmp_path / "r.csv"))
    first = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert first[:6] == ["1", repr(1 / 3), repr(2 / 3), "1.0", "ab", "cd"] and len(first) == 18
    assert "[" not in (tmp_path / "r.csv").read_text() and "..." not in (tmp_path / "r.csv").read_text()
    for suffix in (".csv", ".txt"):
        mmstore_cli("get", store, "r", "-o", str(tmp_path / f"r{suffix}"))
        mmstore_cli("put", store, f"back{suffix}", str(tmp_path / f"r{suffix}"), "--dtype", dtype_text)
        with mmstore.Store(store, "r") as opened:
            assert opened.get(f"back{suffix}").tobytes() == rows.tobytes()
    tailed = mmstore_cli("tail", store, "g", "--idle-timeout", "0.05").stdout.decode()
    assert tailed == (tmp_path / "r.txt").read_text()
    (tmp_path / "short.csv").write_text("1,0.5,0.5,ab,cd\n")
    result = mmstore_cli(
        "put", store, "x", str(tmp_path / "short.csv"), "--dtype", "id:i4,v:(3,)f8,t:(2,)S2", check=False
    )
    assert "5 columns, expected 6 (id, v[0], v[1], v[2], t[0], t[1])" in one_line_error(result)


def test_bool_and_time_values_round_trip_through_text(tmp_path: Path) -> None:
    """get -o x.csv then put --dtype gives the same array: bools, datetimes (with NaT) in
    ISO 8601 at their unit's precision, timedeltas as counts of their unit."""
    from mmstore._textio import dtype_text

    kinds = ["?", "M8[s]", ">M8[s]", "M8[ns]", "M8[D]", "M8[10s]", "m8[s]", ">m8[ns]"]
    record = np.zeros(4, [*((f"f{index}", kind) for index, kind in enumerate(kinds)), ("f8", "?", (2,))])
    seconds = np.array(["2020-01-01T00:00:01", "NaT", "1969-12-31T23:59:59", "1677-09-22T00:12:43"], "M8[s]")
    record["f0"] = [True, False, True, False]
    record["f1"] = record["f2"] = seconds
    record["f3"] = np.array(["2020-01-01T00:00:01.123456789", "NaT", "1970-01-01", "1969-12-31T23:59:59.5"], "M8[ns]")
    record["f4"] = np.array(["2020-02-29", "NaT", "1970-01-01", "0001-01-01"], "M8[D]")
    record["f5"] = np.array([1, -1, 157783680, -(2**40)], "i8").view("M8[10s]")
    record["f6"] = np.array([1, -3, 0, "NaT"], "m8[s]")
    record["f7"] = np.array([1_500_000_000_000_000_000, -1, "NaT", 0], "m8[ns]")
    record["f8"] = [[True, False], [False, False], [True, True], [False, True]]
    cases = {
        "record": record,
        "bool": record["f0"],
        "seconds": seconds,
        "nanoseconds": record["f3"],
        "td": record["f6"],
    }
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        for name, array in cases.items():
            opened.put(name, array)
    for name, array in cases.items():
        for suffix in (".csv", ".txt") if name == "record" else (".csv",):
            out = str(tmp_path / f"{name}{suffix}")
            mmstore_cli("get", store, name, "-o", out)
            mmstore_cli("put", store, f"back/{name}{suffix}", out, "--dtype", dtype_text(array.dtype))
            with mmstore.Store(store, "r") as opened:
                back = opened.get(f"back/{name}{suffix}")
                assert back.dtype == array.dtype and back.tobytes() == array.tobytes(), (name, suffix)
    assert (
        tmp_path / "seconds.csv"
    ).read_text() == "2020-01-01T00:00:01\nNaT\n1969-12-31T23:59:59\n1677-09-22T00:12:43\n"
    assert (tmp_path / "bool.csv").read_text() == "True\nFalse\nTrue\nFalse\n"
    assert (tmp_path / "td.csv").read_text() == "1\n-3\n0\nNaT\n"
    (tmp_path / "bad.csv").write_text("1,True\n2,maybe\n")
    result = mmstore_cli("put", store, "x", str(tmp_path / "bad.csv"), "--dtype", "i:i4,ok:?", check=False)
    assert "line 2, column 2 ('ok'): cannot parse 'maybe' as bool" in one_line_error(result)


def test_rm_of_a_name_given_twice_deletes_it_once(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("a", np.arange(3))
        opened.put("b", np.arange(3))
    mmstore_cli("rm", store, "a", "b", "a")
    with mmstore.Store(store, "r") as opened:
        assert opened.keys() == []


@pytest.mark.parametrize("timestamp", [1e300, -1e13, 1e11])
def test_a_timestamp_out_of_range_is_shown_as_a_number(tmp_path: Path, timestamp: float) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("a", np.arange(3))
        opened.put("b", np.arange(3))
    sidecar = tmp_path / "s" / "a.json"
    header = json.loads(sidecar.read_text())
    header["created"] = header["modified"] = timestamp
    sidecar.write_text(json.dumps(header))
    with mmstore.Store(store, "r") as opened:
        assert opened.info("a")["modified"] == timestamp  # (the library accepts it)
    listing = mmstore_cli("ls", store).stdout.decode()
    assert [line.split()[0] for line in listing.splitlines()[1:]] == ["a", "b"]
    shown = mmstore_cli("info", store, "a").stdout.decode()
    assert f"modified: {timestamp}" in shown or f"modified: {datetime.datetime.fromtimestamp(timestamp)}" in shown


def test_tail_of_a_fixed_size_dataset_prints_its_last_rows_and_exits(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("fixed", np.arange(25))
        opened.put("empty", np.zeros((0, 2)))
    command = [str(BIN / "mmstore")] if (BIN / "mmstore").exists() else [sys.executable, "-m", "mmstore.cli"]
    result = subprocess.run([*command, "tail", store, "fixed", "-n", "3"], capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout.decode().split() == ["22", "23", "24"]
    result = subprocess.run([*command, "tail", store, "empty"], capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == b""


def test_a_failed_put_removes_the_store_it_created(tmp_path: Path) -> None:
    """Empty stdin, a ragged CSV (past the first parse block, too), a missing HDF5 path:
    a store the put created is removed again; one that existed, or holds datasets, stays."""
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    (tmp_path / "late.csv").write_text("1,2\n" * 70_000 + "3\n")
    with h5py.File(tmp_path / "foreign.h5", "w") as h5:
        h5["present"] = np.arange(3)
    sources = ["-", str(tmp_path / "ragged.csv"), str(tmp_path / "late.csv"), f"{tmp_path / 'foreign.h5'}:/missing"]
    for source in sources:
        store = tmp_path / "new" / "store"
        result = mmstore_cli("put", str(store), "g/x", source, stdin=b"", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr.decode(), source
        assert not (tmp_path / "new").exists(), (source, os.listdir(tmp_path / "new"))
    empty = tmp_path / "empty"
    mmstore.Store(empty).close()  # an existing store with no datasets
    result = mmstore_cli("put", str(empty), "x", str(tmp_path / "ragged.csv"), check=False)
    assert result.returncode == 1 and os.listdir(empty) == ["mmstore.json"]
    with mmstore.Store(tmp_path / "used") as opened:
        opened.put("kept", np.arange(3))
    result = mmstore_cli("put", str(tmp_path / "used"), "x", "-", stdin=b"", check=False)
    assert result.returncode == 1 and mmstore.Store(tmp_path / "used", "r").keys() == ["kept"]


def test_a_store_that_gains_a_file_while_it_is_removed_keeps_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstore import cli

    store = tmp_path / "s"
    mmstore.Store(store).close()
    manifest = (store / "mmstore.json").read_bytes()
    real_rmdir = os.rmdir

    def rmdir_after_another_process_writes(path: Any) -> None:
        (store / "x.0123456789abcdef.dat").write_bytes(b"another writer")  # (it opened the store just before)
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", rmdir_after_another_process_writes)
    cli.remove_unused_store(store, [store])
    assert (store / "mmstore.json").read_bytes() == manifest
    assert sorted(os.listdir(store)) == ["mmstore.json", "x.0123456789abcdef.dat"]


def test_a_damaged_npz_gives_one_line(tmp_path: Path) -> None:
    import zipfile

    np.savez(tmp_path / "cut.npz", a=np.arange(2))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:-40])  # no central directory
    np.savez(tmp_path / "crc.npz", a=np.arange(2000), b=np.arange(5))
    data = bytearray((tmp_path / "crc.npz").read_bytes())
    offset = zipfile.ZipFile(tmp_path / "crc.npz").getinfo("b.npy").header_offset + 60
    data[offset : offset + 30] = b"x" * 30  # b's bytes: a bad CRC-32
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    store = str(tmp_path / "s")
    result = mmstore_cli("put", store, "cut", str(tmp_path / "cut.npz"), check=False)
    assert result.returncode == 1 and "cut.npz: not a readable .npz archive" in one_line_error(result)
    result = mmstore_cli("put", store, "crc", str(tmp_path / "crc.npz"), check=False)
    assert result.returncode == 1 and "crc.npz:b: not a readable .npz archive (Bad CRC-32" in one_line_error(result)
    assert mmstore.Store(store, "r").keys() == ["crc/a"]  # (members commit one by one, as README says)


def test_compact_of_a_dataset_that_is_also_a_group_follows_its_own_advice(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("a", np.arange(2))
        opened.put("a/b", np.arange(3))
    refused = mmstore_cli("compact", store, str(tmp_path / "all.h5"), check=False)
    assert refused.returncode == 1 and "--only a/" in one_line_error(refused)
    for only, expected in (("a", ["a"]), ("a/", ["a/b"])):
        done = mmstore_cli("compact", store, str(tmp_path / "part.h5"), "--only", only)
        assert b"wrote 1 datasets (" in done.stderr
        with h5py.File(tmp_path / "part.h5", "r") as h5:
            found = sorted(name for name in _h5_names(h5) if isinstance(h5[name], h5py.Dataset))
        assert found == expected


def _h5_names(h5: Any) -> list[str]:
    names: list[str] = []
    h5.visit(names.append)
    return names
