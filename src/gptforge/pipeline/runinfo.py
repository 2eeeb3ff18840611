"""What a run records about itself: package versions, the source commit, and its metrics.jsonl read back.

run.json (trainer), the runner's stage manifests (code version) and tests read these; none of them trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("gptforge", "torch", "accelerate", "transformers", "datasets", "tiktoken", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the gptforge source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
