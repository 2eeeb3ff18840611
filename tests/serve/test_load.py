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
