"""The `mmstore` command against the contract (README "Command line", issue 4): what
tests/test_cli.py does not already pin down, found by a black-box audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mmstore
from tests.conftest import PROCESS_TIMEOUT
from tests.test_cli import BIN, mmstore_cli, one_line_error

COMMANDS = [
    [], ["put"], ["get"], ["ls"], ["info"], ["rm"], ["tail"], ["verify"], ["recover"], ["compact"], ["import"],
    ["demo"], ["cache"], ["cache", "info"], ["cache", "clear"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "mmstore")
def test_help_of_every_command(command: list[str]) -> None:
    result = mmstore_cli(*command, "--help")
    assert result.returncode == 0 and b"Usage: mmstore" in result.stdout and not result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "{store}"], ["info", "{store}", "x"], ["get", "{store}", "x", "-o", "{tmp}/x.npy"],
        ["rm", "{store}", "x"], ["tail", "{store}", "x"], ["verify", "{store}"], ["recover", "{store}"],
        ["compact", "{store}", "{tmp}/o.h5"],
    ],
    ids=lambda a: a[0],
)  # fmt: skip
def test_every_command_on_a_missing_store_says_so_in_one_line_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    store = tmp_path / "missing"
    result = mmstore_cli(*(a.format(store=store, tmp=tmp_path) for a in args), check=False)
    assert result.returncode == 1
    assert "no mmstore store" in one_line_error(result)
    assert os.listdir(tmp_path) == []


def test_a_failed_get_output_names_the_output_not_its_temp_file(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened:
        opened.put("x", np.arange(3))
    missing = tmp_path / "no-such-dir" / "x.npy"
    result = mmstore_cli("get", store, "x", "-o", str(missing), check=False)
    assert result.returncode == 1
    assert one_line_error(result) == f"mmstore: error: No such file or directory: {missing}"
    (tmp_path / "taken.npy").mkdir()  # an output that is a directory: the rename fails
    result = mmstore_cli("get", store, "x", "-o", str(tmp_path / "taken.npy"), check=False)
    assert result.returncode == 1
    message = one_line_error(result)
    assert message.endswith(f": {tmp_path / 'taken.npy'}") and "partial" not in message
    assert sorted(os.listdir(tmp_path)) == ["s", "taken.npy"] and os.listdir(tmp_path / "taken.npy") == []


def test_a_delimiter_of_more_than_one_character_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("1 2\n3 4\n")
    result = mmstore_cli("put", str(tmp_path / "s"), "x", str(tmp_path / "t.txt"), "--delimiter", "ab", check=False)
    assert result.returncode == 2
    assert "--delimiter takes one character" in result.stderr.decode()
    assert not (tmp_path / "s").exists()


def test_a_cell_holding_no_delimiter_is_named_by_its_line_and_column(tmp_path: Path) -> None:
    """A space-separated table put with --delimiter ',': the first cell is "1 2", which
    NumPy's message placed on line 0."""
    (tmp_path / "t.txt").write_text("1 2\n3 4\n")
    (tmp_path / "c.csv").write_text("1,2\n3,4\n5 6,7\n")
    result = mmstore_cli("put", str(tmp_path / "s"), "x", str(tmp_path / "t.txt"), "--delimiter", ",", check=False)
    assert result.returncode == 1
    assert "t.txt line 1, column 1: cannot parse '1 2' as float64" in one_line_error(result)
    result = mmstore_cli("put", str(tmp_path / "s"), "x", str(tmp_path / "c.csv"), check=False)
    assert result.returncode == 1
    assert "c.csv line 3, column 1: cannot parse '5 6' as float64" in one_line_error(result)
    assert not (tmp_path / "s").exists()


def test_ls_marks_growable_datasets_and_shows_their_committed_length(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened, opened.create("g", np.int32, (0, 2), growable=True) as writer:
        opened.put("fixed", np.zeros(3, np.float32))
        writer.append(np.ones((4, 2), np.int32))
        writer.flush()
        writer.append(np.ones((3, 2), np.int32))  # not flushed: no command may show it
        lines = mmstore_cli("ls", store).stdout.decode().splitlines()
        assert lines[0].split() == ["name", "dtype", "shape", "size", "modified"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert set(rows) == {"fixed", "g"}
        assert "(4, 2) +" in rows["g"] and "32 B" in rows["g"]
        assert "(3,)" in rows["fixed"] and "+" not in rows["fixed"]
        listing = {item["name"]: item for item in json.loads(mmstore_cli("ls", store, "--json").stdout)}
        assert listing["g"]["shape"] == [4, 2] and listing["g"]["growable"] is True
        assert listing["fixed"]["growable"] is False
        got = mmstore_cli("get", store, "g", "-o", str(tmp_path / "g.npy"))
        assert got.returncode == 0 and np.load(tmp_path / "g.npy").shape == (4, 2)
        assert json.loads(mmstore_cli("info", store, "g", "--json").stdout)["shape"] == [4, 2]


def test_tail_count_stops_after_that_many_new_rows_even_within_one_flush(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    with mmstore.Store(store) as opened, opened.create("t", np.int64, (0,), growable=True) as writer:
        writer.append(np.arange(10))
        writer.flush()
        command = [str(BIN / "mmstore")] if (BIN / "mmstore").exists() else [sys.executable, "-m", "mmstore.cli"]
        tail = subprocess.Popen(
            [*command, "tail", store, "t", "-n", "2", "--count", "2", "--idle-timeout", str(PROCESS_TIMEOUT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert tail.stdout is not None
            shown = [tail.stdout.readline(), tail.stdout.readline()]  # the last rows: tail now follows
            assert shown == [b"8\n", b"9\n"]
            writer.append(np.arange(10, 15))  # one flush of 5 rows, 2 of them wanted
            writer.flush()
            rest, stderr = tail.communicate(timeout=PROCESS_TIMEOUT)
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.wait()
    assert tail.returncode == 0, stderr.decode()
    assert rest.decode().split() == ["10", "11"]
