"""Evaluating a DPO model: preference accuracy on held-out pairs, against the model it started from.

The implicit reward of a response is beta * (its log-prob under the DPO model - under the reference),
the reference being the training run's `model.init` (run.json). `rewards/accuracy` is the share of pairs
whose chosen response gets the higher reward; `logp_accuracy` (the model alone: the chosen response's
summed log-prob is higher) is also reported, since it is defined before DPO too.

With a judge configured, both models answer the held-out prompts of one split (greedy) and the judge
scores every answer (0-100); the win rate is the share of prompts, among those where both answers were
scored, on which the DPO model's answer scored higher (ties counted apart). Every judgment is kept in
judgments.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GPTForgeError
from gptforge.io import atomic_dir, write_json, write_jsonl, write_text
from gptforge.pipeline.config import EvaluateConfig
from gptforge.pipeline.evaluate.report import _now

KEYS = ("rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected", "logp_accuracy")


def _reference(ckpt: str | Path, run_cfg: dict, model):
    """The model the DPO run started from (run.json's model.init); the model itself if it has no run.json."""
    from gptforge.model.load import is_model_dir, load_model

    init = (run_cfg.get("model") or {}).get("init")
    if not run_cfg or not init:
        return model, "itself (not a DPO model: rewards are 0)"
    p = Path(init).expanduser()
    if is_model_dir(p):
        return load_model(p), str(p)
    if p.exists() or init == "scratch":
        raise GPTForgeError(
            f"{ckpt}: its reference model.init={init} cannot be loaded; restore it to score rewards"
        )
    from gptforge.model.hf import from_hf

    return from_hf(init), init


def preference_metrics(policy: dict, ref: dict, beta: float) -> dict:
    """Per-split numbers from summed log-probs (`chosen`, `rejected` lists) of the model and the reference."""
    pc, pr = torch.tensor(policy["chosen"]), torch.tensor(policy["rejected"])
    rc, rr = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "n": len(pc),
        "rewards/accuracy": float((chosen > rejected).double().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "logp_accuracy": float((pc > pr).double().mean()),
        "beta": beta,
    }


def evaluate_dpo(model, cfg: EvaluateConfig, data: Any, seed: int, out: Path, source: dict) -> dict:
    """Held-out pairs (validation, test by default) scored by the DPO model and its reference; written to `out`."""
    from gptforge.model.checkpoint import read_metadata
    from gptforge.tasks import dpo
    from gptforge.tasks.instruct import get_prompt_style

    ckpt = cfg.checkpoint
    run = read_metadata(ckpt, "run.json") or {}
    run_cfg = (run.get("config") or {}) if run.get("task") == "dpo" else {}
    beta = float((run_cfg.get("dpo") or {}).get("beta", 0.1))
    style = get_prompt_style(
        cfg.data.prompt_style or read_metadata(ckpt, "prompt_style.json") or data.prompt_style or "alpaca"
    )
    max_len = min(data.max_length or model.cfg.context_length, model.cfg.context_length)
    dsd = dpo.load_splits(data, seed=seed)
    splits = [s for s in (cfg.splits or ("validation", "test")) if s in dsd and len(dsd[s])]
    if not splits:
        raise GPTForgeError(f"{data.dataset}: no pairs in splits {cfg.splits or ['validation', 'test']}")
    tok = dpo.tokenize_preference(dsd, style, max_length=max_len)
    tok = tok.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    reference, ref_name = _reference(ckpt, run_cfg, model)
    device = torch.device(cfg.device) if cfg.device else torch.device("cpu")

    def logps(m) -> dict[str, dict]:
        m.to(device)
        scored = dpo.add_reference_logps(
            {s: tok[s] for s in splits}, m, batch_size=cfg.batch_size, device=device
        )
        return {
            s: {"chosen": scored[s]["ref_chosen_logps"], "rejected": scored[s]["ref_rejected_logps"]}
            for s in splits
        }

    policy = logps(model)
    ref = policy if reference is model else logps(reference)
    metrics = {
        "task": "dpo",
        "created": _now(),
        "source": {**source, "data": data.dataset, "reference": ref_name, "prompt_style": style.name},
        "splits": {s: preference_metrics(policy[s], ref[s], beta) for s in splits},
    }
    lines = ["# Evaluation: dpo", ""]
    lines += [f"- {k}: `{v}`" for k, v in metrics["source"].items()]
    lines += [f"- created: {metrics['created']}", "", "## Preference pairs", ""]
    lines += ["| split | pairs | reward accuracy | margin | chosen | rejected | log-prob accuracy |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    for s, m in metrics["splits"].items():
        lines.append(
            f"| {s} | {m['n']} | {m['rewards/accuracy']:.2%} | {m['rewards/margins']:.4f} | "
            f"{m['rewards/chosen']:.4f} | {m['rewards/rejected']:.4f} | {m['logp_accuracy']:.2%} |"
        )

    judged = None
    if cfg.judge is not None:
        split = "test" if "test" in splits else splits[-1]
        judged = judge_against_reference(model, reference, [dict(r) for r in dsd[split]], style, cfg)
        metrics["judge"] = {"split": split, **judged["summary"]}
        j = metrics["judge"]
        rate = "n/a" if j["win_rate"] is None else f"{j['win_rate']:.2%}"
        lines += ["", f"## Judge: DPO model against {ref_name} ({split}, {j['n_pairs']} prompts)", ""]
        lines += [
            f"win rate {rate} ({j['wins']} wins, {j['losses']} losses, {j['ties']} ties over "
            f"{j['n_compared']} prompts where both answers were scored); mean score {j['mean_score']} "
            f"against {j['reference_mean_score']}; judgments.jsonl has every reply"
        ]

    def write(tmp: Path) -> None:
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "report.md", "\n".join(lines) + "\n")
        if judged is not None:
            write_jsonl(tmp / "judgments.jsonl", judged["rows"])

    atomic_dir(out, write)
    if judged is not None:
        from gptforge.pipeline.judge import check_judgments

        for side in ("dpo", "reference"):
            check_judgments(judged[side], out / "judgments.jsonl")
    return metrics


def judge_against_reference(model, reference, records: list[dict], style, cfg: EvaluateConfig) -> dict:
    """Both models' greedy answers to `records`, each scored by the judge; wins, losses and ties."""
    from gptforge.pipeline.evaluate.instruct import style_responses
    from gptforge.pipeline.judge import judge_records

    def answers(m) -> list[str]:
        return [g["response"] for g in style_responses(m, records, style, cfg)]

    ours = answers(model)
    theirs = ours if reference is model else answers(reference)
    rows = [  # the judge's reference answer ({output}) is the preferred response of the pair
        {**r, "output": r.get("output") or r.get("chosen", ""), "dpo_response": a, "reference_response": b}
        for r, a, b in zip(records, ours, theirs)
    ]
    mine, mine_summary = judge_records(rows, cfg.judge, response_key="dpo_response", progress=cfg.progress)
    other, other_summary = judge_records(
        rows, cfg.judge, response_key="reference_response", progress=cfg.progress
    )
    wins = losses = ties = 0
    for row, a, b in zip(rows, mine, other):
        row["dpo_judgment"], row["reference_judgment"] = a, b
        if a["status"] == "ok" and b["status"] == "ok":
            outcome = "win" if a["score"] > b["score"] else "loss" if a["score"] < b["score"] else "tie"
            wins, losses, ties = (
                wins + (outcome == "win"),
                losses + (outcome == "loss"),
                ties + (outcome == "tie"),
            )
        else:
            outcome = "not compared"
        row["outcome"] = outcome
    compared = wins + losses + ties
    summary = {
        "n_pairs": len(rows),
        "n_compared": compared,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": wins / compared if compared else None,
        "mean_score": mine_summary["mean_score"],
        "reference_mean_score": other_summary["mean_score"],
        "n_unparseable": mine_summary["n_unparseable"] + other_summary["n_unparseable"],
        "n_failed": mine_summary["n_failed"] + other_summary["n_failed"],
        "config": mine_summary.get("config"),
    }
    return {"summary": summary, "rows": rows, "dpo": mine_summary, "reference": other_summary}
