"""DPO: the loss, rewards and gradients equal TRL's; prompt and padding tokens never count; bad pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
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
