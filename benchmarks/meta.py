"""What every benchmark result records: the command, machine, date and commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _main_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def run_metadata() -> dict[str, str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = subprocess.run(
        # Results and their summary change with every run: they do not make a run dirty.
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
         ":!benchmarks/results", ":!BENCHMARKS.md"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if commit and changed:
        commit += "+dirty"  # tracked files differ from the commit: it did not run as committed
    return {
        "command": " ".join(["python -m", _main_module(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}",
        "commit": commit,
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
