"""gptforge: a from-scratch GPT-2 with exact Hugging Face interop."""

__version__ = "0.1.0"

from gptforge.errors import GPTForgeError  # noqa: E402

__all__ = ["GPTForgeError", "__version__"]
