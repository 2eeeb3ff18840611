"""`gptforge serve MODEL`: the OpenAI-compatible server. FastAPI, uvicorn and torch load only when it runs."""

from __future__ import annotations

import os
import sys

from gptforge.errors import ConfigError


def serve(argv: list[str]) -> int:
    """Load the model, print where it listens (never the key), serve until SIGINT/SIGTERM."""
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("serve", argv)
    if args is None:
        return 0
    if not args.model:
        raise ConfigError("give a model directory (see `gptforge serve --help`)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"gptforge serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn"
        ) from None
    from gptforge.serve.app import API_KEY_ENV, load_served, run

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    served = load_served(
        args.model,
        device=args.device,
        name=args.name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
    )
    kind = (
        "classifier"
        if served.is_classifier
        else f"language model, prompt style {served.style.name if served.style else 'none (plain chat format)'}"
    )
    print(
        f"serving {served.name} ({kind}; context {served.model.cfg.context_length}) on http://{args.host}:{args.port}"
        f" (max_batch {args.max_batch}, max_queue {args.max_queue}; API key {'required' if key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    return run(served, host=args.host, port=args.port, api_key=key)
