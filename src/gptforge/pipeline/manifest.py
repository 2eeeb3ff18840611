"""What a pipeline stage is keyed on, and its manifest.json.

A stage is skipped only when its resolved config, the gptforge code (version, git commit), its upstream
stages' outputs and the content of every file it read last time are unchanged (`decide`). Reads are
recorded by `gptforge.io.record_read` while the stage runs and fingerprinted by (size, mtime) and content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from gptforge.io import content_hash, fingerprint, write_json

MANIFEST = "manifest.json"


# -- hashing ---------------------------------------------------------------------------------------


def hash_obj(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- manifests -------------------------------------------------------------------------------------


def read_manifest(stage_dir: Path) -> dict | None:
    f = stage_dir / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn manifest means the stage never finished: rerun it


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(stage_dir / MANIFEST, manifest)


# -- what a stage depends on -------------------------------------------------------------------------


def code_version() -> dict:
    """The code that computes a stage: gptforge's version and, in a git checkout, its commit."""
    from gptforge import __version__
    from gptforge.pipeline.runinfo import git_commit

    return {"gptforge": __version__, "git": git_commit()}


def always_read() -> dict[str, str]:
    """What every stage reads without naming it: the GPT-2 BPE files the tokenizer is built from."""
    from gptforge.model.tokenizer import bpe_files_dir

    d = bpe_files_dir()
    return {str(d / f): "tokenizer file" for f in ("encoder.json", "vocab.bpe") if (d / f).is_file()}


def _shown(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def fingerprint_reads(reads: dict[str, str], own_dir: Path, old: dict | None = None) -> dict[str, dict]:
    """{path: {kind, stat, hash}} of what a stage read, leaving out its own outputs (checkpoints it resumes)."""
    own = str(own_dir.absolute())
    out = {}
    for path, kind in sorted(reads.items()):
        if path == own or path.startswith(own + os.sep):
            continue
        fp = fingerprint(path, (old or {}).get(path))
        if fp is not None:
            out[path] = {"kind": kind, **fp}
    return out


def changed_reads(old_reads: dict[str, dict]) -> str | None:
    """The first recorded input whose content changed (or that is gone), as a reason; None if none did."""
    for path, rec in old_reads.items():
        fp = fingerprint(path, rec)
        if fp is None:
            return f"{rec.get('kind', 'input')} {_shown(path)} is gone"
        if fp["hash"] != rec.get("hash"):
            return f"{rec.get('kind', 'input')} {_shown(path)} changed"
    return None


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def decide(
    resumable: bool, old: dict | None, chash: str, record: Any, inputs: dict, code: dict, forced: bool
) -> tuple[str, str]:
    """What to do with a stage and why: ("skip" | "resume" | "run", reason)."""
    if forced:
        return "run", "forced (--force / --from)"
    if not old:
        return "run", "no earlier run"
    if old.get("config_hash") != chash:
        diff = config_diff(old.get("config"), record)
        return "run", "config changed" + (f": {'; '.join(diff[:3])}" if diff else "")
    if old.get("code") != code:
        was, now = old.get("code") or {}, code
        keys = [k for k in ("gptforge", "git") if was.get(k) != now.get(k)] or ["code"]
        return "run", "gptforge code changed (" + ", ".join(
            f"{k} {was.get(k)} -> {now.get(k)}" for k in keys
        ) + ")"
    if old.get("inputs") != inputs:
        ups = [u for u in inputs if (old.get("inputs") or {}).get(u) != inputs[u]] or list(inputs)
        return "run", f"output of upstream stage {ups[0]!r} changed"
    changed = changed_reads(old.get("reads") or {})
    if changed:
        return "run", changed
    status = old.get("status")
    if status == "done":
        return "skip", "up to date (config, code, upstream outputs and every file it read unchanged)"
    if resumable and status in ("running", "interrupted"):
        return "resume", f"{status} earlier; resuming from its last checkpoint"
    return "run", f"last run {status or 'unknown'}"


def output_hash(trained: bool, outputs: dict) -> str:
    """What downstream stages are keyed on: a trained model's weights and config, else the metrics files."""
    if trained:
        ckpt = Path(outputs["checkpoint"])
        return hash_obj([content_hash(ckpt / "model.safetensors"), content_hash(ckpt / "config.json")])
    return hash_obj(
        {
            k: content_hash(Path(v) / "metrics.json") if (Path(v) / "metrics.json").is_file() else v
            for k, v in outputs.items()
        }
    )
