"""The model card: a pure function of the model, its metrics and the export's verification."""

from __future__ import annotations

import torch

from gptforge.export.card import model_card
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT


def test_card_of_a_verified_classifier_and_an_unverified_lm():
    torch.manual_seed(0)
    with torch.device("meta"):
        clf = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2))
        clf.add_classification_head(2, {0: "ham", 1: "spam"})
    card = model_card(
        clf, {"test": {"accuracy": 0.95678}, "step": 7}, {"name": "alpaca"}, 3.2e-7, tolerance=(1e-5, 2e-5)
    )
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    assert "largest difference 3.2e-07; tolerance 1e-05 + 2e-05 * |logit|" in card
    assert "| test.accuracy | 0.9568 |" in card and "| step | 7 |" in card
    assert "| labels | 0=ham, 1=spam |" in card and f"| parameters | {clf.num_parameters():,} |" in card
    assert "prompt_style.json` (alpaca)" in card and "AutoModelForSequenceClassification" in card

    with torch.device("meta"):
        lm = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2))
    card = model_card(lm)
    assert "pipeline_tag: text-generation" in card and "was not verified" in card
    assert "## Metrics" not in card and "## Prompt style" not in card
