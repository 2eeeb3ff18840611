"""One measurement in a fresh process, so its peak resident memory is its own; prints one JSON line.

    probe.py from_hf DIR TINY       gptforge from_hf of a local HF dir (read time measured separately)
    probe.py hf_load DIR TINY       transformers GPT2LMHeadModel.from_pretrained of the same dir
    probe.py export DIR TINY OUT    gptforge export (with its reload check) of the model in DIR
    probe.py hf_save DIR TINY OUT   transformers save_pretrained of the model in DIR
    probe.py train IMPL PRESET B T  one training step of gptforge or transformers (after one warm-up step)

TINY is a tiny HF checkpoint that each conversion first runs on once, so one-time costs (imports,
torch's lazy set-up) are paid before the clock starts, for both sides alike.

Peak memory is the kernel's high-water mark (VmHWM, reset just before the measured call) minus the
resident size just before it: what the call itself added at its worst moment.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def measured(fn):
    gc.collect()
    base = rss_bytes()
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return out, {"seconds": secs, "peak_bytes": max(0, peak - base), "base_bytes": base, "peak_exact": exact}


def model_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def main(argv: list[str]) -> dict:
    import transformers

    from gptforge.model import hf as gh

    transformers.logging.set_verbosity_error()
    cmd = argv[0]
    if cmd == "from_hf":
        d = argv[1]
        gh.from_hf(argv[2])
        t0 = time.perf_counter()
        _, sd = gh.read_hf_dir(d)
        read_s = time.perf_counter() - t0
        del sd
        model, m = measured(lambda: gh.from_hf(d))
        m.update(read_seconds=read_s, model_bytes=model_bytes(model))
        return m
    if cmd == "hf_load":
        from transformers import GPT2LMHeadModel

        GPT2LMHeadModel.from_pretrained(argv[2])
        model, m = measured(lambda: GPT2LMHeadModel.from_pretrained(argv[1]))
        m.update(model_bytes=model_bytes(model))
        return m
    if cmd == "export":
        gh.export(gh.from_hf(argv[2]), argv[3] + "-tiny", overwrite=True)
        model = gh.from_hf(argv[1])
        _, m = measured(lambda: gh.export(model, argv[3], overwrite=True))
        m.update(model_bytes=model_bytes(model))
        return m
    if cmd == "hf_save":
        from transformers import GPT2LMHeadModel

        GPT2LMHeadModel.from_pretrained(argv[2]).save_pretrained(argv[3] + "-tiny")
        model = GPT2LMHeadModel.from_pretrained(argv[1])
        _, m = measured(lambda: model.save_pretrained(argv[3]))
        m.update(model_bytes=model_bytes(model))
        return m
    if cmd == "train":
        impl, preset, B, T = argv[1], argv[2], int(argv[3]), int(argv[4])
        from gptforge.model.config import GPTConfig
        from gptforge.model.gpt import GPT

        torch.manual_seed(0)
        cfg = GPTConfig.from_preset(preset, dropout=0.0)
        model = GPT(cfg).train()
        if impl == "transformers":
            model = gh.to_hf(model).train()
        x = torch.randint(0, cfg.vocab_size, (B, T))
        targets = torch.cat([x[:, 1:], torch.full((B, 1), -100)], dim=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            if impl == "transformers":
                loss = model(input_ids=x, labels=x).loss
            else:
                loss = model(x, targets=targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        step()  # optimizer state now exists; the measured step is a steady-state one
        loss, m = measured(step)
        m.update(model_bytes=model_bytes(model), loss=loss)
        return m
    raise SystemExit(f"unknown probe {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
