"""The end of every benchmark run: print the report, and save every sample with it as JSON."""

from __future__ import annotations

import json
from typing import Any


def emit(body: list[str], results: dict[str, Any], json_path: str | None, elapsed: float) -> None:
    """Print ``body``; with ``json_path``, also write ``results`` plus the report and run time."""
    print("\n".join(body), flush=True)
    if json_path:
        results["report"] = body
        results["total_seconds"] = elapsed
        with open(json_path, "w") as out:
            json.dump(results, out, indent=2, default=str)
