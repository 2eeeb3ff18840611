"""Formats a model leaves in, each written then verified: a Hugging Face dir (`export.hf`) with its card."""
