"""FSDP2 (`--train.distributed fsdp`) under `torchrun --nproc_per_node 2` (gloo, CPU), through the CLI.

Why 2 processes x batch 1 equal 1 process x batch 2: the seedable sampler gives every process the same
permutation and Accelerate hands out consecutive batches in turn, so step k's global batch is the same
two blocks; the trainer scales each process's summed loss by num_processes / (targets of all processes)
and FSDP's reduce-scatter averages, so the gradient is the same mean. The sharded checkpoint saved at
step 10 resumes to the uninterrupted run's end bit for bit, and the gathered final model is a plain
gptforge checkpoint that loads strictly and exports to transformers with equal logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import torchrun_cli
from safetensors.torch import load_file
from test_trainer_ddp import corpus, overrides  # noqa: F401  (the DDP test's corpus and settings)

from gptforge.errors import CheckpointError, ConfigError
from gptforge.io import verify_file_manifest
from gptforge.model.checkpoint import load_checkpoint, state_dict_for_save
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.pipeline.checkpoints import FINAL, list_checkpoints
from gptforge.pipeline.config import load_config
from gptforge.pipeline.fsdp import SHARDED_DIR, fsdp_requested
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_pretrain
from gptforge.pipeline.trainer import plain_model_from

STEPS = 20  # 37 train blocks, global batch 4: 9 steps an epoch, so the run crosses two epoch boundaries

# what `accelerate launch --config_file` reads (the README's example, for 2 CPU processes)
ACCELERATE_FSDP = """\
distributed_type: FSDP
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
"""


def settings(text: Path, out_dir: Path, batch_size: int) -> dict:
    return {
        **overrides(text, out_dir, batch_size),
        "train.grad_accum": 2,  # FSDP skips the reduce-scatter of the first micro-batch (no_sync)
        "train.max_steps": STEPS,
        "train.eval_every": 10,
        "train.save_every": 10,
        "train.keep_last": 5,
    }


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "lr" in r}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torchrun processes run with OMP_NUM_THREADS=1: same float order
    try:
        run_pretrain(load_config("pretrain", **settings(corpus, root / "one", batch_size=2)))
    finally:
        torch.set_num_threads(threads)
    torchrun_cli("pretrain", settings(corpus, root / "fsdp", batch_size=1), "--train.distributed", "fsdp")

    # A run killed after its step-10 save: its dir as the kill left it (metrics past step 10, no later
    # checkpoint, no final/), resumed with --train.resume auto, launched the other documented way this
    # time: `accelerate launch` with an FSDP config file (a run that were not FSDP refuses the checkpoint).
    killed = root / "killed"
    shutil.copytree(root / "fsdp", killed, ignore=shutil.ignore_patterns(FINAL, "step-00000020", "run.json"))
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000010"]
    config = root / "fsdp.yaml"
    config.write_text(ACCELERATE_FSDP, encoding="utf-8")
    ov = {**settings(corpus, killed, batch_size=1), "train.resume": "auto"}
    torchrun_cli("pretrain", ov, accelerate_config=config)
    return {"one": root / "one", "fsdp": root / "fsdp", "killed": killed}


def test_two_fsdp_processes_equal_one_process(runs):
    run = json.loads((runs["fsdp"] / "run.json").read_text())
    assert run["num_processes"] == 2 and run["distributed_type"] == "FSDP"
    one, two = train_losses(runs["one"]), train_losses(runs["fsdp"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-5), step
    assert one[STEPS] < one[1] - 0.5  # it learned: equal losses of a run that did nothing prove little
    val1 = [r["val_loss"] for r in read_metrics(runs["one"] / "metrics.jsonl") if "val_loss" in r]
    val2 = [r["val_loss"] for r in read_metrics(runs["fsdp"] / "metrics.jsonl") if "val_loss" in r]
    assert len(val1) == len(val2) == 3  # steps 10 and 20, and the final evaluation
    for a, b in zip(val1, val2):
        assert b == pytest.approx(a, abs=1e-5)


def test_sharded_checkpoint_is_sharded_has_a_manifest_and_resumes_exactly(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-00000010"
    shards = sorted(p.name for p in (ckpt / SHARDED_DIR).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard
    assert not (ckpt / "model.safetensors").exists()
    manifest = json.loads((ckpt / "files.sha256.json").read_text())["files"]
    assert {f"{SHARDED_DIR}/{s}" for s in shards} <= set(manifest)
    assert verify_file_manifest(ckpt, deep=True)
    assert json.loads((ckpt / "trainer_state.json").read_text())["sharded"] is True

    resumed = json.loads((runs["killed"] / "run.json").read_text())
    assert resumed["distributed_type"] == "FSDP" and resumed["num_processes"] == 2  # the config file's route
    got, want = train_losses(runs["killed"]), train_losses(runs["fsdp"])
    assert got == want  # steps 1-10 kept from before the kill, 11-20 recomputed: bit for bit
    w_want = load_file(runs["fsdp"] / FINAL / "model.safetensors")
    w_got = load_file(runs["killed"] / FINAL / "model.safetensors")
    assert w_want.keys() == w_got.keys()
    for name in w_want:
        assert torch.equal(w_got[name], w_want[name]), name
    verify_file_manifest(runs["killed"] / FINAL, deep=True)


def test_final_model_is_a_plain_checkpoint_that_exports_to_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptforge.export.hf import export

    model = load_checkpoint(runs["fsdp"] / FINAL, deep=True)  # strict: every tensor, full shapes
    ref = load_checkpoint(runs["one"] / FINAL)
    w1, w2 = state_dict_for_save(ref), state_dict_for_save(model)
    assert w1.keys() == w2.keys()
    for name in w1:
        a, b = w1[name], w2[name]
        if name.endswith("attn.qkv.bias"):  # key bias: zero true gradient, AdamW-amplified float noise
            a, b = a[: a.numel() // 3], b[: b.numel() // 3]
        # 1e-4, not the losses' 1e-5: a token embedding row with a near-zero gradient (a token seen once)
        # has its float-order noise (reduce-scatter sums in another order) scaled up by Adam's 1/sqrt(v)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)

    out = export(model.eval(), tmp_path / "hf")  # verifies the reload itself; checked again here
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=0)


def test_gathered_weights_load_strictly():
    cfg = GPTConfig.from_preset("test-tiny")
    sd = {k: v.clone() for k, v in GPT(cfg).state_dict().items()}  # as gathered: the tied head listed too
    model = plain_model_from(cfg, sd, source="gathered")
    torch.testing.assert_close(model.tok_emb.weight, sd["tok_emb.weight"], atol=0, rtol=0)
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    del sd["blocks.1.mlp.fc.weight"]
    with pytest.raises(CheckpointError, match=r"gathered: .*missing \['blocks\.1\.mlp\.fc\.weight'\]"):
        plain_model_from(cfg, sd, source="gathered")


def test_fsdp_is_chosen_by_config_or_by_an_accelerate_fsdp_config(monkeypatch):
    for key in (
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
        "FSDP_OFFLOAD_PARAMS",
        "FSDP_ACTIVATION_CHECKPOINTING",
    ):
        monkeypatch.delenv(key, raising=False)
    assert not fsdp_requested("auto") and not fsdp_requested("ddp") and fsdp_requested("fsdp")
    # `accelerate launch --config_file fsdp.yaml` exports the config as environment variables
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested("auto") and not fsdp_requested("ddp")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version=1; .*set fsdp_version: 2"):
        fsdp_requested("auto")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params=true is not supported"):
        fsdp_requested("auto")
    with pytest.raises(ConfigError, match="train.distributed"):
        load_config("pretrain", **{"train.distributed": "zero3"})
