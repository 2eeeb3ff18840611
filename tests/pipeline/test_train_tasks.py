"""The three tasks end to end on small slices of the real data sets, with tiny models: the loss falls,
the checkpoints describe themselves, classify starts from a Hugging Face dir and freezes by policy,
its export predicts the same in transformers, and instruction tuning starts from the pretrained
gptforge checkpoint with 4 x 2 accumulation equal to batch 8 despite uneven padding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gptforge.model.checkpoint import load_checkpoint, read_metadata
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.pipeline.checkpoints import FINAL
from gptforge.pipeline.config import EvaluateConfig, load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_classify, run_instruct, run_pretrain, set_trainable

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data_env(shared_data_dir):
    """Known data set names resolve to the local copies (as CI's $GPTFORGE_DATA_DIR does)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    yield shared_data_dir
    mp.undo()


def common(out_dir) -> dict:
    return {"train.out_dir": str(out_dir), "train.progress": False, "train.plot": False, "train.seed": 3}


def train_losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "lr" in r]


def val_losses(out_dir) -> list[float]:
    return [
        r["val_loss"]
        for r in read_metrics(out_dir / "metrics.jsonl")
        if "val_loss" in r and not r.get("final")
    ]


@pytest.fixture(scope="module")
def pretrained(data_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(
        "pretrain",
        **common(out),
        **{
            "model.preset": "test-tiny",  # context 64
            "data.sources": ["the-verdict"],
            "train.batch_size": 2,
            "train.max_steps": 12,
            "train.lr": 5e-3,
            "train.warmup_steps": 2,
            "train.eval_every": 4,
            "train.eval_batches": 2,
        },
    )
    return out, run_pretrain(cfg)


def test_pretrain_the_verdict_loss_falls_and_reports_perplexity(pretrained):
    out, res = pretrained
    assert res.checkpoint == out / FINAL and res.metrics["step"] == 12
    losses, vals = train_losses(out), val_losses(out)
    assert len(losses) == 12 and len(vals) == 3  # steps 4, 8, 12
    assert vals[0] > vals[1] > vals[2]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # from ~10.8 (uniform over 50,257 tokens)
    assert res.metrics["val_perplexity"] == pytest.approx(math.exp(res.metrics["val_loss"]))
    assert res.metrics["tokens"] == 12 * 2 * 64
    model = load_checkpoint(res.checkpoint)
    assert model.cfg.context_length == 64 and not model.is_classifier
    run = read_metadata(res.checkpoint, "run.json")
    assert run["config"]["data"]["sources"] == ["the-verdict"] and run["config"]["train"]["lr"] == 5e-3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 saved as a Hugging Face dir (no hub)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("hf-tiny")
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def classified(data_env, hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("classify")
    cfg = load_config(
        "classify",
        **common(out),
        **{
            "model.init": str(hf_dir),
            "data.limit": 64,
            "trainable": "last_blocks:1",
            "train.epochs": 2,
            "train.lr": 5e-3,
            "train.eval_every": 4,
            "train.eval_batches": None,
        },
    )
    return out, run_classify(cfg)


def test_classify_from_hf_dir_learns_with_reference_policy(classified, hf_dir):
    from gptforge.model.hf import from_hf

    out, res = classified
    m = res.metrics
    assert m["step"] == 16  # 64 examples / batch 8 x 2 epochs
    for split in ("train", "val", "test"):
        assert 0.0 <= m[f"{split}_accuracy"] <= 1.0
    vals = val_losses(out)
    assert vals[-1] < vals[0]
    assert m["train_accuracy"] >= 0.75  # above the balanced 50 % chance
    model = load_checkpoint(res.checkpoint)
    assert model.cfg.id2label == {0: "ham", 1: "spam"}
    assert json.loads((res.checkpoint / "labels.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}
    # last_blocks:1 trained the last block, the final LayerNorm and the head; the rest is untouched
    start = from_hf(str(hf_dir)).state_dict()
    end = load_file(res.checkpoint / "model.safetensors")
    for name, t in end.items():
        if name == "score.weight":
            continue
        moved = not torch.equal(t, start[name])
        assert moved == name.startswith(("blocks.1.", "ln_f.")), name
    run = read_metadata(res.checkpoint, "run.json")
    assert run["config"]["trainable"] == "last_blocks:1" and run["config"]["labels"] == ["ham", "spam"]


def test_trained_classifier_exports_and_predicts_the_same_in_transformers(classified, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from gptforge.export.hf import export
    from gptforge.model.tokenizer import Tokenizer

    _, res = classified
    model = load_checkpoint(res.checkpoint)
    export(model, tmp_path / "hf", verify=True)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    texts = [
        "WINNER!! You have been selected to receive a 900 prize. Call now to claim",
        "Sorry, I'll call later",
        "Free entry in 2 a wkly comp to win FA Cup final tkts, text FA to 87121",
        "Ok lar... Joking wif u oni...",
    ]
    tok = Tokenizer()
    ids = [tok.encode(t)[:64] for t in texts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), model.cfg.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = hf(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()
    assert hf.config.id2label == {0: "ham", 1: "spam"}


def test_evaluation_reads_the_splits_training_held_out(pretrained, classified, tmp_path):
    """`gptforge evaluate` on a trained checkpoint reads its data through the function training used
    (the same data set, seed and limit from run.json): its numbers equal the trainer's final ones,
    under the same names."""
    from gptforge.pipeline.config import EvaluateConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint
    from gptforge.pipeline.summary import summarize_evaluation

    _, res = classified
    m = evaluate_checkpoint(
        EvaluateConfig(checkpoint=str(res.checkpoint), out=str(tmp_path / "c"), progress=False)
    )
    assert {k: v["n"] for k, v in m["splits"].items()} == {"train": 64, "validation": 64, "test": 64}
    flat = summarize_evaluation(m)
    for split in ("train", "val", "test"):
        assert flat[f"{split}_accuracy"] == pytest.approx(res.metrics[f"{split}_accuracy"], abs=1e-9)

    _, pre = pretrained
    m = evaluate_checkpoint(
        EvaluateConfig(checkpoint=str(pre.checkpoint), out=str(tmp_path / "p"), progress=False)
    )
    flat = summarize_evaluation(m)
    assert flat["val_loss"] == pytest.approx(pre.metrics["val_loss"], rel=1e-5)
    assert flat["val_perplexity"] == pytest.approx(pre.metrics["val_perplexity"], rel=1e-5)


def instruct_overrides(init, out, **train) -> dict:
    return {
        **common(out),
        "model.init": str(init),
        "data.limit": 8,
        "data.max_length": 64,
        "train.epochs": 2,
        "train.lr": 5e-3,
        "train.eval_every": 1,
        "train.eval_batches": 1,
        **{f"train.{k}": v for k, v in train.items()},
    }


def test_instruct_from_pretrained_checkpoint_and_accumulation_equals_batch(pretrained, tmp_path):
    _, pre = pretrained
    a = run_instruct(
        load_config("instruct", **instruct_overrides(pre.checkpoint, tmp_path / "b8", batch_size=8))
    )
    b = run_instruct(
        load_config(
            "instruct", **instruct_overrides(pre.checkpoint, tmp_path / "b4x2", batch_size=4, grad_accum=2)
        )
    )
    la, lb = train_losses(tmp_path / "b8"), train_losses(tmp_path / "b4x2")
    assert len(la) == len(lb) == 2  # 8 records / 8 = 1 step x 2 epochs
    assert lb == pytest.approx(la, abs=1e-5)
    assert b.metrics["val_loss"] == pytest.approx(a.metrics["val_loss"], abs=1e-5)
    assert b.metrics["test_loss"] == pytest.approx(a.metrics["test_loss"], abs=1e-5)
    # uneven padding really happened: the 4-example micro-batches are narrower than the 8-example ones
    assert b.metrics["tokens"] < a.metrics["tokens"]
    vals = val_losses(tmp_path / "b8")
    assert vals[-1] < vals[0]
    style = read_metadata(a.checkpoint, "prompt_style.json")
    assert style["name"] == "alpaca"
    assert load_checkpoint(a.checkpoint).cfg.to_dict() == load_checkpoint(pre.checkpoint).cfg.to_dict()


@pytest.mark.parametrize(
    "policy, trainable",
    [("all", None), ("head", ["score"]), ("last_blocks:1", ["score", "blocks.1", "ln_f"])],
)
def test_set_trainable_policies(policy, trainable):
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=97))
    model.add_classification_head(2)
    n = set_trainable(model, policy)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if trainable is None:
        assert len(names) == len(list(model.parameters()))
    else:
        assert names and all(k.startswith(tuple(trainable)) for k in names)
        assert {
            k.split(".")[0] if k.startswith(("score", "ln_f")) else ".".join(k.split(".")[:2]) for k in names
        } == set(trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_pretrain_reports_validation_loss_per_source(tmp_path):
    """Two sources: validation holds blocks of both; each one's loss is logged beside the overall one,
    and their token-weighted mean is the overall loss. `gptforge evaluate` on the checkpoint draws the
    same validation blocks (the run's seed) and reports the same per-source losses."""
    from gptforge.pipeline.evaluate import evaluate_checkpoint
    from gptforge.tasks.pretrain import load_corpus

    a, b = tmp_path / "big.txt", tmp_path / "small.txt"
    a.write_text(" ".join(f"alpha{i}" for i in range(900)), encoding="utf-8")
    b.write_text(" ".join(f"beta{i}" for i in range(300)), encoding="utf-8")
    out = tmp_path / "run"
    cfg = load_config(
        "pretrain",
        **common(out),
        **{
            "model.preset": "test-tiny",
            "data.sources": [str(a), str(b)],
            "data.context_length": 16,
            "train.batch_size": 4,
            "train.max_steps": 4,
            "train.eval_every": 2,
        },
    )
    res = run_pretrain(cfg)
    val = load_corpus([a, b], context_length=16, val_fraction=0.1, seed=3)["validation"]
    src = val["source"][:]
    weights = {str(a): 16 * src.count(0), str(b): 16 * src.count(1)}  # every target scored
    assert weights == {str(a): 11 * 16, str(b): 4 * 16}
    records = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [2, 4, 4] and records[-1]["final"]
    for r in records:
        per = {name: r[f"val_loss/{name}"] for name in weights}
        mean = sum(per[n] * w for n, w in weights.items()) / sum(weights.values())
        assert abs(mean - r["val_loss"]) < 1e-6
        assert per[str(a)] != per[str(b)]
        assert r[f"val_perplexity/{a}"] == pytest.approx(math.exp(per[str(a)]))
    ev = evaluate_checkpoint(
        EvaluateConfig(
            checkpoint=str(res.checkpoint),
            out=str(tmp_path / "eval"),
            task="pretrain",
            batch_size=5,
            progress=False,
        )
    )
    splits = ev["splits"]
    assert splits["validation"]["blocks"] == 15
    for name, w in weights.items():
        assert splits[f"validation/{name}"]["tokens"] == w
        assert splits[f"validation/{name}"]["loss"] == pytest.approx(
            res.metrics[f"val_loss/{name}"], rel=1e-5
        )
    assert splits["validation"]["loss"] == pytest.approx(res.metrics["val_loss"], rel=1e-5)
