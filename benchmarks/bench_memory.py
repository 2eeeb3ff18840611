"""Conversion time and memory (from_hf, export) and the peak memory of one training step.

Each measurement runs in its own process (`probe.py`), so one measurement's memory never counts
against another's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from common import log, mib, record, run_probe


def _random_hf_dir(preset: str, out: Path) -> None:
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT
    from gptforge.model.hf import to_hf

    torch.manual_seed(0)
    to_hf(GPT(GPTConfig.from_preset(preset))).save_pretrained(str(out))


def _peak_row(case: str, ours: dict, theirs: dict, baseline_name: str, model_bytes: int) -> dict:
    """A conversion's peak-memory row, with the issue's bar: peak at most twice the model's size."""
    return record(
        "convert",
        case,
        "MiB",
        mib(ours["peak_bytes"]),
        mib(theirs["peak_bytes"]),
        baseline_name,
        higher_is_better=False,
        model_mib=mib(model_bytes),
        peak_over_model=round(ours["peak_bytes"] / model_bytes, 2),
        met_memory=bool(ours["peak_bytes"] <= 2 * model_bytes),
    )


def run_convert(reps: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="gptforge-bench-convert-"))
    try:
        src = work / "gpt2-random"
        log("convert: writing a random gpt2 checkpoint ...")
        _random_hf_dir("gpt2", src)
        tiny = work / "tiny"
        _random_hf_dir("test-tiny", tiny)
        runs: dict[str, list[dict]] = {"from_hf": [], "hf_load": [], "export": [], "hf_save": []}
        for r in range(reps):
            log(f"convert: round {r + 1}/{reps} ...")
            runs["from_hf"].append(run_probe(["from_hf", str(src), str(tiny)]))
            runs["hf_load"].append(run_probe(["hf_load", str(src), str(tiny)]))
            runs["export"].append(run_probe(["export", str(src), str(tiny), str(work / f"export-{r}")]))
            runs["hf_save"].append(run_probe(["hf_save", str(src), str(tiny), str(work / f"save-{r}")]))
        med = {k: sorted(v, key=lambda m: m["seconds"])[len(v) // 2] for k, v in runs.items()}
        size = med["from_hf"]["model_bytes"]
        rows = []
        fh, hl = med["from_hf"], med["hf_load"]
        convert_s = max(0.0, fh["seconds"] - fh["read_seconds"])
        rows.append(
            record(
                "convert",
                "from_hf(gpt2 dir): seconds",
                "s",
                fh["seconds"],
                hl["seconds"],
                "GPT2LMHeadModel.from_pretrained",
                higher_is_better=False,
                samples={k: [m["seconds"] for m in runs[k]] for k in ("from_hf", "hf_load")},
                read_seconds=round(fh["read_seconds"], 3),
                seconds_after_read=round(convert_s, 3),
                target_seconds_after_read=2.0,
                met_seconds=bool(convert_s < 2.0),
            )
        )
        rows.append(
            _peak_row("from_hf(gpt2 dir): peak memory MiB", fh, hl, "GPT2LMHeadModel.from_pretrained", size)
        )
        ex, hs = med["export"], med["hf_save"]
        rows.append(
            record(
                "convert",
                "export(gpt2) incl. reload check: seconds",
                "s",
                ex["seconds"],
                hs["seconds"],
                "save_pretrained (no tokenizer, no check)",
                higher_is_better=False,
                samples={k: [m["seconds"] for m in runs[k]] for k in ("export", "hf_save")},
            )
        )
        rows.append(
            _peak_row(
                "export(gpt2) incl. reload check: peak memory MiB",
                ex,
                hs,
                "save_pretrained (no tokenizer, no check)",
                size,
            )
        )
        for r in rows:
            log(f"convert: {r['case']}: gptforge {r['gptforge']:.2f}, baseline {r['baseline']:.2f}")
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_train_memory(presets: list[str], B: int, T: int) -> list[dict]:
    rows = []
    for preset in presets:
        log(f"memory: one training step, {preset} B{B} T{T} ...")
        # Two fresh processes a side, the lower peak kept: allocator timing only ever adds to a peak.
        ours, theirs = (
            min(
                (run_probe(["train", impl, preset, str(B), str(T)]) for _ in range(2)),
                key=lambda m: m["peak_bytes"],
            )
            for impl in ("gptforge", "transformers")
        )
        rows.append(
            record(
                "memory",
                f"training step {preset} B{B} T{T} fp32: peak MiB above weights + optimizer state",
                "MiB",
                mib(ours["peak_bytes"]),
                mib(theirs["peak_bytes"]),
                "transformers GPT2LMHeadModel (sdpa, fused AdamW)",
                higher_is_better=False,
                resident_before_mib={
                    "gptforge": mib(ours["base_bytes"]),
                    "transformers": mib(theirs["base_bytes"]),
                },
                loss={"gptforge": ours["loss"], "transformers": theirs["loss"]},
            )
        )
        log(
            f"memory: {preset}: gptforge {mib(ours['peak_bytes'])} MiB, transformers {mib(theirs['peak_bytes'])} MiB"
        )
    return rows
