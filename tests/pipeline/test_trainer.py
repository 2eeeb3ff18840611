"""The training loop on synthetic data (tiny vocab, in-process): exact accumulation, schedule, param
groups, checkpoints, in-process SIGTERM + resume with dropout, and the non-finite loss stop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from gptforge.errors import ConfigError, TrainingError
from gptforge.machine import cpu_has_native_bf16
from gptforge.model.checkpoint import load_checkpoint as load_model
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.pipeline.checkpoints import FINAL, list_checkpoints
from gptforge.pipeline.config import TrainConfig
from gptforge.pipeline.optim import lr_lambda, param_groups
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.trainer import Trainer

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_rows(n: int, seed: int) -> list[dict]:
    """Learnable sequences (each token is the previous + 1 or + 2) of uneven length (6..24), so batches
    of 4 and 8 pad differently."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length, start, step = (
            int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((6, 25), (0, VOCAB), (1, 3))
        )
        rows.append({"ids": [(start + step * i) % VOCAB for i in range(length)]})
    return rows


def lm_collate(rows: list[dict]) -> dict:
    width = max(len(r["ids"]) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids = torch.tensor(r["ids"])
        x[i, : len(ids) - 1], y[i, : len(ids) - 1] = ids[:-1], ids[1:]
    return {"input_ids": x, "targets": y}


def tiny_model(dropout: float = 0.0) -> GPT:
    return GPT(GPTConfig.from_preset("test-tiny", vocab_size=VOCAB, context_length=32, dropout=dropout))


def make_cfg(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), progress=False, plot=False, lr=1e-2, seed=7, epochs=2, warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def fit(cfg: TrainConfig, trainer_cls=Trainer, dropout: float = 0.0, n_train: int = 40):
    trainer = trainer_cls(cfg)
    model = tiny_model(dropout)  # after the Trainer: it seeds everything
    return trainer.fit(model, lm_rows(n_train, 0), lm_collate, lm_rows(12, 1), run_config={"task": "test"})


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "lr" in r}


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, FINAL, "model.safetensors"))


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory):
    """The same data and seed as 8 x 1 and as 4 x 2 micro-batches (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("accum")
    kw = dict(save_every=2, eval_every=2, keep_last=2)
    with_torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = fit(make_cfg(root / "b8", batch_size=8, plot=True, **kw))
        b = fit(make_cfg(root / "b4x2", batch_size=4, grad_accum=2, **kw))
    finally:
        torch.set_num_threads(with_torch_threads)
    return root, a, b


def test_grad_accum_4x2_equals_8x1_with_uneven_padding(accum_runs):
    root, a, b = accum_runs
    la, lb = train_losses(root / "b8"), train_losses(root / "b4x2")
    assert sorted(la) == sorted(lb) == list(range(1, 11))  # 40 rows / 8 = 5 steps x 2 epochs
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), step
    wa, wb = final_weights(root / "b8"), final_weights(root / "b4x2")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero true gradient (softmax ignores a per-query constant), so
            # AdamW turns float noise of order 1e-10 into lr-sized steps: it cannot match, nor matter.
            d = wa[k].numel() // 3
            wa[k], wb[k] = torch.cat([wa[k][:d], wa[k][2 * d :]]), torch.cat([wb[k][:d], wb[k][2 * d :]])
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    x = lm_collate(lm_rows(8, 3))["input_ids"]
    logits = [load_model(root / run / FINAL)(x) for run in ("b8", "b4x2")]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    assert b.metrics["val_loss"] == pytest.approx(a.metrics["val_loss"], abs=1e-5)
    # the losses really moved: training did something
    assert la[10] < la[1] - 0.3


def test_scheduler_steps_once_per_optimizer_step(accum_runs):
    root, _, _ = accum_runs
    recs = [r for r in read_metrics(root / "b4x2" / "metrics.jsonl") if "lr" in r]
    f = lr_lambda("cosine", 2, 10, 0.1)
    assert [r["lr"] for r in recs] == pytest.approx([1e-2 * f(s) for s in range(10)], rel=1e-9)
    assert recs[0]["lr"] == pytest.approx(5e-3)  # warmup 1/2
    assert recs[-1]["lr"] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))


def test_checkpoints_keep_last_k_and_best_and_final_dir(accum_runs):
    root, a, _ = accum_runs
    run = root / "b8"
    recs = read_metrics(run / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r and not r.get("final")}
    assert sorted(vals) == [2, 4, 6, 8, 10]
    best = min(vals, key=vals.get)
    kept = [p.name for p in list_checkpoints(run)]
    assert kept == sorted({f"step-{s:08d}" for s in (8, 10, best)})
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    state = json.loads((run / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (10, 1, 5)  # saved in the step
    assert a.metrics["best_step"] == best
    final = run / FINAL
    assert a.checkpoint == final
    for name in ("config.json", "model.safetensors", "run.json", "metrics.jsonl", "loss.png"):
        assert (final / name).is_file(), name
    run_json = json.loads((final / "run.json").read_text())
    assert run_json["status"] == "completed" and run_json["seed"] == 7
    assert {"torch", "accelerate", "python"} <= set(run_json["versions"])
    assert "git_commit" in run_json and run_json["total_steps"] == 10
    assert (final / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert recs[-1]["final"] is True and recs[-1]["val_loss"] == pytest.approx(a.metrics["val_loss"])


def test_param_groups_skip_decay_on_bias_layernorm_embeddings():
    model = tiny_model()
    model.add_classification_head(2)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {
        n for n in names.values() if n.endswith((".qkv.weight", ".proj.weight", ".fc.weight"))
    } | {"score.weight"}
    assert "tok_emb.weight" in no_decay and "pos_emb.weight" in no_decay and "ln_f.weight" in no_decay
    assert all(n.endswith(".bias") or "ln" in n or "emb" in n for n in no_decay)
    # the tied head is the embedding: counted once, never decayed
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    model.tok_emb.weight.requires_grad = False
    assert "tok_emb.weight" not in {names[id(p)] for g in param_groups(model, 0.1) for p in g["params"]}


def test_sigterm_saves_and_resume_matches_uninterrupted_run_with_dropout(tmp_path, sigterm_trainer):
    ref = fit(make_cfg(tmp_path / "ref", save_every=3), dropout=0.2)
    assert ref.metrics["status"] == "completed"
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    stopped = fit(make_cfg(out, save_every=3), trainer_cls=sigterm_trainer, dropout=0.2)
    assert stopped.metrics["status"] == "interrupted" and stopped.metrics["step"] == 4
    assert stopped.checkpoint == out / "checkpoints" / "step-00000004"
    assert not (out / FINAL).exists()
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    resumed = fit(make_cfg(out, save_every=3, resume="auto"), dropout=0.2)
    assert resumed.metrics["status"] == "completed"
    la, lb = train_losses(tmp_path / "ref"), train_losses(out)
    assert sorted(lb) == list(range(1, 11))  # no gap, no duplicate
    assert lb == la  # bit-exact losses, dropout included
    wr, wo = final_weights(tmp_path / "ref"), final_weights(out)
    for k in wr:
        assert torch.equal(wr[k], wo[k]), k


class NanAtStep5(Trainer):
    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        return loss * float("nan") if self.state.step == 4 else loss


def test_nonfinite_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 .*step-00000004") as e:
        fit(make_cfg(out, save_every=2), trainer_cls=NanAtStep5)
    assert "\n" not in str(e.value)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert not (out / FINAL).exists()
    assert json.loads((out / "run.json").read_text())["status"] == "diverged"
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["event"] == "nonfinite_loss" and last["step"] == 5
    # the kept checkpoint resumes (with the bug gone) to the same end as a clean run
    fit(make_cfg(out, save_every=2, resume="auto"))
    fit(make_cfg(tmp_path / "clean", save_every=2))
    assert train_losses(out) == train_losses(tmp_path / "clean")


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path):
    slow_cpu = cpu_has_native_bf16() is False and not torch.cuda.is_available()
    with pytest.warns(UserWarning, match="without bf16 units") if slow_cpu else contextlib.nullcontext():
        res = fit(make_cfg(tmp_path / "bf16", mixed_precision="bf16", epochs=1), n_train=16)
    assert math.isfinite(res.metrics["val_loss"])
    run = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert run["mixed_precision"] == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            Trainer(make_cfg(tmp_path / "fp16", mixed_precision="fp16"))


def test_too_small_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"smaller than one optimizer step .*train.batch_size=8"):
        fit(make_cfg(tmp_path / "small", batch_size=8, grad_accum=2), n_train=12)


def test_partial_last_window_without_drop_last(tmp_path):
    """40 rows as 8 x 2 without drop_last: windows of 16, 16 and 8 rows, like batch 16 (16, 16, 8)."""
    a = fit(make_cfg(tmp_path / "b16", batch_size=16, drop_last=False))
    b = fit(make_cfg(tmp_path / "b8x2", batch_size=8, grad_accum=2, drop_last=False))
    la, lb = train_losses(tmp_path / "b16"), train_losses(tmp_path / "b8x2")
    assert sorted(la) == sorted(lb) == list(range(1, 7))  # 3 steps x 2 epochs
    assert [lb[s] for s in la] == pytest.approx(list(la.values()), abs=1e-5)
    # the epoch ends after the partial window: end-of-epoch evaluation and checkpoint at steps 3 and 6
    vals = [r["step"] for r in read_metrics(tmp_path / "b8x2" / "metrics.jsonl") if "val_loss" in r]
    assert vals == [3, 6, 6]  # two epoch ends and the final line
    assert [p.name for p in list_checkpoints(tmp_path / "b8x2")] == ["step-00000003", "step-00000006"]
    assert b.metrics["val_loss"] == pytest.approx(a.metrics["val_loss"], abs=1e-5)


@pytest.mark.slow  # inductor compiles for minutes on a small CPU
def test_torch_compile_matches_eager(tmp_path):
    fit(make_cfg(tmp_path / "eager", epochs=1))
    res = fit(make_cfg(tmp_path / "compiled", epochs=1, compile=True))
    assert "_orig_mod" not in "".join(final_weights(tmp_path / "compiled"))  # plain names in the export
    got, want = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert sorted(got) == sorted(want) and [got[s] for s in want] == pytest.approx(
        list(want.values()), abs=1e-5
    )
    assert res.metrics["status"] == "completed"


def test_optimizer_is_fused_adamw_with_decay_groups():
    from gptforge.model import GPT, GPTConfig
    from gptforge.pipeline.config import TrainConfig
    from gptforge.pipeline.optim import make_optimizer

    model = GPT(GPTConfig.from_preset("test-tiny"))
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.blocks[0].attn.qkv.bias) not in decayed and id(model.tok_emb.weight) not in decayed


def test_cpu_training_keeps_freed_memory_and_releases_it_after(tmp_path, monkeypatch):
    import gptforge.pipeline.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(trainer_mod, "release_freed_memory", lambda: calls.append("release"))
    fit(make_cfg(tmp_path / "m", epochs=1))
    assert calls == ["keep", "release"]
