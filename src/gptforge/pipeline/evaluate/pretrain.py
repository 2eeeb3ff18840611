"""Evaluating a language model: token-weighted loss and perplexity on validation and held-out text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptforge.errors import DataError
from gptforge.pipeline.config import EvaluateConfig
from gptforge.pipeline.evaluate.inference import lm_metrics
from gptforge.pipeline.evaluate.report import write_lm_report
from gptforge.tasks import pretrain


def source_names(value: str | Sequence[str] | None) -> list[str]:
    """A list of corpus names or paths; a string is comma-separated (`--test-data a.txt,b.txt`)."""
    if not value:
        return []
    return value.split(",") if isinstance(value, str) else [str(v) for v in value]


def evaluate_pretrain(model, cfg: EvaluateConfig, data: Any, seed: int, out: Path, source: dict) -> dict:
    """Loss and perplexity of the corpus' validation blocks (and `test` from --test-data), written to `out`."""
    from torch.utils.data import DataLoader

    ctx = min(data.context_length or model.cfg.context_length, model.cfg.context_length)
    test = source_names(cfg.data.test_sources)
    # the training run's seed: with several sources, exactly the validation blocks it never trained on
    dsd = pretrain.load_splits(data, context_length=ctx, test_sources=test or None, seed=seed)
    if test:
        source["test_data"] = ",".join(test)
    wanted = list(cfg.splits or [s for s in ("validation", "test") if s in dsd])
    missing = [s for s in wanted if s not in dsd]
    if missing:
        hint = "; give a held-out corpus with --test-data" if "test" in missing else ""
        raise DataError(f"no split {missing[0]!r} in the corpus (splits: {sorted(dsd)}){hint}")
    limit = cfg.data.limit
    results = {}
    for split in wanted:
        ds = dsd[split]
        if limit:
            ds = ds.select(range(min(limit, len(ds))))
        loader = DataLoader(ds, batch_size=cfg.batch_size, collate_fn=pretrain.PretrainCollator())
        if cfg.progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"loss {split}", unit="batch")
        results[split] = {**lm_metrics(model, loader, cfg.device), "blocks": len(ds), "context_length": ctx}
        names = getattr(ds.features.get("source"), "names", None)  # several sources: each one's loss too
        for g, name in enumerate(names or []):
            sub = ds.select([i for i, s in enumerate(ds["source"]) if s == g])
            if len(sub):
                sub_loader = DataLoader(
                    sub, batch_size=cfg.batch_size, collate_fn=pretrain.PretrainCollator()
                )
                results[f"{split}/{name}"] = {**lm_metrics(model, sub_loader, cfg.device), "blocks": len(sub)}
    source.update(data=",".join(map(str, data.sources)))
    loss_png = Path(cfg.checkpoint) / "loss.png"
    return write_lm_report(
        results, out, source=source, training_plot=loss_png if loss_png.is_file() else None
    )
