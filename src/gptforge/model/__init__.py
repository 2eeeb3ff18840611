"""The network and everything about weights. Knows nothing of tasks or pipelines."""

from gptforge.model.config import PRESETS, GPTConfig
from gptforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS"]
