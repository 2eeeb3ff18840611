"""DPO: the loss, rewards and gradients equal TRL's; prompt and padding tokens never count; bad pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.errors import DataError
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.pipeline.config import DPODataConfig
from gptforge.tasks import dpo

PAIRS = [  # uneven prompts and responses, so padding and prompt masks differ per row
    {
        "instruction": "Name a color.",
        "input": "",
        "chosen": "Blue.",
        "rejected": "I will not say a colour today.",
    },
    {
        "instruction": "Rewrite the sentence in passive voice.",
        "input": "The cat chased the mouse across the old wooden floor.",
        "chosen": "The mouse was chased across the old wooden floor by the cat.",
        "rejected": "Cat mouse.",
    },
    {"instruction": "What is 2 + 2?", "input": "", "chosen": "4", "rejected": "5, probably, or maybe 3."},
]


def _models(seed: int = 0) -> tuple[GPT, GPT]:
    """A reference and a policy that differs from it, so rewards are not zero."""
    torch.manual_seed(seed)
    ref = GPT(GPTConfig.from_preset("test-tiny", context_length=96)).eval()
    policy = GPT(ref.cfg).eval()
    policy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref, policy


def _tokenized(max_length: int = 96):
    from datasets import Dataset, DatasetDict

    rows = [{**p, "where": f"pair {i}"} for i, p in enumerate(PAIRS)]
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in dpo.FIELDS})
    tok = dpo.tokenize_preference(DatasetDict({"train": ds}), "alpaca", max_length=max_length)["train"]
    return [dict(zip(tok.column_names, v)) for v in zip(*[tok[c] for c in tok.column_names])]


def _ours(ref: GPT, policy: GPT, items, **kw):
    collate = dpo.PreferenceCollator()
    b = collate(items)
    with torch.no_grad():
        b["ref_chosen_logps"], b["ref_rejected_logps"] = dpo.sequence_logps(
            ref, b["input_ids"], b["targets"]
        ).chunk(2)
    losses, ch, rj = dpo.batch_loss(policy, b, **kw)
    return losses, ch, rj


def _trl(tmp_path: Path, ref: GPT, policy: GPT, items, beta: float, loss: str, label_smoothing: float):
    """TRL's own DPOTrainer loss on HF GPT-2 copies of the same weights and the same token ids."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from gptforge.model.hf import to_hf
    from gptforge.model.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    hf_policy, hf_ref = to_hf(policy).float(), to_hf(ref).float()
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss],
        label_smoothing=label_smoothing,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(items),
        max_length=None,
        precompute_ref_log_probs=False,
        bf16=False,  # TRL defaults to bf16 autocast; the comparison is in fp32
    )
    data = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trainer = DPOTrainer(
        model=hf_policy, ref_model=hf_ref, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.model.train()

    def run(examples):
        keep = [{k: list(e[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples]
        inputs = {k: v.to(trainer.accelerator.device) for k, v in trainer.data_collator(keep).items()}
        return trainer._compute_loss(trainer.model, inputs, False)

    per, chosen, rejected = [], [], []
    for it in items:
        with torch.no_grad():
            per.append(float(run([it])))
        m = trainer._metrics["train"]
        chosen.append(m["rewards/chosen"][-1])
        rejected.append(m["rewards/rejected"][-1])
    trainer.model.zero_grad()
    run(items).backward()
    return torch.tensor(per), torch.tensor(chosen), torch.tensor(rejected), trainer.model


@pytest.mark.parametrize(
    "loss,label_smoothing",
    [("sigmoid", 0.0), ("robust", 0.2), ("ipo", 0.0)],
    ids=["sigmoid", "robust", "ipo"],
)
def test_loss_rewards_and_gradients_equal_trl(tmp_path, loss, label_smoothing):
    pytest.importorskip("trl")
    from gptforge.model.hf import state_dict_from_hf

    ref, policy = _models()
    items = _tokenized()
    beta = 0.5
    trl_per, trl_ch, trl_rj, hf_model = _trl(tmp_path, ref, policy, items, beta, loss, label_smoothing)

    policy.train()  # dropout is 0 in test-tiny: train mode only turns autograd bookkeeping on
    losses, ch, rj = _ours(ref, policy, items, beta=beta, loss=loss, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses.detach().double(), trl_per.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ch.double(), trl_ch.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rj.double(), trl_rj.double(), atol=1e-5, rtol=0)
    assert (ch - rj).abs().max() > 1e-3  # the rewards are not trivially zero

    policy.zero_grad()
    losses.mean().backward()
    ours = {n: p.grad for n, p in policy.named_parameters()}
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    theirs = state_dict_from_hf(hf_grads, policy.cfg)
    assert set(theirs) >= {n for n in ours if n != "lm_head.weight"}
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs if n in ours)
    assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-3  # gradients are not trivially zero


def test_prompt_and_padding_tokens_never_count():
    """Each row's log-prob is the sum over its response tokens alone: the same batched (padded, uneven
    prompts) as alone, whatever the pad id, and equal to a sum over full-softmax log-probs of the
    response positions only."""
    _, policy = _models()
    items = _tokenized()
    lens = [(len(it["prompt_ids"]), len(it["chosen_ids"]), len(it["rejected_ids"])) for it in items]
    assert len({p for p, _, _ in lens}) == 3 and len({c + r for _, c, r in lens}) == 3  # uneven
    b = dpo.PreferenceCollator()(items)
    b_other_pad = dpo.PreferenceCollator(pad_token_id=123)(items)
    with torch.no_grad():
        batched = dpo.sequence_logps(policy, b["input_ids"], b["targets"])
        other = dpo.sequence_logps(policy, b_other_pad["input_ids"], b_other_pad["targets"])
        torch.testing.assert_close(batched, other, atol=1e-5, rtol=0)
        for i, it in enumerate(items):
            for row, key in ((i, "chosen_ids"), (i + len(items), "rejected_ids")):
                p, r = list(it["prompt_ids"]), list(it[key])
                ids = torch.tensor([p + r])
                logp = torch.log_softmax(policy(ids[:, :-1]).float(), -1)[0]
                want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(r))
                assert abs(float(batched[row]) - want) < 1e-4, (row, float(batched[row]), want)
                alone = dpo.PreferenceCollator()([{**it, "chosen_ids": r, "rejected_ids": r}])
                one = dpo.sequence_logps(policy, alone["input_ids"][:1], alone["targets"][:1])
                torch.testing.assert_close(one[0], batched[row], atol=1e-5, rtol=0)
    # every response token is a target exactly once; no prompt or padding position is
    n_targets = (b["targets"] != -100).sum(1).tolist()
    assert n_targets == [c for _, c, _ in lens] + [r for _, _, r in lens]
    assert all(it["chosen_ids"][-1] == it["rejected_ids"][-1] == 50256 for it in items)  # each ends with EOT


def test_reference_logps_are_cached_by_fingerprint(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    ref, policy = _models()
    items = _tokenized()
    dsd = DatasetDict(
        {"train": Dataset.from_list(items).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])}
    )
    calls = []
    hook = ref.register_forward_hook(lambda *a: calls.append(1))
    first = dpo.add_reference_logps(dsd, ref)["train"]
    n = len(calls)
    again = dpo.add_reference_logps(dsd, ref)["train"]
    assert n > 0 and len(calls) == n  # read back, not recomputed
    assert first["ref_chosen_logps"] == again["ref_chosen_logps"]
    hook.remove()
    other = dpo.add_reference_logps(dsd, policy)["train"]  # other weights: another cache entry
    assert other["ref_chosen_logps"] != first["ref_chosen_logps"]


def test_load_splits_follows_the_instruction_split_and_drops_the_six_identical_pairs(
    shared_data_dir, monkeypatch
):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    dsd = dpo.load_splits(DPODataConfig(), seed=123)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 935 - 6, "validation": 55, "test": 110}
    with pytest.raises(DataError, match="are identical.*data.drop_identical"):
        dpo.load_splits(DPODataConfig(drop_identical=False), seed=123)
