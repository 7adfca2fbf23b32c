"""Model-based test: random sequences of store operations checked against a plain dict.

Besides this process's own handle and a second read-only handle, a second *process*
(spawned once, kept for the whole test) reads every dataset after every step through a
read-only Store it keeps open across steps: its cached entries must never serve a value
that this process has since replaced, deleted or appended to.
"""

from __future__ import annotations

import atexit
import multiprocessing
import shutil
import tempfile
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

import mmstore
from tests import workers
from tests.conftest import PROCESS_TIMEOUT

NAMES = st.sampled_from(["a", "b", "g/a", "g/b", "g/h/c", "x.json", "v1.2"])
DTYPES = st.sampled_from(["<i4", ">f8", "u1", "?", "S3", "<U2", "<M8[s]", "c8"])


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    array = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape) if raw else np.zeros(shape, dtype)
    return array


_reader: tuple[Any, Any] | None = None  # (process, connection) of the reading process


def _reader_connection() -> Any:
    global _reader
    if _reader is None or not _reader[0].is_alive():
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=workers.model_reader, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        _reader = (process, ours)
        atexit.register(_stop_reader)
    return _reader[1]


def _stop_reader() -> None:
    global _reader
    if _reader is not None:
        process, connection = _reader
        _reader = None
        try:
            connection.send(None)
        except OSError:
            pass
        process.join(PROCESS_TIMEOUT)


def _ask_reader(request: tuple[str, str]) -> Any:
    connection = _reader_connection()
    connection.send(request)
    assert connection.poll(PROCESS_TIMEOUT), f"the reading process did not answer {request!r}"
    answer = connection.recv()
    if isinstance(answer, tuple) and answer and answer[0] == "error":
        raise AssertionError(f"the reading process failed: {answer[1]}")
    return answer


class StoreMachine(RuleBasedStateMachine):
    """Puts, deletes, appends, flushes and reopens, mirrored in a dict of bytes."""

    snapshots = Bundle("snapshots")

    @initialize()
    def open_store(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mmstore-model-")
        self.store = mmstore.Store(f"{self.directory}/s")
        self.model: dict[str, tuple[str, tuple[int, ...], bytes, dict]] = {}
        self.log: list[int] = []  # the model of a growable dataset "log"
        self.log_committed = 0
        self.writer: mmstore.Writer | None = None

    @rule(name=NAMES, array=arrays(), tag=st.integers(0, 9))
    def put(self, name: str, array: np.ndarray, tag: int) -> None:
        self.store.put(name, array, attrs={"tag": tag})
        self.model[name] = (array.dtype.str, array.shape, array.tobytes(), {"tag": tag})

    @rule(name=NAMES)
    def delete(self, name: str) -> None:
        if name in self.model:
            self.store.delete(name)
            del self.model[name]
        else:
            try:
                self.store.delete(name)
            except KeyError:
                return
            raise AssertionError(f"deleting missing {name!r} did not raise")

    @rule(target=snapshots, name=NAMES)
    def take_snapshot(self, name: str) -> tuple:
        if name not in self.model:
            return (None, None)
        return (self.store.get(name), self.model[name])

    @rule(snapshot=snapshots)
    def snapshot_stays_valid(self, snapshot: tuple) -> None:
        array, (dtype, shape, raw, _attrs) = snapshot if snapshot[0] is not None else (None, (None, None, None, None))
        if array is not None:  # replaced or deleted since: still the bytes it had
            assert array.dtype.str == dtype and array.shape == shape and array.tobytes() == raw

    @rule(values=st.lists(st.integers(-5, 5), max_size=5), flush=st.booleans())
    def append(self, values: list[int], flush: bool) -> None:
        if self.writer is None:
            if "log" not in self.store:
                self.writer = self.store.create("log", np.int64, (0,), growable=True)
            else:
                self.writer = self.store.open_writer("log")
        self.writer.append(np.array(values, dtype=np.int64))
        self.log.extend(values)
        if flush:
            self.writer.flush()
            self.log_committed = len(self.log)

    @precondition(lambda self: self.writer is not None)
    @rule()
    def close_writer(self) -> None:
        assert self.writer is not None
        self.writer.close()  # close flushes
        self.writer = None
        self.log_committed = len(self.log)

    @rule()
    def reopen(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.log_committed = len(self.log)
        self.store.close()
        self.store = mmstore.Store(f"{self.directory}/s")

    @invariant()
    def store_matches_model(self) -> None:
        if not hasattr(self, "store"):
            return
        with mmstore.Store(f"{self.directory}/s", "r") as reader:  # a second, read-only view
            names = [name for name in reader if name != "log"]
            assert names == sorted(self.model)
            for name, (dtype, shape, raw, attrs) in self.model.items():
                for store in (self.store, reader):
                    got = store.get(name)
                    assert got.dtype.str == dtype and got.shape == shape and got.tobytes() == raw
                    assert store.attrs(name) == attrs
            if "log" in reader:
                assert reader.get("log").tolist() == self.log[: self.log_committed]
        # The second process: the same view through a handle it keeps open across steps.
        seen = _ask_reader(("read", f"{self.directory}/s"))
        expected = {name: (dtype, shape, raw, attrs) for name, (dtype, shape, raw, attrs) in self.model.items()}
        if "log" in seen:
            assert seen.pop("log")[2] == np.array(self.log[: self.log_committed], dtype=np.int64).tobytes()
        assert seen == expected

    def teardown(self) -> None:
        if hasattr(self, "store"):
            if self.writer is not None:
                self.writer.close()
            assert self.store.verify().ok
            self.store.close()
            _ask_reader(("forget", f"{self.directory}/s"))
            shutil.rmtree(self.directory, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
