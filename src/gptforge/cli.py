"""`gptforge VERB ...`: one verb per stage. Thin: each verb is a function in a module imported lazily.

A verb is `fn(argv: list[str]) -> int | None`. User errors (GPTForgeError) print one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module:function, one-line help). Modules are imported only when their verb runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "gptforge.commands.run:run",
        "run a pipeline YAML: pretrain -> classify -> instruct -> dpo -> evaluate -> export",
    ),
    "info": ("gptforge.commands.generate:info", "presets, parameter counts and memory"),
    "convert": ("gptforge.commands.model:convert", "convert Hugging Face GPT-2 <-> gptforge checkpoints"),
    "export": (
        "gptforge.commands.model:export",
        "export a model as a verified Hugging Face dir or GGUF file (llama.cpp, Ollama)",
    ),
    "generate": ("gptforge.commands.generate:generate", "generate text from a checkpoint"),
    "evaluate": ("gptforge.commands.evaluate:evaluate", "evaluate a checkpoint or score a responses file"),
    "classify": ("gptforge.commands.evaluate:classify", "label new texts with a classifier checkpoint"),
    "merge": ("gptforge.commands.lora:merge", "fold a LoRA adapter into its base, or export it for PEFT"),
    "pretrain": (
        "gptforge.commands.train:pretrain",
        "train a language model on text (scratch or checkpoint)",
    ),
    "serve": (
        "gptforge.commands.serve:serve",
        "an OpenAI-compatible HTTP server for a model (chat, classify)",
    ),
    "finetune": (
        "gptforge.commands.train:finetune",
        "finetune: `finetune classify`, `finetune instruct` or `finetune dpo`",
    ),
}


def usage() -> str:
    lines = ["usage: gptforge VERB [options]  (gptforge VERB --help for a verb's options)", "", "verbs:"]
    width = max(len(v) for v in COMMANDS)
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from gptforge import __version__

        print(f"gptforge {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(verb, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"gptforge: error: unknown verb {verb!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[verb][0]
    module_name, fn_name = target.split(":")
    from gptforge.errors import GPTForgeError

    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
        code = fn(rest)
    except GPTForgeError as e:
        print(f"gptforge {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptforge {verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptforge info --json | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        return 141
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
