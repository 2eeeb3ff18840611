"""Formats a model leaves in, each written then verified: a Hugging Face dir with its model card
(`export.hf`, `export.card`) and a PEFT adapter dir (`export.peft`). Uses `model`; nothing in `model` uses it."""
