"""Crash tests: writers SIGKILLed at random instants (bounded here; scripts/ has the full runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # spawned children import the script by name
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_during_put_leaves_old_or_new_value_and_recovery_cleans_up(tmp_path: Path) -> None:
    crash_put = load_script("crash_put")
    report = crash_put.run_trials(trials=20, mib=16, seed=1, path=str(tmp_path / "store"))
    assert report.trials == 20
    assert report.failures == []
    # The kills landed at different points: later generations were committed between them.
    assert report.generations_seen >= 5


@pytest.mark.slow
def test_sigkill_during_packed_puts_leaves_old_or_new_value(tmp_path: Path) -> None:
    crash_put = load_script("crash_put")
    report = crash_put.run_trials(trials=30, mib=0, seed=2, path=str(tmp_path / "store"), pack_small=True)
    assert report.trials == 30
    assert report.failures == []
    assert report.generations_seen >= 10


@pytest.mark.slow
def test_crash_torture_of_growable_dataset(tmp_path: Path) -> None:
    torture = load_script("crash_torture")
    report = torture.run_trials(trials=25, seed=3, path=str(tmp_path / "store"))
    assert report.trials == 25
    assert report.failures == []
    assert report.rows > 0
    assert report.verify_runs == 2


def test_torture_self_check_detects_damage() -> None:
    torture = load_script("crash_torture")
    rows = torture.make_rows(10, 100)
    assert torture.bad_rows(rows, 10) == 0
    rows["payload"][5, 2] ^= 1
    rows["seq"][50] += 1
    assert torture.bad_rows(rows, 10) == 2


@pytest.mark.slow
def test_mixed_operations_from_several_processes(tmp_path: Path) -> None:
    stress = load_script("stress_mixed")
    outcome = stress.run(processes=4, ops=500, seed=5, path=str(tmp_path / "store"))
    assert outcome["problems"] == []
    assert outcome["totals"]["put"] > 300 and outcome["totals"]["get"] > 300 and outcome["totals"]["delete"] > 50


def test_stress_self_check_detects_torn_values() -> None:
    stress = load_script("stress_mixed")
    value = stress.make_value(3, 17, 100)
    assert stress.is_whole(value, {"w": 3, "s": 17})
    assert not stress.is_whole(value, {"w": 3, "s": 18})
    torn = value.copy()
    torn[50] += 1
    assert not stress.is_whole(torn)
    assert not stress.is_whole(value[:-1])
