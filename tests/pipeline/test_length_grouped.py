"""`data.group_by_length`: the length-grouped sampler (every example once an epoch, far less padding
than random batches on the SMS lengths, seeded, new each epoch, disjoint shards under Accelerate's
multi-process split), classification with it resumed mid-epoch bit for bit, and the field's type check."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from gptforge.cli import main
from gptforge.pipeline import train as train_module
from gptforge.pipeline.checkpoints import FINAL
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.sampler import LengthGroupedSampler, padding_fraction
from gptforge.pipeline.train import run_classify
from gptforge.pipeline.trainer import Trainer


@pytest.fixture(scope="module")
def sms_lengths(shared_data_dir) -> list[int]:
    """Token lengths of the reference's 1,045 SMS training messages (2 to 120 tokens, mean 30)."""
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.tasks.classify import load_sms_spam

    texts = load_sms_spam("book", path=shared_data_dir / "sms_spam" / "SMSSpamCollection")["train"]["text"]
    return [len(ids) for ids in Tokenizer().encode_batch(texts)]


def flat(batches) -> list[int]:
    return [int(i) for b in batches for i in b]


def test_every_example_once_in_grouped_batches_seeded_and_new_each_epoch(sms_lengths):
    n, size = len(sms_lengths), 8
    s = LengthGroupedSampler(sms_lengths, size, seed=123)
    s.set_epoch(0)
    e0 = s.batches()
    assert sorted(flat(e0)) == list(range(n))  # each example exactly once
    assert [len(b) for b in e0] == [size] * (n // size) + [n % size]  # the partial batch last
    assert list(iter(s)) == flat(e0) and len(s) == n
    # grouped: the padding share falls from about 45% (random batches) to under 10%
    perm = np.random.default_rng(0).permutation(n)
    random_pad = padding_fraction(sms_lengths, [perm[i : i + size] for i in range(0, n, size)])
    grouped_pad = padding_fraction(sms_lengths, e0)
    assert random_pad > 0.35 and grouped_pad < 0.10, (random_pad, grouped_pad)
    # the order of batches is shuffled: long and short batches are spread over the epoch
    longest = [max(sms_lengths[i] for i in b) for b in e0[:-1]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # deterministic per (seed, epoch); another epoch or seed gives another order, with every example again
    again = LengthGroupedSampler(sms_lengths, size, seed=123)
    again.set_epoch(0)
    assert flat(again.batches()) == flat(e0)
    e1 = s.batches(1)
    assert flat(e1) != flat(e0) and sorted(flat(e1)) == list(range(n))
    assert flat(LengthGroupedSampler(sms_lengths, size, seed=124).batches(0)) != flat(e0)
    assert padding_fraction(sms_lengths, e1) < 0.10


def test_processes_get_disjoint_batches_through_accelerate_and_resume_skips_exactly(sms_lengths):
    """Accelerate's split (batch i to process i mod 2) and skip_first_batches, on this sampler."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    lengths, size = sms_lengths[:96], 4  # 24 full batches: 12 per process, none repeated

    def loader(rank: int):
        dl = DataLoader(
            list(range(len(lengths))),
            batch_size=size,
            sampler=LengthGroupedSampler(lengths, size, seed=9),
            collate_fn=lambda xs: xs,
        )
        return prepare_data_loader(
            dl, torch.device("cpu"), num_processes=2, process_index=rank, put_on_device=False,
            use_seedable_sampler=True, data_seed=9,
        )  # fmt: skip

    for epoch in (0, 1):
        want = [b.tolist() for b in LengthGroupedSampler(lengths, size, seed=9).batches(epoch)]
        got = []
        for rank in (0, 1):
            dl = loader(rank)
            dl.set_epoch(epoch)
            got.append(list(dl))
            assert got[rank] == want[rank::2]
            dl = loader(rank)
            dl.set_epoch(epoch)
            assert list(skip_first_batches(dl, 5)) == got[rank][5:]
        assert not set(flat(got[0])) & set(flat(got[1]))
        assert sorted(flat(got[0]) + flat(got[1])) == list(range(len(lengths)))


def classify_overrides(out_dir, **kw) -> dict:
    return {
        "model.init": "scratch",
        "model.preset": "test-tiny",
        "model.dropout": 0.1,
        "data.limit": 60,
        "data.group_by_length": True,
        "train.epochs": 2,
        "train.batch_size": 4,  # 15 steps an epoch
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.save_every": 4,
        "train.eval_every": 0,
        "train.seed": 11,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(out_dir),
        **kw,
    }


class Recording(Trainer):
    """Records every training batch's width; with `stop_at`, sends itself SIGTERM in that step."""

    widths: list[int] = []
    stop_at: int | None = None

    def compute_loss(self, model, batch):
        if model.training:
            Recording.widths.append(batch["input_ids"].shape[1])
            if Recording.stop_at is not None and self.state.step + 1 == Recording.stop_at:
                Recording.stop_at = None
                os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_loss(model, batch)


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "lr" in r}


@pytest.mark.usefixtures("one_thread")
def test_classify_grouped_resumes_mid_epoch_bit_for_bit(shared_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setattr(train_module, "Trainer", Recording)
    Recording.widths, Recording.stop_at = [], None
    ref = run_classify(load_config("classify", **classify_overrides(tmp_path / "ref")))
    assert ref.metrics["status"] == "completed" and ref.metrics["step"] == 30
    assert "data.group_by_length: padding is" in capsys.readouterr().err
    ref_widths = Recording.widths
    # the batches are the sampler's: each padded to its own longest example, in the sampler's order
    from gptforge.tasks.classify import load_sms_spam, token_lengths, tokenize_classification

    sms = load_sms_spam("book", seed=11)  # load_splits seeds the split with train.seed
    sms = {k: v.select(range(60)) for k, v in sms.items()}
    lengths = token_lengths(tokenize_classification(sms, max_length=64)["train"])
    s = LengthGroupedSampler(lengths, 4, seed=11)
    want = [max(lengths[i] for i in b) for e in (0, 1) for b in s.batches(e)]
    assert ref_widths == want

    out = tmp_path / "run"
    Recording.widths, Recording.stop_at = [], 7  # mid-epoch 0, after the save at step 4
    stopped = run_classify(load_config("classify", **classify_overrides(out)))
    assert stopped.metrics["status"] == "interrupted" and stopped.metrics["step"] == 7
    Recording.widths = []
    resumed = run_classify(load_config("classify", **classify_overrides(out, **{"train.resume": "auto"})))
    assert resumed.metrics["status"] == "completed"
    assert (
        Recording.widths == ref_widths[7:]
    )  # the rest of epoch 0 is replayed, then epoch 1 as uninterrupted
    assert train_losses(out) == train_losses(tmp_path / "ref")  # bit-exact, dropout included
    wr, wo = (
        load_file(tmp_path / "ref" / FINAL / "model.safetensors"),
        load_file(out / FINAL / "model.safetensors"),
    )
    for k in wr:
        assert torch.equal(wr[k], wo[k]), k
    assert resumed.metrics["val_accuracy"] == ref.metrics["val_accuracy"]


def cli_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_group_by_length_must_be_a_bool(capsys, tmp_path):
    err = cli_error(capsys, "finetune", "classify", "--data.group_by_length=maybe")
    assert err == "gptforge finetune: error: data.group_by_length='maybe': expected bool"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  group_by_length: 3\n", encoding="utf-8")
    err = cli_error(capsys, "finetune", "classify", "--config", str(yaml))
    assert err == f"gptforge finetune: error: {yaml}: data.group_by_length=3: expected bool"
    default = Path(__file__).parents[2] / "configs" / "default.yaml"
    err = cli_error(capsys, "run", str(default), "--set", "classify.data.group_by_length=[1]")
    assert err == f"gptforge run: error: {default} (--set): classify: data.group_by_length=[1]: expected bool"
    assert load_config("classify", **{"data.group_by_length": "true"}).data.group_by_length is True
    assert load_config("classify").data.group_by_length is False  # the reference's random batches
