"""Converters between gptforge's GPT and transformers' GPT-2.

Conversions are pure functions (state dict in, state dict out) driven by one explicit key table,
`KEY_TABLE`. Anything that cannot be represented exactly (a config switch our model lacks, a tensor
the table does not know, a tensor that is missing) raises ConversionError naming it: we never
approximate. Writing and verifying a Hugging Face dir is `gptforge.export.hf.export`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import ConfigError, ConversionError
from gptforge.io import record_read
from gptforge.model.config import GPTConfig, default_id2label
from gptforge.model.gpt import GPT

# gptforge name -> HF name (relative to GPT2Model for the body; heads are top level), and whether the
# tensor is a Conv1D weight stored (in, out) by HF and so must be transposed. "{}" is the layer index.
KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("tok_emb.weight", "wte.weight", False),
    ("pos_emb.weight", "wpe.weight", False),
    ("blocks.{}.ln_1.weight", "h.{}.ln_1.weight", False),
    ("blocks.{}.ln_1.bias", "h.{}.ln_1.bias", False),
    ("blocks.{}.attn.qkv.weight", "h.{}.attn.c_attn.weight", True),
    ("blocks.{}.attn.qkv.bias", "h.{}.attn.c_attn.bias", False),
    ("blocks.{}.attn.proj.weight", "h.{}.attn.c_proj.weight", True),
    ("blocks.{}.attn.proj.bias", "h.{}.attn.c_proj.bias", False),
    ("blocks.{}.ln_2.weight", "h.{}.ln_2.weight", False),
    ("blocks.{}.ln_2.bias", "h.{}.ln_2.bias", False),
    ("blocks.{}.mlp.fc.weight", "h.{}.mlp.c_fc.weight", True),
    ("blocks.{}.mlp.fc.bias", "h.{}.mlp.c_fc.bias", False),
    ("blocks.{}.mlp.proj.weight", "h.{}.mlp.c_proj.weight", True),
    ("blocks.{}.mlp.proj.bias", "h.{}.mlp.c_proj.bias", False),
    ("ln_f.weight", "ln_f.weight", False),
    ("ln_f.bias", "ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),
    ("score.weight", "score.weight", False),
)
_FROM_HF = {hf: (ours, t) for ours, hf, t in KEY_TABLE}
_TO_HF = {ours: (hf, t) for ours, hf, t in KEY_TABLE}
HEAD_KEYS = ("lm_head.weight", "score.weight")  # top-level in HF; everything else lives under `transformer.`
HF_PREFIX = "transformer."
# Causal-mask buffers that older HF files carry; they are not weights.
_IGNORED_HF = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"\.(\d+)\.")

# HF activation -> GPTConfig.activation. gelu_pytorch_tanh is the very function our "gelu_new" computes.
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
QKV_BIAS_FLAG = "gptforge_qkv_bias"  # extra HF config key: the zero c_attn bias came from qkv_bias=False


def _lookup(
    key: str, table: Mapping[str, tuple[str, bool]], what: str, shown: str | None = None
) -> tuple[str, bool]:
    """Map one name through the key table; an unknown name is an error that names it."""
    m = _LAYER.search(key)
    template = _LAYER.sub(".{}.", key, count=1) if m else key
    if template not in table:
        raise ConversionError(
            f"unexpected tensor {shown or key!r} in the {what} state dict: gptforge's GPT-2 has no such "
            "weight (is this a GPT-2 checkpoint?)"
        )
    target, transpose = table[template]
    return (target.format(m.group(1)) if m else target), transpose


# -- configs ----------------------------------------------------------------------------------------
def _hf_config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConversionError(
        f"expected a transformers GPT2Config or a config dict, got {type(hf_config).__name__}"
    )


def config_from_hf(hf_config: Any, *, classifier: bool | None = None) -> GPTConfig:
    """GPTConfig for a transformers GPT-2 config (object or config.json dict); refuse what we cannot match.

    `classifier` None means: a classifier when `architectures` names GPT2ForSequenceClassification.
    """
    d = _hf_config_dict(hf_config)
    from transformers import GPT2Config

    defaults = GPT2Config().to_dict()

    def get(name: str) -> Any:
        return d.get(name, defaults.get(name))

    if d.get("model_type") != "gpt2":
        raise ConversionError(
            f"config model_type={d.get('model_type')!r}: only GPT-2 checkpoints (model_type 'gpt2') convert"
        )
    refused = {
        "scale_attn_by_inverse_layer_idx": True,
        "reorder_and_upcast_attn": True,
        "add_cross_attention": True,
        "scale_attn_weights": False,
    }
    for name, bad in refused.items():
        if bool(get(name)) == bad:
            raise ConversionError(
                f"config {name}={get(name)}: gptforge's GPT-2 cannot represent this exactly; "
                f"only {name}={not bad} converts"
            )
    act = get("activation_function")
    if act not in _ACTIVATIONS:
        raise ConversionError(
            f"config activation_function={act!r} is not supported exactly; use one of {sorted(_ACTIVATIONS)}"
        )
    if classifier is None:
        classifier = any(str(a).endswith("ForSequenceClassification") for a in get("architectures") or [])
    eos = get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    eos = 50256 if eos is None else int(eos)
    pad = get("pad_token_id")
    pad = eos if pad is None else int(pad)
    num_labels, id2label = 0, None
    if classifier:
        id2label = {int(k): str(v) for k, v in (get("id2label") or {}).items()}
        num_labels = int(d.get("num_labels", len(id2label) or 2))
        if num_labels < 2:
            raise ConversionError(
                f"config num_labels={num_labels}: regression heads are not supported; use 2 or more classes"
            )
        if sorted(id2label) != list(range(num_labels)):
            id2label = default_id2label(num_labels)
    try:
        return GPTConfig(
            vocab_size=int(get("vocab_size")),
            context_length=int(get("n_positions")),
            emb_dim=int(get("n_embd")),
            n_layers=int(get("n_layer")),
            n_heads=int(get("n_head")),
            mlp_dim=None if get("n_inner") is None else int(get("n_inner")),
            dropout=float(get("resid_pdrop") or 0.0),
            qkv_bias=bool(d.get(QKV_BIAS_FLAG, True)),
            # A classifier has no LM head in HF; ours stays tied to the embedding and unused.
            tie_embeddings=True if classifier else bool(get("tie_word_embeddings")),
            layer_norm_eps=float(get("layer_norm_epsilon")),
            activation=_ACTIVATIONS[act],
            num_labels=num_labels,
            pad_token_id=pad,
            eos_token_id=eos,
            id2label=id2label,
        )
    except ConfigError as e:
        raise ConversionError(f"config cannot convert: {e}") from None


def config_to_hf(cfg: GPTConfig):
    """transformers.GPT2Config with the same numerics (dropouts carried; bos = eos as in GPT-2)."""
    from transformers import GPT2Config

    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.mlp_dim,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        scale_attn_weights=True,
        tie_word_embeddings=cfg.tie_embeddings or bool(cfg.num_labels),
        bos_token_id=cfg.eos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if not cfg.qkv_bias:
        kwargs[QKV_BIAS_FLAG] = False
    if cfg.num_labels:
        id2label = cfg.labels()
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
        kwargs["architectures"] = ["GPT2ForSequenceClassification"]
    else:
        kwargs["architectures"] = ["GPT2LMHeadModel"]
    return GPT2Config(**kwargs)


# -- state dicts ------------------------------------------------------------------------------------
def _expected_shapes(cfg: GPTConfig) -> dict[str, torch.Size]:
    """Our tensor names and shapes for `cfg` (a tied LM head is not a separate tensor)."""
    with torch.device("meta"):
        model = GPT(cfg)
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.shape for k, v in sd.items()}


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (GPT2Model, GPT2LMHeadModel or GPT2ForSequenceClassification) -> gptforge tensors.

    Each source tensor is fetched once, in turn: with a lazy mapping (`read_hf_dir(..., lazy=True)`) a
    transposed tensor's original is freed before the next one is read, so memory peaks near one model.
    """
    keys: dict[str, str] = {}  # body-relative name -> key in hf_sd
    for key in hf_sd:
        name = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
        if _IGNORED_HF.fullmatch(name):
            continue
        if name in keys:
            raise ConversionError(
                f"tensor {name!r} appears twice (with and without the {HF_PREFIX!r} prefix)"
            )
        keys[name] = key
    out: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        ours, transpose = _lookup(name, _FROM_HF, "Hugging Face", shown=_hf_name(name))
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            tensor = hf_sd[key]
            wte = out.get("tok_emb.weight")
            if wte is None and "wte.weight" in keys:
                wte = hf_sd[keys["wte.weight"]]
            if wte is not None and (wte.shape != tensor.shape or not torch.equal(wte, tensor)):
                raise ConversionError(
                    "lm_head.weight differs from transformer.wte.weight but the config ties them "
                    "(tie_word_embeddings=True); set tie_word_embeddings=false in config.json to keep both"
                )
            continue
        tensor = hf_sd[key]
        if ours.endswith("attn.qkv.bias") and not cfg.qkv_bias:
            if torch.count_nonzero(tensor):
                raise ConversionError(
                    f"{name} is not zero but the config says qkv_bias=False; drop `{QKV_BIAS_FLAG}` from config.json"
                )
            continue
        out[ours] = tensor.t().contiguous() if transpose else tensor
        del tensor
    _check_complete(out, cfg, to_name=lambda k: _hf_name(_lookup(k, _TO_HF, "gptforge")[0]))
    return out


def _hf_name(name: str) -> str:
    """The full name transformers' GPT2LMHeadModel uses for a body-relative or head name."""
    return name if name in HEAD_KEYS or name.startswith(HF_PREFIX) else HF_PREFIX + name


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptforge tensors -> the tensors a transformers GPT2LMHeadModel / GPT2ForSequenceClassification saves.

    A tied LM head is left out (as transformers saves it); qkv_bias=False becomes an exact zero c_attn bias.
    """
    sd = dict(sd)
    if cfg.tie_embeddings or cfg.num_labels:
        head = sd.pop("lm_head.weight", None)
        if head is not None and cfg.num_labels and not cfg.tie_embeddings:
            warnings.warn(
                "lm_head.weight is not exported: a Hugging Face sequence classifier has no LM head "
                "(the classifier's outputs do not use it)",
                stacklevel=2,
            )
    _check_complete(sd, cfg, to_name=lambda k: k)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        name, transpose = _lookup(key, _TO_HF, "gptforge")
        full = name if name in HEAD_KEYS else HF_PREFIX + name
        out[full] = tensor.t().contiguous() if transpose else tensor
        if key.endswith("attn.qkv.weight") and not cfg.qkv_bias:
            bias_name = full.replace("c_attn.weight", "c_attn.bias")
            out[bias_name] = torch.zeros(tensor.shape[0], dtype=tensor.dtype, device=tensor.device)
    return out


def _check_complete(sd: Mapping[str, torch.Tensor], cfg: GPTConfig, to_name) -> None:
    """Every expected tensor is there with the right shape, and nothing else (names in the source's terms)."""
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    if missing:
        names = [to_name(k) for k in missing]
        raise ConversionError(
            f"missing tensor(s) {names[:5]}{' ...' if len(names) > 5 else ''} for a GPT-2 with "
            f"n_layer={cfg.n_layers}, num_labels={cfg.num_labels}, tie_embeddings={cfg.tie_embeddings}"
        )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) {unexpected[:5]} for this config")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ConversionError(
                f"tensor {to_name(k)!r} has shape {tuple(sd[k].shape)}, expected {tuple(shape)} from the config"
            )


# -- loading ----------------------------------------------------------------------------------------
_SAFE, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_HF_FIX = "re-download or re-export it"


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    from gptforge.model.checkpoint import check_readable

    check_readable(path, _HF_FIX)  # permission denied is one line naming the file, not a pickle error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects: that is the point
        raise ConversionError(f"{path}: cannot read as plain tensors with weights_only=True ({e})") from None


class _LazySafetensors(Mapping):
    """The tensors of safetensors files, each read from disk when asked for and not kept.

    Reads go through `pread` where safetensors offers it, so no file page stays mapped: converting
    one tensor at a time then needs about one model of memory, not the file plus the model.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for f in files:
            with self._open(f) as h:
                for k in h.keys():
                    self._where[k] = f

    @staticmethod
    def _open(f: Path):
        from gptforge.model.checkpoint import open_safetensors

        return open_safetensors(f, fix=_HF_FIX)

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._open(self._where[key]) as h:
            return h.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_dir(path: str | os.PathLike, *, lazy: bool = False) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """config.json and the tensors of a local HF GPT-2 directory (single or sharded; safetensors or .bin).

    lazy=True returns safetensors weights as a mapping that reads each tensor when it is looked up.
    """
    from gptforge.model.checkpoint import load_safetensors, read_json

    def load_file(f: str) -> dict[str, torch.Tensor]:
        return load_safetensors(f, fix=_HF_FIX)

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConversionError(f"{p}: no config.json; point at a Hugging Face model directory")
    record_read(p, "Hugging Face model dir")
    config = read_json(p / "config.json", _HF_FIX)
    if (p / _SAFE).is_file():
        return config, (_LazySafetensors([p / _SAFE]) if lazy else load_file(str(p / _SAFE)))
    for index, loader in ((_SAFE_INDEX, lambda f: load_file(str(f))), (_BIN_INDEX, _load_bin)):
        if (p / index).is_file():
            weight_map = read_json(p / index, _HF_FIX).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (p / shard).is_file():
                    raise ConversionError(f"{p / index} lists shard {shard!r}, which is missing")
            sd: Mapping[str, torch.Tensor]
            if lazy and index == _SAFE_INDEX:
                sd = _LazySafetensors([p / shard for shard in shards])
            else:
                sd = {}
                for shard in shards:
                    sd.update(loader(p / shard))
            if missing := sorted(set(weight_map) - set(sd)):
                raise ConversionError(f"{p / index}: tensors {missing[:5]} are not in their shards")
            return config, sd
    if (p / _BIN).is_file():
        return config, _load_bin(p / _BIN)
    raise ConversionError(f"{p}: no weights found; expected {_SAFE}, {_SAFE_INDEX} or {_BIN}")


def _download(repo_id: str) -> Path:
    """A hub snapshot with just the config and one weights format (network or the HF cache)."""
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(repo_id, allow_patterns=["config.json", "model*.safetensors*"]))
        if not any(d.glob("model*.safetensors")):
            d = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin*"]))
    except Exception as e:
        raise ConversionError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}); check the path, or the network / HF_HUB_OFFLINE"
        ) from None
    return d


def from_hf(source: Any, device: str | torch.device = "cpu") -> GPT:
    """A gptforge GPT (fp32, eval mode) from a hub id, a local HF directory or a transformers model."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.is_dir():
            config, hf_sd = read_hf_dir(p, lazy=True)
        elif p.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
            raise ConversionError(
                f"{source}: no such model directory; pass a Hugging Face model folder or hub id"
            )
        else:
            config, hf_sd = read_hf_dir(_download(str(source)), lazy=True)
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        config, hf_sd = source.config, source.state_dict()
    else:
        raise ConversionError(f"cannot convert a {type(source).__name__}; pass a hub id, directory or model")
    cfg = config_from_hf(config, classifier=any(k == "score.weight" for k in hf_sd))
    if not any(k.startswith(HF_PREFIX) or k in HEAD_KEYS for k in hf_sd):
        # A bare GPT2Model (no head at all): give it GPT-2's usual head, tied to the embedding.
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    shared = set()  # storages of a caller's transformers model, which ours must not share
    if not isinstance(source, (str, os.PathLike)):
        shared = {t.untyped_storage().data_ptr() for t in hf_sd.values()}
    sd = state_dict_from_hf(hf_sd, cfg)
    del hf_sd
    for k, v in sd.items():
        if v.dtype != torch.float32:
            sd[k] = v.float()
        elif v.untyped_storage().data_ptr() in shared:
            sd[k] = v.clone()
    with torch.device("meta"):
        model = GPT(cfg)
    # The converted tensors become the parameters (assign=True), so the model is never held twice.
    model.load_state_dict(sd, strict=False, assign=True)  # completeness was checked by state_dict_from_hf
    del sd
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device).eval()


def to_hf(model: GPT, *, copy: bool = True):
    """A transformers GPT2LMHeadModel (or GPT2ForSequenceClassification) holding a copy of the weights.

    copy=False shares every tensor that needs no transpose with `model` (what `export` does: the HF
    model only lives to be saved, and the shared tensors are never held twice).
    """
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = model.cfg
    hf_cfg = config_to_hf(cfg)
    cls = GPT2ForSequenceClassification if cfg.num_labels else GPT2LMHeadModel
    ours = model.state_dict()
    sd = {k: v.detach() for k, v in state_dict_to_hf(ours, cfg).items()}
    if copy:  # transposed tensors are fresh already; clone those still sharing storage with `model`
        storages = {t.untyped_storage().data_ptr() for t in ours.values()}
        sd = {k: v.clone() if v.untyped_storage().data_ptr() in storages else v for k, v in sd.items()}
    if not cfg.num_labels and cfg.tie_embeddings:
        sd["lm_head.weight"] = sd[HF_PREFIX + "wte.weight"]
    with torch.device("meta"):
        hf = cls(hf_cfg)
    hf.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    if not cfg.num_labels:
        from transformers import GenerationConfig

        hf.generation_config = GenerationConfig(
            bos_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        )
    return hf.eval()
