"""GGUF export: round trips through llama.cpp per type, metadata, chat template, Modelfile, refusals,
the transformers-reader fallback and the mismatch path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import gptforge.export.gguf as gg
from gptforge.cli import main
from gptforge.errors import ConversionError
from gptforge.export.chat_template import chat_template_for
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.tokenizer import EOT, N_VOCAB
from gptforge.tasks.instruct import get_prompt_style


def _need_llama_cpp() -> None:
    """Skipped with the reason on a machine without llama-cpp-python; under CI its absence is a failure."""
    if gg.llama_cpp_available():
        return
    if os.environ.get("CI"):
        pytest.fail("llama-cpp-python is not installed in CI: `pip install -e .[dev]` must build it")
    pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python)")


def odd_model(emb: int = 96, **kw) -> GPT:
    """A random model of odd sizes: 3 heads, 2 layers, context 40, GPT-2's full vocabulary (the tokenizer)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=N_VOCAB, context_length=40, emb_dim=emb, n_layers=2, n_heads=3, **kw)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model96() -> GPT:
    return odd_model(96, tie_embeddings=False)


# -- round trips in llama.cpp --------------------------------------------------------------------------


@pytest.mark.parametrize("quant", gg.QUANTS)
def test_round_trip_in_llama_cpp(model96, tmp_path, quant):
    _need_llama_cpp()
    r = gg.export_gguf(model96, tmp_path / "m.gguf", quant)
    assert r.check is not None and r.check.backend.startswith("llama.cpp")
    assert r.check.max_logit_diff <= gg.tolerance(quant, 2) == r.check.tolerance
    if quant == "f32":
        assert r.check.max_logit_diff < 1e-3
    if quant in gg.GREEDY_EXACT:
        assert r.check.greedy_equal is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp left
    assert r.size == (tmp_path / "m.gguf").stat().st_size


def test_f32_is_exact_up_to_ggml_gelu_table(tmp_path, monkeypatch):
    """With ggml's f16 GELU table emulated in gptforge, an f32 file's logits agree to ~2e-5: the tensor
    names, layouts and hyperparameters are exact; the documented f32 tolerance covers only that table."""
    _need_llama_cpp()
    import torch.nn.functional as F

    import gptforge.model.gpt as gpt_mod

    model = odd_model(48)
    r = gg.export_gguf(model, tmp_path / "m.gguf", "f32")
    assert r.check.max_logit_diff > 5e-5  # the table's rounding is visible without the emulation

    gelu = F.gelu

    def gelu_f16_table(x, approximate="none"):
        return gelu(x.half().float(), approximate=approximate).half().float()

    monkeypatch.setattr(gpt_mod.F, "gelu", gelu_f16_table)
    ids = gg.check_inputs(model.cfg)
    ours, _ = gg._ours(model, ids)
    theirs, _, _ = gg._llama_cpp_run(tmp_path / "m.gguf", ids, 0, model.cfg.context_length)
    assert float(np.abs(ours - theirs).max()) < 1e-4


def test_tied_model_has_no_output_tensor_and_llama_cpp_tokenizes_like_gptforge(tmp_path):
    _need_llama_cpp()
    import llama_cpp

    from gptforge.model.tokenizer import Tokenizer

    model = odd_model(48)
    gg.export_gguf(model, tmp_path / "m.gguf", "f16", prompt_style=get_prompt_style("alpaca"))
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "m.gguf"))
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert names["position_embd.weight"].tensor_type.name == "F32"
    assert names["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    assert names["blk.0.attn_qkv.bias"].tensor_type.name == "F32"
    assert names["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["gpt2.context_length"].contents() == 40
    assert reader.fields["gpt2.attention.head_count"].contents() == 3
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    # the same template as the Hugging Face export's: one mapping of chat messages onto the prompt style
    assert reader.fields["tokenizer.chat_template"].contents() == chat_template_for({"name": "alpaca"})

    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=40, verbose=False, vocab_only=True)
    text = "Hello, world! GGUF exports stay exact.<|endoftext|> 12345  spaces\n\nnew lines"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == Tokenizer().encode(text)


# -- chat template and Modelfile -----------------------------------------------------------------------


def test_modelfile_for_an_instruction_model_and_a_base_model():
    text = gg.modelfile(get_prompt_style("alpaca"), "m.gguf")
    st = get_prompt_style("alpaca")
    assert text.startswith("FROM ./m.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.replace("{{ .Prompt }}", "I").replace("{{ .Response }}", "") == st.format_prompt(
        {"instruction": "I"}
    )
    assert 'PARAMETER stop """\n\n### Instruction:"""' in text
    assert f'PARAMETER stop "{EOT}"' in text and text.count(EOT) == 1
    assert gg.modelfile(None, "m.gguf") == f'FROM ./m.gguf\n\nPARAMETER stop "{EOT}"\n'


def test_cli_writes_gguf_and_modelfile_for_an_instruction_checkpoint(tmp_path, capsys):
    from gptforge.io import write_json

    ckpt = tmp_path / "ckpt"
    save_checkpoint(odd_model(48), ckpt)
    write_json(ckpt / "prompt_style.json", {"name": "phi3", "template": "", "stop_strings": []})
    write_json(ckpt / "metrics.json", {"val_loss": 1.25})
    out = tmp_path / "o" / "m.gguf"
    args = ["export", str(ckpt), "--format", "gguf", "--out", str(out), "--quant", "f16", "--ollama"]
    assert main([*args, "--license", "mit"]) == 0
    printed = capsys.readouterr().out
    assert "gguf f16" in printed and "max |logit diff|" in printed and "ollama create" in printed
    mf = (tmp_path / "o" / "Modelfile").read_text()
    assert "<|user|>\n{{ .Prompt }}\n<|assistant|>:\n" in mf and 'PARAMETER stop "<|end|>"' in mf
    assert main(args) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert "val_loss 1.25" in fields["general.description"].contents()
    assert fields["general.license"].contents() == "mit"


# -- refusals: one line, exit 2, nothing written -------------------------------------------------------


@pytest.mark.parametrize(
    "case,extra,needle",
    [
        ("classifier", ["--quant", "f16"], "classification head"),
        ("lm48", ["--quant", "q8_0"], "not a multiple of q8_0's block size 32"),
        ("lm48", ["--quant", "q4_0"], "token_embd.weight has rows of 48 values"),
        (
            "lm48",
            ["--quant", "q5_k"],
            "gguf.quant='q5_k' is not valid; use one of f32, f16, bf16, q8_0, q4_0",
        ),
        ("small_vocab", [], "model.vocab_size=1000 is smaller than the GPT-2 tokenizer's 50257"),
        ("exact_gelu", [], "llama.cpp's gpt2 computes the tanh GELU (gelu_new) only"),
    ],
)
def test_refusals(tmp_path, capsys, case, extra, needle):
    torch.manual_seed(0)
    kw = {
        "classifier": {"num_labels": 2},
        "small_vocab": {"vocab_size": 1000},
        "exact_gelu": {"activation": "gelu"},
    }.get(case, {})
    base = {"vocab_size": N_VOCAB, "context_length": 40, "emb_dim": 48, "n_layers": 2, "n_heads": 3}
    model = GPT(GPTConfig(**{**base, **kw})).eval()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(out_dir / "m.gguf"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_unknown_format_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "format='onnx'" in capsys.readouterr().err


# -- the fallback and the mismatch -------------------------------------------------------------------------


def test_transformers_reader_fallback_when_llama_cpp_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    r = gg.export_gguf(odd_model(96), tmp_path / "m.gguf", "q8_0")
    assert r.check.backend.startswith("transformers GGUF reader")
    assert "llama-cpp-python is not installed" in r.check.note and r.check.greedy_equal is None
    assert r.check.max_logit_diff <= gg.tolerance("q8_0", 2)


def test_mismatch_deletes_the_temp_file_and_names_the_largest_difference(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gg.LOGIT_TOLERANCE, "f16", 1e-9)
    with pytest.raises(
        ConversionError, match=r"f16 logits differ from gptforge's by up to .* \(position \d+"
    ):
        gg.export_gguf(odd_model(48), tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
    ckpt = tmp_path / "ckpt"
    save_checkpoint(odd_model(48), ckpt)
    assert main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "logits differ" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- pipeline config -----------------------------------------------------------------------------------


def test_export_stage_takes_formats_and_gguf_options():
    from gptforge.errors import ConfigError
    from gptforge.pipeline.config import ExportStageConfig, config_from_mapping

    cfg = config_from_mapping(ExportStageConfig, {"formats": ["hf", "gguf"], "gguf": {"quant": "q4_0"}})
    assert cfg.formats == ["hf", "gguf"] and cfg.gguf.quant == "q4_0" and cfg.gguf.ollama is False
    with pytest.raises(ConfigError, match="format='ggfu'.*did you mean 'gguf'"):
        config_from_mapping(ExportStageConfig, {"formats": ["ggfu"]})
    with pytest.raises(ConfigError, match="gguf.quant='q8_1' is not valid; did you mean 'q8_0'"):
        config_from_mapping(ExportStageConfig, {"formats": ["gguf"], "gguf": {"quant": "q8_1"}})
    from gptforge.pipeline.config import GGUF_QUANTS

    assert GGUF_QUANTS == gg.QUANTS
    with pytest.raises(ConversionError, match="--quant 'q5' is not a GGUF type gptforge writes"):
        gg.export_gguf(odd_model(48), "unused.gguf", "q5")


def test_cli_takes_one_format(tmp_path, capsys):
    args = ["export", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "hf", "--format", "gguf"]
    assert main(args) == 2
    assert "--format: give one of hf, gguf" in capsys.readouterr().err


def test_pipeline_exports_hf_and_gguf_and_the_summary_names_both(tmp_path, shared_data_dir, monkeypatch):
    import yaml

    from gptforge.pipeline.runner import run_pipeline
    from gptforge.pipeline.stages import load_pipeline

    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    spec = {
        "name": "g",
        "stages": ["pretrain", "export"],
        "pretrain": {
            "model": {"init": "scratch", "preset": "test-tiny"},
            "data": {"sources": ["the-verdict"], "context_length": 32},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": False},
        },
        "export": {"formats": ["hf", "gguf"], "gguf": {"quant": "q8_0", "ollama": True}},
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    results = run_pipeline(load_pipeline(path, runs_dir=tmp_path / "runs"), log=lambda *_: None)
    export = results[-1]
    root = tmp_path / "runs" / "g" / "export"
    assert export.outputs == {
        "pretrain": str(root / "pretrain"),
        "pretrain_gguf": str(root / "pretrain-gguf" / "pretrain-q8_0.gguf"),
    }
    assert (root / "pretrain" / "model.safetensors").is_file() and (
        root / "pretrain-gguf" / "Modelfile"
    ).is_file()
    check = export.metrics["pretrain"]["gguf"]
    assert check.startswith("q8_0 in ") and "max|dlogit|" in check
    summary = (tmp_path / "runs" / "g" / "summary.md").read_text()
    assert "pretrain-q8_0.gguf" in summary and "q8_0 in " in summary and str(root / "pretrain") in summary


def test_a_hugging_face_dir_exports_as_gguf(tmp_path, capsys):
    from gptforge.export.hf import export

    model = odd_model(48)
    export(model, tmp_path / "hf", verify=False)
    out = tmp_path / "m.gguf"
    assert (
        main(["export", str(tmp_path / "hf"), "--format", "gguf", "--quant", "f32", "--out", str(out)]) == 0
    )
    assert "max |logit diff|" in capsys.readouterr().out and out.is_file()
    assert main(["export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "n.gguf")]) == 2
    assert "not a gptforge checkpoint, LoRA run or Hugging Face model dir" in capsys.readouterr().err


def test_llama_cpp_chat_completion_uses_the_embedded_template_and_answers_like_gptforge(tmp_path):
    """End to end: llama-cpp-python formats the chat with the file's template, tokenizes it with the file's
    tokenizer and decodes greedily; the reply equals gptforge's greedy continuation of its own prompt."""
    _need_llama_cpp()
    import llama_cpp

    from gptforge.model.generate import generate
    from gptforge.model.tokenizer import Tokenizer

    model = odd_model(48)
    st = get_prompt_style("alpaca")
    gg.export_gguf(model, tmp_path / "m.gguf", "f32", prompt_style=st)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=40, verbose=False)
    msg = {"role": "user", "content": "Hi"}
    out = llm.create_chat_completion([msg], max_tokens=5, temperature=0, repeat_penalty=1.0)
    tok = Tokenizer()
    prompt = tok.encode(st.format_prompt({"instruction": "Hi"}))
    ours = generate(model, [prompt], max_new_tokens=5)[0]
    assert out["choices"][0]["message"]["content"] == tok.decode(ours)


def test_a_file_llama_cpp_cannot_load_is_not_written(tmp_path, monkeypatch):
    _need_llama_cpp()
    tensors = gg.gguf_tensors

    def missing_one(model):
        return {k: v for k, v in tensors(model).items() if k != "blk.1.ffn_down.bias"}

    monkeypatch.setattr(gg, "gguf_tensors", missing_one)
    with pytest.raises(ConversionError, match="llama.cpp cannot load the GGUF"):
        gg.export_gguf(odd_model(48), tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []
