"""What `gptforge serve` opens: a gptforge checkpoint or a Hugging Face GPT-2 dir, with its prompt style."""

from __future__ import annotations

import warnings

import pytest

from gptforge.errors import ConfigError
from gptforge.export.hf import export
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.generate import generate
from gptforge.serve.app import load_served
from gptforge.serve.engine import SamplingParams

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hf_dir_and_checkpoint_load_with_their_style(tmp_path):
    model = tiny_model(seed=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        hf_dir = export(model, tmp_path / "hf", prompt_style={"name": "phi3"}, verify=False)
    save_checkpoint(model, tmp_path / "ckpt")
    ids = [15496, 11, 995]
    want = generate(model, [ids], max_new_tokens=6, eos_token_id=None)[0]
    for path, style in ((hf_dir, "phi3"), (tmp_path / "ckpt", None)):
        served = load_served(path, device="cpu", max_batch=2, max_queue=2)
        assert (served.style.name if served.style else None) == style
        assert served.name == path.name and not served.is_classifier
        served.engine.start()
        try:
            req = served.engine.generate(ids, SamplingParams(max_tokens=6, eos_ids=()), timeout=30)
        finally:
            served.engine.stop()
        assert req.tokens == want
    with pytest.raises(ConfigError, match="not a gptforge checkpoint, LoRA adapter dir or Hugging Face"):
        load_served(tmp_path, device="cpu")


def test_the_model_loads_on_a_thread_that_ends_before_serving(tmp_path, monkeypatch):
    """The load's torch work runs on its own thread, ended when `load_served` returns, so the engine's
    thread is the only one keeping OpenMP threads (with more alive than cores, GNU OpenMP lets none spin
    and every parallel region waits for a wake-up: gpt2 at 8 requests decoded 21% slower after a load
    on the main thread)."""
    import threading

    import gptforge.model.load as load_module

    save_checkpoint(tiny_model(seed=1), tmp_path / "ckpt")
    seen = []
    real = load_module.load_model

    def recording(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(load_module, "load_model", recording)
    served = load_served(tmp_path / "ckpt", device="cpu", max_batch=2, max_queue=2)
    assert served.engine is not None and len(seen) == 1
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()


def test_print_config_never_shows_the_api_key(tmp_path, capsys):
    from gptforge.cli import main
    from gptforge.pipeline.cli_args import parse_argv

    key = "sk-flag-Qm93-secret"
    argv = ["serve", "mdl", "--api-key", key, "--port", "9001", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert key not in printed
    assert "api_key: null" in printed and "# api_key: set, not shown" in printed
    (tmp_path / "c.yaml").write_text(printed, encoding="utf-8")
    got, _ = parse_argv("serve", ["--config", str(tmp_path / "c.yaml")])
    assert (got.model, got.port, got.api_key) == ("mdl", 9001, None)  # fed back: no key, no placeholder
    assert main(["serve", "mdl", "--print-config"]) == 0
    assert "not shown" not in capsys.readouterr().out  # nothing to hide: no comment
