"""Padding-free instruction finetuning (`data.packing`): best-fit rows, the block-diagonal mask, packed loss
and gradients equal to the unpacked ones, steps per epoch, and exact mid-epoch resume with packing."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import gptforge.model.gpt as gpt_module
from gptforge.model.config import IGNORE_INDEX, GPTConfig
from gptforge.model.gpt import GPT, segment_mask, segment_positions
from gptforge.model.lora import LoRAConfig, apply_lora
from gptforge.pipeline.config import TrainConfig, load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_instruct
from gptforge.pipeline.trainer import Trainer
from gptforge.tasks.instruct import (
    InstructionCollator,
    PackedInstructionCollator,
    PackedRows,
    pack_best_fit,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def records(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[dict]:
    """Learnable records (each token the previous + 1 or + 2) of uneven length with a prompt part."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, start, step = (
            int(torch.randint(a, b, (1,), generator=g)) for a, b in ((lo, hi), (0, VOCAB), (1, 3))
        )
        prompt = int(torch.randint(1, length + 1, (1,), generator=g))
        out.append(
            {"input_ids": [(start + step * i) % VOCAB for i in range(length)], "prompt_length": prompt}
        )
    return out


def tiny(dtype=torch.float64, dropout: float = 0.0, ctx: int = 32) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("test-tiny", vocab_size=VOCAB, context_length=ctx, dropout=dropout)
    return GPT(cfg).to(dtype)


# -- best-fit packing ----------------------------------------------------------------------------------


def test_best_fit_decreasing_by_hand():
    # longest first: 7 opens row 0; 6 opens row 1; 4 fits row 1 (space 4, tightest) ...
    assert pack_best_fit([4, 7, 2, 6, 3, 1], capacity=10, seed=0) == [[1, 4], [3, 0], [2, 5]]
    with pytest.raises(ValueError, match="capacity=5"):
        pack_best_fit([6], capacity=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_fit_the_context_and_hold_every_record_once(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 65, (500,), generator=g).tolist()
    rows = pack_best_fit(lengths, capacity=64, seed=seed)
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert len(rows) < 1.1 * math.ceil(sum(lengths) / 64)  # best-fit leaves little space
    assert rows == pack_best_fit(lengths, capacity=64, seed=seed)  # deterministic
    other = pack_best_fit(lengths, capacity=64, seed=seed + 7)
    assert other != rows  # the seed picks which equal-length records share a row ...
    assert sorted(sorted(lengths[i] for i in r) for r in other) == sorted(
        sorted(lengths[i] for i in r) for r in rows
    )  # ... never the row shapes or their number


def test_collated_rows_never_exceed_the_context_and_keep_each_record():
    recs = records(40, 0)
    ds = PackedRows(recs, capacity=32, seed=3)
    batch = PackedInstructionCollator(pad_token_id=0, mask_prompt=True)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape == (len(ds), 32) or batch["input_ids"].shape[1] < 32
    seen = []
    for b, row in enumerate(ds.rows):
        at = 0
        for k, j in enumerate(row):
            n = len(recs[j]["input_ids"])
            assert batch["input_ids"][b, at : at + n].tolist() == recs[j]["input_ids"]
            assert batch["position_ids"][b, at : at + n].tolist() == list(range(n))
            assert (batch["segment_ids"][b, at : at + n] == k).all()
            seen.append(j)
            at += n
        assert (batch["targets"][b, at:] == IGNORE_INDEX).all()  # row padding learns nothing
    assert sorted(seen) == list(range(40))
    assert ds.fill() > 0.9


def test_segment_positions_restart_and_mask_is_block_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    m = segment_mask(seg)[0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


# -- the model on packed rows ----------------------------------------------------------------------------


def test_changing_one_record_leaves_the_others_logits_unchanged():
    model = tiny().eval()
    recs = records(3, 1, lo=8, hi=10)
    collate = PackedInstructionCollator(pad_token_id=0)
    a = collate([recs])
    changed = [{**recs[0], "input_ids": [(t + 5) % VOCAB for t in recs[0]["input_ids"]]}, *recs[1:]]
    b = collate([changed])
    la = model(a["input_ids"], position_ids=a["position_ids"], segment_ids=a["segment_ids"])
    lb = model(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"])
    n0 = len(recs[0]["input_ids"])
    assert not torch.allclose(la[0, :n0], lb[0, :n0])  # record A changed ...
    assert torch.equal(la[0, n0:], lb[0, n0:])  # ... records B and C did not see it
    # and each record's logits are its logits alone
    for k, rec in enumerate(recs):
        start = sum(len(r["input_ids"]) for r in recs[:k])
        alone = model(torch.tensor([rec["input_ids"]]))[0]
        got = la[0, start : start + len(rec["input_ids"])]
        torch.testing.assert_close(got, alone, atol=1e-10, rtol=0)


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_summed_loss(model: GPT, batch: dict) -> torch.Tensor:
    """The summed cross-entropy in the model's own dtype (float64 here), from full logits."""
    packed = ("position_ids", "segment_ids", "cu_seqlens")
    logits = model(batch["input_ids"], **{k: batch[k] for k in packed if k in batch})
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.mark.parametrize("lora", [False, True])
def test_packed_loss_and_gradients_equal_unpacked(tmp_path, lora):
    """The summed loss, the target count (the trainer's normaliser) and every gradient of a packed batch
    equal those of the same records unpacked within 1e-5: in float64 from full logits, and through the
    Trainer's own hooks (its fused loss sums in float32, so there the normalised loss is compared)."""
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path), progress=False, plot=False))
    model = tiny()
    if lora:
        apply_lora(model, LoRAConfig(r=4, alpha=8))
        for p in model.parameters():  # B starts at zero: move it so the adapters matter
            if p.requires_grad and p.dim() == 2:
                torch.nn.init.normal_(p, std=0.1)
    recs = records(12, 2)
    rows = PackedRows(recs, capacity=32, seed=0)
    assert len(rows) < len(recs)  # records really share rows
    packed = PackedInstructionCollator(pad_token_id=0, mask_prompt=True)([rows[i] for i in range(len(rows))])
    unpacked = InstructionCollator(pad_token_id=0, mask_prompt=True, allowed_max_length=32)(recs)
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()

    for how in ("plain float64", "trainer"):
        out = {}
        for name, batch in (("packed", packed), ("unpacked", unpacked)):
            model.zero_grad(set_to_none=True)
            n = float(trainer.count_targets(batch))
            if how == "trainer":  # what Trainer._train_step backpropagates: the sum over the counted targets
                loss = trainer.compute_loss(model, batch) / n
            else:
                loss = plain_summed_loss(model, batch)
            loss.backward()
            out[name] = (loss.item(), n, grads(model))
        (lp, np_, gp), (lu, nu, gu) = out["packed"], out["unpacked"]
        assert np_ == nu > 0, how
        assert lp == pytest.approx(lu, abs=1e-5), how
        assert gp.keys() == gu.keys() and gp, how
        if lora:
            assert all("lora" in k for k in gp)
        for k in gp:
            assert gu[k].abs().max() > 0, (how, k)
            torch.testing.assert_close(gp[k], gu[k], atol=1e-5, rtol=0, msg=f"{how}: {k}")


# -- the training loop ------------------------------------------------------------------------------------


def make_cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        progress=False,
        plot=False,
        lr=1e-2,
        seed=7,
        epochs=2,
        warmup_steps=2,
        batch_size=3,
    )
    return TrainConfig(**{**base, **kw})


def fit_packed(cfg: TrainConfig, trainer_cls=Trainer):
    trainer = trainer_cls(cfg)
    model = tiny(torch.float32, dropout=0.2)
    train = PackedRows(records(40, 0), capacity=32, seed=cfg.seed)
    return trainer.fit(
        model,
        train,
        PackedInstructionCollator(pad_token_id=0, mask_prompt=True),
        records(8, 1),
        run_config={"task": "test"},
        eval_collate_fn=InstructionCollator(pad_token_id=0, mask_prompt=True, allowed_max_length=32),
    ), len(train)


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "lr" in r}


def test_packed_steps_per_epoch_and_mid_epoch_resume_is_exact(tmp_path, sigterm_trainer):
    (ref, n_rows) = fit_packed(make_cfg(tmp_path / "ref", save_every=3))
    spe = n_rows // 3  # train.batch_size counts packed rows (train.drop_last: the partial batch is dropped)
    assert n_rows == 22 and spe == 7  # 40 records, 22 rows, 7 steps an epoch
    assert ref.metrics["status"] == "completed" and ref.metrics["step"] == 2 * spe
    out = tmp_path / "run"
    (stopped, _) = fit_packed(make_cfg(out, save_every=3), trainer_cls=sigterm_trainer)
    assert stopped.metrics["status"] == "interrupted" and stopped.metrics["step"] == 4
    (resumed, _) = fit_packed(make_cfg(out, save_every=3, resume="auto"))
    assert resumed.metrics["status"] == "completed"
    la, lb = train_losses(tmp_path / "ref"), train_losses(out)
    assert sorted(lb) == list(range(1, 2 * spe + 1))
    assert lb == la  # bit-exact, dropout included
    assert resumed.metrics["val_loss"] == ref.metrics["val_loss"]


@pytest.fixture
def data_env(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    return shared_data_dir


def test_run_instruct_with_packing_counts_rows(data_env, tmp_path, capsys):
    def cfg(out, packing):
        return load_config(
            "instruct",
            **{
                "model.init": "scratch",
                "model.preset": "test-tiny",
                "model.context_length": 128,  # two records of about 56 tokens fit a row
                "data.limit": 24,
                "data.mask_prompt": True,
                "data.packing": packing,
                "train.epochs": 1,
                "train.batch_size": 4,
                "train.out_dir": str(out),
                "train.progress": False,
                "train.plot": False,
                "train.seed": 3,
            },
        )

    off = run_instruct(cfg(tmp_path / "off", False))
    on = run_instruct(cfg(tmp_path / "on", True))
    err = capsys.readouterr().err
    import json

    run = json.loads((tmp_path / "on" / "run.json").read_text())
    rows = run["config"]["packed_rows"]
    assert f"packing: 24 records into {rows} rows of <= 128 tokens" in err
    assert rows < 24
    assert on.metrics["step"] == rows // 4 < off.metrics["step"] == 6
    assert run["steps_per_epoch"] == rows // 4
    # evaluation is unpacked either way: the same records, the same kind of number
    assert math.isfinite(on.metrics["val_loss"]) and math.isfinite(on.metrics["test_loss"])


# -- CUDA's varlen kernel: the segment bookkeeping (CPU), the kernel itself (GPU) ----------------------------
def test_collator_lists_every_segment_start_of_the_flattened_batch():
    rows = [[{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}], [{"input_ids": [6, 7, 8, 9]}]]
    batch = PackedInstructionCollator(pad_token_id=0)(rows)
    # row 0: records at 0 and 3, no padding (width 5); row 1: a record at 5, its padding (one token) at 9
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10]
    assert batch["cu_seqlens"].dtype == torch.int32
    # a row whose records share an id with the row before still starts a segment of its own
    assert gpt_module.cu_seqlens_of(torch.tensor([[0, 0], [0, 0]])).tolist() == [0, 2, 4]


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1)):
    """torch's varlen_attn semantics on the CPU: each [cu[i], cu[i+1]) slice attends to itself, causally."""
    assert window_size == (-1, 0) and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (heads, L, head_dim)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


def test_varlen_route_computes_what_the_block_diagonal_mask_does(monkeypatch):
    """With the varlen route forced on the CPU (its kernel replaced by a per-segment reference with its
    call signature), the packed batch's loss and every gradient equal the masked route's within 1e-5: the
    flattening, the `cu_seqlens` and the output layout are right. The kernel itself runs in the GPU test."""
    model = tiny()
    rows = PackedRows(records(12, 2), capacity=32, seed=0)
    batch = PackedInstructionCollator(pad_token_id=0, mask_prompt=True)([rows[i] for i in range(len(rows))])
    calls = []

    def kernel(*a, **kw):
        calls.append(a[3])
        return _reference_varlen(*a, **kw)

    out = {}
    for route in ("mask", "varlen"):
        if route == "varlen":
            monkeypatch.setattr(gpt_module, "varlen_applies", lambda device, dtype: True)
            monkeypatch.setattr(gpt_module, "varlen_kernel", lambda: kernel)
        model.zero_grad(set_to_none=True)
        loss = plain_summed_loss(model, batch)
        loss.backward()
        out[route] = (loss.item(), grads(model), len(calls))
    assert out["mask"][2] == 0 and out["varlen"][2] == model.cfg.n_layers
    assert out["varlen"][0] == pytest.approx(out["mask"][0], abs=1e-5)
    for name, g in out["mask"][1].items():
        torch.testing.assert_close(out["varlen"][1][name], g, atol=1e-5, rtol=0, msg=name)


@pytest.mark.gpu
def test_varlen_kernel_on_cuda_equals_the_masked_route():
    """On a GPU in bf16: the packed forward through torch's varlen flash kernel (what training takes there)
    equals the block-diagonal SDPA route it replaces, loss and gradients within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny().float().cuda()
    rows = PackedRows(records(12, 2), capacity=32, seed=0)
    batch = PackedInstructionCollator(pad_token_id=0, mask_prompt=True)([rows[i] for i in range(len(rows))])
    batch = {k: v.cuda() for k, v in batch.items()}
    assert gpt_module.varlen_applies(batch["input_ids"].device, torch.bfloat16)
    out = {}
    for route in ("mask", "varlen"):
        kw = {k: batch[k] for k in ("position_ids", "segment_ids")}
        if route == "varlen":
            kw["cu_seqlens"] = batch["cu_seqlens"]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch["input_ids"], targets=batch["targets"], reduction="sum", **kw)
        loss.backward()
        out[route] = (loss.item(), grads(model))
    assert out["varlen"][0] == pytest.approx(out["mask"][0], rel=2e-2)
    for name, g in out["mask"][1].items():
        torch.testing.assert_close(out["varlen"][1][name], g, atol=2e-2, rtol=5e-2, msg=name)
