"""A GGUF file (llama.cpp, Ollama, LM Studio, llama-cpp-python), written then verified.

Written with the `gguf` package under llama.cpp's `gpt2` architecture: its tensor names, its layouts (our
nn.Linear weights are already (out, in), the layout llama.cpp's converter makes by transposing HF's Conv1D)
and its precision rules (1-D tensors, norms and the position embedding stay f32; the other matrices take
the chosen type). The file is written to a temp path beside the target, run in llama.cpp through
llama-cpp-python (else read back by transformers' GGUF reader, with a note) and compared with gptforge's
logits and greedy tokens before it is renamed into place: a failed check leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gptforge.errors import ConversionError
from gptforge.export.chat_template import chat_template_for
from gptforge.io import clean_stale_temps, storage_error, temp_path, write_text
from gptforge.model.gpt import GPT
from gptforge.model.tokenizer import EOT, EOT_ID, N_VOCAB, bpe_files_dir

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_QUANT = "f16"

# Max |logit difference| against gptforge's fp32 logits that the check accepts, per type and per
# transformer block (the error grows with depth): about 3x the largest per-block difference measured in
# llama.cpp's CPU backend (llama-cpp-python 0.3.36) on random models (emb 96 / 2 blocks, cpu-small,
# gpt2-size) and the trained cpu-tiny instruct model of configs/default.yaml. Largest measured per block:
# f32 1.4e-4, f16 4.7e-4, bf16 5e-3, q8_0 1e-2, q4_0 0.14. f32 is not bit-exact because ggml's CPU GELU
# reads an f16 table (input and output rounded to f16): with that rounding emulated in gptforge the f32
# difference drops to ~2e-5 (tests/export/test_gguf.py::test_f32_is_exact_up_to_ggml_gelu_table).
LOGIT_TOLERANCE = {"f32": 5e-4, "f16": 2e-3, "bf16": 2e-2, "q8_0": 4e-2, "q4_0": 0.5}


def tolerance(quant: str, n_layers: int) -> float:
    """The check's bound on max |logit diff| for a model of `n_layers` blocks."""
    return LOGIT_TOLERANCE[quant] * max(1, n_layers)


# Types whose greedy tokens must equal gptforge's (the others may flip near-ties and are only reported).
GREEDY_EXACT = ("f32", "f16")
GREEDY_TOKENS = 16


def _qtype(quant: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def _file_type(quant: str):
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[quant]


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """gptforge weights under llama.cpp's GPT-2 names; `output` only when not tied to the embedding.

    A model without qkv bias gets a zero bias: llama.cpp's GPT-2 graph always adds one.
    """
    cfg = model.cfg
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_emb.weight"], "position_embd.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        qkv_bias = sd.get(p + "attn.qkv.bias")
        out |= {
            b + "attn_norm.weight": sd[p + "ln_1.weight"],
            b + "attn_norm.bias": sd[p + "ln_1.bias"],
            b + "attn_qkv.weight": sd[p + "attn.qkv.weight"],
            b + "attn_qkv.bias": qkv_bias if qkv_bias is not None else torch.zeros(3 * cfg.emb_dim),
            b + "attn_output.weight": sd[p + "attn.proj.weight"],
            b + "attn_output.bias": sd[p + "attn.proj.bias"],
            b + "ffn_norm.weight": sd[p + "ln_2.weight"],
            b + "ffn_norm.bias": sd[p + "ln_2.bias"],
            b + "ffn_up.weight": sd[p + "mlp.fc.weight"],
            b + "ffn_up.bias": sd[p + "mlp.fc.bias"],
            b + "ffn_down.weight": sd[p + "mlp.proj.weight"],
            b + "ffn_down.bias": sd[p + "mlp.proj.bias"],
        }
    out |= {"output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def tensor_type(name: str, t: torch.Tensor, quant: str) -> str:
    """The type a tensor is stored in: llama.cpp's converter keeps 1-D tensors, norms and the position
    embedding in f32 (its kernels for them are f32-only); the other matrices take `quant`."""
    if t.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return "f32"
    return quant


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        import difflib

        close = difflib.get_close_matches(str(quant), QUANTS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(QUANTS)}"
        raise ConversionError(f"--quant {quant!r} is not a GGUF type gptforge writes; {hint}")


def check_exportable(model: GPT, quant: str) -> None:
    """Refuse what llama.cpp's GPT-2 cannot run as the model runs: one line, before anything is written."""
    check_quant(quant)
    cfg = model.cfg
    if cfg.num_labels:
        raise ConversionError(
            f"the model is a classifier ({cfg.num_labels} labels); llama.cpp's gpt2 has no classification "
            "head: export it with --format hf instead"
        )
    if cfg.vocab_size < N_VOCAB:
        raise ConversionError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the GPT-2 tokenizer's {N_VOCAB} tokens that the "
            "GGUF file embeds; llama.cpp needs one embedding row per token"
        )
    if cfg.activation != "gelu_new":
        raise ConversionError(
            f"model.activation={cfg.activation!r}: llama.cpp's gpt2 computes the tanh GELU (gelu_new) only; "
            "export it with --format hf instead"
        )
    from gguf import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[_qtype(quant)][0]
    if block > 1:
        for name, t in gguf_tensors(model).items():
            if tensor_type(name, t, quant) == quant and t.shape[-1] % block:
                raise ConversionError(
                    f"--quant {quant}: {name} has rows of {t.shape[-1]} values, not a multiple of {quant}'s "
                    f"block size {block}; choose f16, bf16 or f32 (or a model whose widths are multiples "
                    f"of {block})"
                )


# -- chat template and Ollama Modelfile -----------------------------------------------------------------

_I, _N = "\x00INSTRUCTION\x00", "\x00INPUT\x00"


class PromptStyleLike(Protocol):
    """tasks.instruct.PromptStyle, as this layer sees it (export sits below tasks: the caller resolves a
    checkpoint's prompt_style.json with `get_prompt_style`)."""

    name: str
    stop_strings: list[str]

    def format_prompt(self, record: Mapping[str, Any]) -> str: ...

    def format_response(self, output: str) -> str: ...


@dataclasses.dataclass(frozen=True)
class PromptParts:
    """A prompt style as literal pieces: head + instruction [+ input_sep + input] + tail."""

    head: str
    input_sep: str
    tail: str


def prompt_parts(style: PromptStyleLike) -> PromptParts:
    """Split a prompt style into its literal pieces by formatting marker records with gptforge's own
    formatter, so the chat template cannot drift from it; a style of another shape is refused."""
    st = style
    one = st.format_prompt({"instruction": _I, "input": ""})
    two = st.format_prompt({"instruction": _I, "input": _N})
    if one.count(_I) != 1 or two.count(_N) != 1:
        raise ConversionError(f"prompt style {st.name!r} has no chat-template form (instruction [input])")
    head, tail = one.split(_I)
    head2, rest = two.split(_I)
    input_sep, tail2 = rest.split(_N)
    if head2 != head or tail2 != tail:
        raise ConversionError(f"prompt style {st.name!r} has no chat-template form (instruction [input])")
    return PromptParts(head, input_sep, tail)


def modelfile(style: PromptStyleLike | None, gguf_name: str) -> str:
    """An Ollama Modelfile: FROM the file beside it; for an instruction model, the prompt style as TEMPLATE
    (Go template: the user's prompt is the instruction) and its stop strings plus <|endoftext|>."""
    lines = [f"FROM ./{gguf_name}", ""]
    stops = [EOT]
    if style is not None:
        p = prompt_parts(style)
        lines += [f'TEMPLATE """{p.head}{{{{ .Prompt }}}}{p.tail}{{{{ .Response }}}}"""', ""]
        stops = [*style.stop_strings, EOT]
    for s in dict.fromkeys(stops):
        # Ollama's parser takes no escapes: a stop string with a newline goes in a raw multi-line string
        lines.append(f'PARAMETER stop """{s}"""' if "\n" in s or '"' in s else f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"


# -- writing ---------------------------------------------------------------------------------------------


def _tokenizer_lists() -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level strings by id), token types and merges from GPT-2's BPE files."""
    from gguf import TokenType

    d = bpe_files_dir()
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * N_VOCAB
    for s, i in vocab.items():
        tokens[i] = s
    types = [int(TokenType.NORMAL)] * N_VOCAB
    types[EOT_ID] = int(TokenType.CONTROL)
    merges = [line for line in (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    return tokens, types, merges


def description(metrics: Mapping[str, Any] | None) -> str:
    text = "GPT-2-class model trained with gptforge"
    if metrics:
        flat = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
        }
        if flat:
            text += "; " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items()
            )
    return text


def write_gguf(
    model: GPT,
    path: str | os.PathLike,
    quant: str = DEFAULT_QUANT,
    *,
    name: str = "gptforge",
    metrics: Mapping[str, Any] | None = None,
    prompt_style: PromptStyleLike | None = None,
    license: str | None = None,
) -> None:
    """Write the GGUF file at `path` (no check, no temp: `export_gguf` does both)."""
    import gguf
    from gguf import quants

    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name(name)
    w.add_description(description(metrics))
    if license:
        w.add_license(license)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_file_type(_file_type(quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _tokenizer_lists()
    if cfg.vocab_size > N_VOCAB:  # padded vocabularies: unused ids, never produced by the tokenizer
        tokens += [f"[PAD{i}]" for i in range(N_VOCAB, cfg.vocab_size)]
        types += [int(gguf.TokenType.UNUSED)] * (cfg.vocab_size - N_VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    # the same template as the Hugging Face export's (export.chat_template): one mapping of messages
    w.add_chat_template(chat_template_for({"name": prompt_style.name} if prompt_style is not None else None))
    for tname, t in gguf_tensors(model).items():
        kind = tensor_type(tname, t, quant)
        a = t.numpy()
        if kind == "f32":
            w.add_tensor(tname, a)
        elif kind == "f16":
            w.add_tensor(tname, a.astype(np.float16))
        else:
            q = _qtype(kind)
            w.add_tensor(tname, quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- checking --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFCheck:
    """What the check ran and found."""

    backend: str  # "llama.cpp (llama-cpp-python X)" or "transformers GGUF reader (X)"
    max_logit_diff: float
    tolerance: float
    greedy_equal: bool | None  # None: not run (transformers fallback does not generate greedily here)
    note: str = ""

    def short(self, quant: str) -> str:
        """For the pipeline summary: `q8_0 in llama.cpp: max|dlogit| 0.014 <= 0.1, greedy equal`."""
        where = self.backend.split(" (")[0]
        greedy = {True: ", greedy equal", False: ", greedy differs", None: ""}[self.greedy_equal]
        return f"{quant} in {where}: max|dlogit| {self.max_logit_diff:.2g} <= {self.tolerance:g}{greedy}"

    def line(self) -> str:
        greedy = {True: "greedy tokens equal", False: "greedy tokens differ", None: "greedy not checked"}
        text = (
            f"checked in {self.backend}: max |logit diff| {self.max_logit_diff:.3g} "
            f"(tolerance {self.tolerance:g}), {greedy[self.greedy_equal]}"
        )
        return text + (f"; {self.note}" if self.note else "")


def check_inputs(cfg) -> list[int]:
    """A fixed prompt: real text through the GPT-2 tokenizer, cut to leave room for greedy tokens."""
    from gptforge.model.tokenizer import Tokenizer

    ids = Tokenizer().encode("The quick brown fox jumps over the lazy dog. GGUF files must compute the same")
    n = max(1, min(len(ids), cfg.context_length - GREEDY_TOKENS))
    return [i % cfg.vocab_size for i in ids[:n]]


def _ours(model: GPT, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    from gptforge.export.hf import _fp32_cpu
    from gptforge.model.generate import generate

    ref = _fp32_cpu(model)
    with torch.no_grad():
        logits = ref(torch.tensor([ids]))[0].numpy()
    n = min(GREEDY_TOKENS, model.cfg.context_length - len(ids))
    greedy = generate(ref, [ids], max_new_tokens=n, eos_token_id=None)[0] if n > 0 else []
    return logits, list(greedy)


def _llama_cpp_run(path: Path, ids: list[int], n_new: int, n_ctx: int) -> tuple[np.ndarray, list[int], str]:
    import llama_cpp

    # An f32 KV cache: llama.cpp's default f16 cache rounds keys and values (up to ~3e-4 in the logits of
    # an f32 file), a runtime choice the check keeps out of what it measures about the file.
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=max(1, os.cpu_count() or 1),
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )
    except Exception as e:  # llama.cpp refuses the file: the export is wrong, not the user's input
        raise ConversionError(
            f"{path.name}: llama.cpp cannot load the GGUF ({type(e).__name__}: {e})"
        ) from None
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        greedy: list[int] = []
        for _ in range(n_new):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(tok)
            if len(greedy) < n_new:
                llm.eval([tok])
        return logits, greedy, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    finally:
        llm.close()


def _transformers_run(path: Path, ids: list[int], cfg) -> tuple[np.ndarray, str]:
    import transformers
    from transformers import AutoModelForCausalLM

    from gptforge.model.hf import config_to_hf

    try:
        # The config comes from gptforge's: transformers maps gpt2.context_length to n_ctx, not to the
        # position table's n_positions, and reading the config from the file would parse it twice.
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            config=config_to_hf(cfg),
            dtype=torch.float32,
            attn_implementation="eager",
            local_files_only=True,
        ).eval()
    except Exception as e:
        raise ConversionError(
            f"{path}: transformers cannot read the GGUF ({type(e).__name__}: {e})"
        ) from None
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    return logits, f"transformers GGUF reader ({transformers.__version__})"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def verify_gguf(path: str | os.PathLike, model: GPT, quant: str, *, backend: str = "auto") -> GGUFCheck:
    """Run the file (llama.cpp, else transformers' reader) and compare with gptforge; a mismatch raises
    ConversionError naming the largest difference. `backend`: auto | llama_cpp | transformers."""
    path = Path(path)
    cfg = model.cfg
    ids = check_inputs(cfg)
    ours, our_greedy = _ours(model, ids)
    tol = tolerance(quant, cfg.n_layers)
    note = ""
    if backend == "auto":
        backend = "llama_cpp" if llama_cpp_available() else "transformers"
        if backend == "transformers":
            note = "llama-cpp-python is not installed: checked with transformers' GGUF reader, not llama.cpp"
    if backend == "llama_cpp":
        theirs, their_greedy, name = _llama_cpp_run(path, ids, len(our_greedy), cfg.context_length)
    else:
        theirs, name = _transformers_run(path, ids, cfg)
        their_greedy = None
    if theirs.shape != ours.shape:
        raise ConversionError(f"{path}: logits shape {theirs.shape} != gptforge's {ours.shape}")
    d = np.abs(ours - theirs)
    diff = float(d.max())
    pos, tok = np.unravel_index(int(d.argmax()), d.shape)
    if not np.isfinite(diff) or diff > tol:
        raise ConversionError(
            f"{path.name}: {quant} logits differ from gptforge's by up to {diff:.3g} (position {pos}, token {tok}; "
            f"tolerance {tol:g}) in {name}; the file is not written"
        )
    greedy_equal = None if their_greedy is None else their_greedy == our_greedy
    if greedy_equal is False and quant in GREEDY_EXACT:
        k = next(i for i, (a, b) in enumerate(zip(their_greedy, our_greedy)) if a != b)
        raise ConversionError(
            f"{path.name}: {quant} greedy tokens differ from gptforge's at step {k} ({their_greedy[k]} != "
            f"{our_greedy[k]}) in {name}; the file is not written"
        )
    return GGUFCheck(name, diff, tol, greedy_equal, note)


# -- export ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFResult:
    path: Path
    quant: str
    size: int
    check: GGUFCheck | None
    modelfile: Path | None = None


def export_gguf(
    model: GPT,
    out: str | os.PathLike,
    quant: str = DEFAULT_QUANT,
    *,
    name: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    prompt_style: PromptStyleLike | None = None,
    license: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    ollama: bool = False,
    backend: str = "auto",
) -> GGUFResult:
    """Write `out` as GGUF: refused (nothing written) when llama.cpp cannot run the model as it is, built at
    a temp path, checked (`verify_gguf`), then renamed into place (with a Modelfile for `ollama`)."""
    out = Path(out)
    check_exportable(model, quant)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite or choose another --out")
    if out.is_dir():
        raise ConversionError(f"{out} is a directory; --out names the .gguf file to write")
    mf = out.with_name("Modelfile")
    if ollama and mf.exists() and not overwrite:
        raise ConversionError(f"{mf} already exists; pass --overwrite or choose another --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, out.name)
    tmp = temp_path(out)
    check = None
    try:
        try:
            write_gguf(
                model,
                tmp,
                quant,
                name=name or out.stem,
                metrics=metrics,
                prompt_style=prompt_style,
                license=license,
            )
        except OSError as e:
            raise storage_error(e, out) from None
        if verify:
            check = verify_gguf(tmp, model, quant, backend=backend)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    written = None
    if ollama:
        write_text(mf, modelfile(prompt_style, out.name))
        written = mf
    return GGUFResult(out, quant, out.stat().st_size, check, written)
