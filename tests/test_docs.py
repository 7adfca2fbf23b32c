"""The docs match the code: README's Python blocks run as pasted (in a temp dir)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(tmp_path: Path, index: int) -> None:
    code = BLOCKS[index].replace("/tmp/", f"{tmp_path}/")
    if "import mmstore" not in code:
        code = "import numpy as np\nimport mmstore\n" + code
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_names_the_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert test_command in readme and test_command in ci
    assert "mmstore demo" in readme
