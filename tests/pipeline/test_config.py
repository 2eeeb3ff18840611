"""One config system: every verb's --help lists its config's keys, every pipeline stage accepts exactly the
verb's keys (less what the runner fills, plus `models`), --print-config round-trips through --config, and
every config mistake is one exact line with exit 2 (issue 14 item 1, issue 13 item 6)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from gptforge.cli import COMMANDS, main
from gptforge.errors import ConfigError
from gptforge.model.config import GPTConfig
from gptforge.pipeline.cli_args import VERBS, parse_argv
from gptforge.pipeline.config import RUNNER_FILLED, STAGE_CONFIGS
from gptforge.pipeline.stages import load_pipeline, stage_config
from gptforge.schema import known_keys, set_dotted

STAGE_VERB = {
    "pretrain": "pretrain",
    "classify": "finetune classify",
    "instruct": "finetune instruct",
    "dpo": "finetune dpo",
    "evaluate": "evaluate",
    "export": "export",
}


def all_verbs() -> list[str]:
    """Every verb of the CLI that takes a config (`run` takes a pipeline file), finetune's tasks expanded."""
    verbs = []
    for verb in COMMANDS:
        if verb == "run":
            continue
        verbs += [f"finetune {t}" for t in ("classify", "instruct", "dpo")] if verb == "finetune" else [verb]
    return verbs


def help_keys(capsys, verb: str) -> set[str]:
    assert main([*verb.split(), "--help"]) == 0
    out = capsys.readouterr().out
    return set(re.findall(r"^  --([a-z_][\w.]*)  \(", out, flags=re.M))


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one line on stderr."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_every_verb_is_covered_and_help_lists_every_field(capsys):
    assert sorted(all_verbs()) == sorted(VERBS)
    for verb in all_verbs():
        keys = help_keys(capsys, verb)
        assert keys == set(known_keys(VERBS[verb].cls)), verb
        assert len(keys) >= 2
    assert main(["finetune", "classify", "--help"]) == 0
    out = capsys.readouterr().out  # defaults shown are the task's own, not the section class's
    assert "--model.init  (str; default: gpt2)" in out and "--train.lr  (float; default: 5e-05)" in out


def _defaults(cls: type) -> dict:
    """Every leaf key of a config at its default value (an optional section at its own defaults)."""
    from gptforge.pipeline.judge import JudgeConfig

    obj = cls()
    if hasattr(obj, "judge"):
        obj.judge = JudgeConfig()
    return {k: v for k, v in _leaves(dataclasses.asdict(obj)).items()}


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("stage", list(STAGE_VERB))
def test_a_stage_accepts_exactly_its_verbs_keys(tmp_path, capsys, stage):
    verb = STAGE_VERB[stage]
    verb_keys = help_keys(capsys, verb)
    filled = set(RUNNER_FILLED[stage])
    assert filled <= verb_keys
    accepted = (verb_keys - filled) | {"models"} if stage in ("evaluate", "export") else verb_keys - filled
    assert set(known_keys(STAGE_CONFIGS[stage])) - filled == accepted
    defaults = _defaults(VERBS[verb].cls)
    section: dict = {}
    for key in sorted(accepted):  # every accepted key at once, at its default value, loads
        value = defaults.get(key)
        set_dotted(section, key, list(value) if isinstance(value, tuple) else value)
    stages = ["classify", stage] if stage in ("evaluate", "export") else [stage]
    data = {"name": "t", "stages": stages, stage: section}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    pipe = load_pipeline(path, runs_dir=tmp_path / "runs")
    assert isinstance(stage_config(pipe, stage, check_only=True), STAGE_CONFIGS[stage])
    for key in sorted(filled):  # what the runner fills is refused, naming file and stage
        bad = {"name": "t", "stages": stages, stage: {}}
        set_dotted(bad[stage], key, "x")
        path.write_text(yaml.safe_dump(bad), encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}(: {stage})?: "):
            load_pipeline(path)


VERB_ARGV = {
    "pretrain": ["--model.preset", "test-tiny", "--train.lr", "1e-3", "--data.sources", "[a.txt, b.txt]"],
    "finetune classify": ["--model.init", "scratch", "--trainable", "all", "--train.betas", "[0.9, 0.95]"],
    "finetune instruct": ["--lora.r", "4", "--lora.targets", "attn.qkv,mlp.fc", "--data.mask_prompt"],
    "finetune dpo": ["--model.init", "gpt2", "--dpo.beta", "0.2", "--dpo.loss", "ipo", "--data.limit", "8"],
    "evaluate": ["ck", "--batch-size", "4", "--judge.backend", "openai", "--test-data", "a.txt,b.txt"],
    "classify": ["ck", "spam?", "ham.", "--json", "--batch-size", "2"],
    "export": ["ck", "--out", "hf", "--no-verify"],
    "convert": ["--from-hf", "gpt2", "--out", "o", "--overwrite"],
    "generate": [
        "ck",
        "Every effort",
        "moves",
        "--max-new-tokens",
        "20",
        "--stop",
        ".",
        "--stop",
        ",",
        "--no-eos",
    ],
    "merge": ["ad", "--hf-out", "hf", "--peft-base", "gpt2"],
    "info": ["gpt2", "--json"],
    "serve": ["mdl", "--port", "9001", "--max-batch", "4", "--max-queue", "2", "--name", "tiny"],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_print_config_feeds_back_as_config(tmp_path, capsys, verb):
    argv = VERB_ARGV[verb]
    want, _ = parse_argv(verb, argv)
    assert main([*verb.split(), *argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed, encoding="utf-8")
    got, show = parse_argv(verb, ["--config", str(tmp_path / "c.yaml")])
    assert got == want and not show
    assert main([*verb.split(), "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_flags_keep_their_old_spellings():
    cfg, _ = parse_argv("evaluate", ["ck", "--batch-size", "4", "--judge.backend", "openai", "--no-progress"])
    assert (cfg.checkpoint, cfg.batch_size, cfg.judge.backend, cfg.progress) == ("ck", 4, "openai", False)
    cfg, _ = parse_argv("evaluate", ["--responses", "r.json", "--judge", "--splits", "test,validation"])
    assert cfg.judge is not None and cfg.judge.model == "llama3" and cfg.splits == ["test", "validation"]
    cfg, _ = parse_argv("generate", ["ck", "a, b", "--stop", "a,b", "--max-new-tokens", "20", "--no-cache"])
    assert cfg.prompts == ["a, b"] and cfg.stop == ["a,b"] and cfg.max_new_tokens == 20 and not cfg.cache
    cfg, _ = parse_argv("finetune classify", ["--resume", "auto"])
    assert cfg.train.resume == "auto" and cfg.model.init == "gpt2"  # the task's own default survives


PIPE = {
    "name": "mini",
    "stages": ["classify", "evaluate"],
    "classify": {"model": {"init": "scratch", "preset": "test-tiny"}, "train": {"epochs": 2}},
    "evaluate": {"batch_size": 4},
}


def write(tmp_path: Path, data: dict | str, name: str = "mini.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return p


def test_yaml_syntax_errors_and_non_mappings_name_file_and_line(tmp_path, capsys):
    bad = write(tmp_path, "name: x\nstages: [classify, evaluate\nclassify: {}\n")
    err = cli_error(capsys, "run", str(bad))
    assert err == f"gptforge run: error: {bad} line 3: not valid YAML (expected ',' or ']', but got ':')"
    lst = write(tmp_path, "# a list\n- classify\n- evaluate\n", "list.yaml")
    err = cli_error(capsys, "run", str(lst))
    assert (
        err
        == f"gptforge run: error: {lst} line 2: the top level must be a mapping of keys (key: value), not a list"
    )
    err = cli_error(capsys, "evaluate", "ck", "--config", str(bad))
    assert err == f"gptforge evaluate: error: {bad} line 3: not valid YAML (expected ',' or ']', but got ':')"
    err = cli_error(capsys, "finetune", "classify", "--config", str(lst))
    assert err.endswith(f"{lst} line 2: the top level must be a mapping of keys (key: value), not a list")


def test_abbreviated_keys_are_refused_with_the_exact_one(tmp_path, capsys):
    path = write(tmp_path, PIPE)
    err = cli_error(capsys, "run", str(path), "--set", "classify.train.epoch=1", "--print-config")
    assert err == (
        f"gptforge run: error: {path} (--set): classify: unknown config key 'train.epoch'; "
        "did you mean 'train.epochs'?"
    )
    err = cli_error(capsys, "finetune", "classify", "--train.epoch", "1")
    assert err == "gptforge finetune: error: unknown config key 'train.epoch'; did you mean 'train.epochs'?"
    err = cli_error(capsys, "evaluate", "ck", "--batch", "1")
    assert err == "gptforge evaluate: error: unknown config key 'batch'; did you mean 'batch_size'?"
    err = cli_error(capsys, "run", str(path), "--quic")
    assert err == "gptforge run: error: unrecognized arguments: --quic (see `gptforge run --help`)"


def test_quick_without_a_quick_section_says_so(tmp_path, capsys):
    path = write(tmp_path, PIPE)
    err = cli_error(capsys, "run", str(path), "--quick", "--print-config")
    assert err == (
        f"gptforge run: error: {path}: --quick (or GPTFORGE_QUICK=1) needs a `quick:` section of dotted "
        "overrides (e.g. classify.train.epochs: 1); this file has none"
    )
    path = write(tmp_path, {**PIPE, "quick": {"classify.train.epochs": 1, "classify.train.epocs": 1}})
    err = cli_error(capsys, "run", str(path), "--quick", "--print-config")
    assert err == (
        f"gptforge run: error: {path} (quick:): classify: unknown config key 'train.epocs'; "
        "did you mean 'train.epochs'?"
    )


def test_a_run_dir_as_model_init_suggests_its_final(tmp_path, capsys):
    run = tmp_path / "runs" / "pre"
    (run / "final").mkdir(parents=True)
    err = cli_error(capsys, "finetune", "classify", "--model.init", str(run))
    assert err == (
        f"gptforge finetune: error: model.init={run}: a run directory, not a checkpoint; "
        f"use its final checkpoint: {run / 'final'}"
    )
    path = write(tmp_path, PIPE)
    err = cli_error(capsys, "run", str(path), "--set", f"classify.model.init={run}")
    assert err == (
        f"gptforge run: error: {path}: classify: model.init={run}: a run directory, not a checkpoint; "
        f"use its final checkpoint: {run / 'final'}"
    )
    (run / "checkpoints").mkdir()
    (run / "final").rmdir()
    assert "use its final checkpoint" in cli_error(capsys, "evaluate", str(run))


def test_unknown_keys_and_bad_values_name_source_stage_field_and_type(tmp_path, capsys):
    bad = {**PIPE, "evaluate": {"batchsize": 4}}
    path = write(tmp_path, bad)
    err = cli_error(capsys, "run", str(path))
    assert err == (
        f"gptforge run: error: {path}: evaluate: unknown config key 'batchsize'; did you mean 'batch_size'?"
    )
    bad = {**PIPE, "evaluate": {"checkpoint": "x"}}  # the runner fills it
    err = cli_error(capsys, "run", str(write(tmp_path, bad)))
    assert err.startswith(f"gptforge run: error: {path}: evaluate: unknown config key 'checkpoint'")
    bad = {**PIPE, "evaluate": {"judge": {"concurency": 2}}}
    err = cli_error(capsys, "run", str(write(tmp_path, bad)))
    assert err == (
        f"gptforge run: error: {path}: evaluate: unknown config key 'judge.concurency'; "
        "did you mean 'judge.concurrency'?"
    )
    err = cli_error(capsys, "run", str(path), "--set", "classify.train.epochs=many")
    assert err == f"gptforge run: error: {path} (--set): classify: train.epochs='many': expected int"
    bad = {**PIPE, "evaluate": {"splits": {"a": 1}}}
    err = cli_error(capsys, "run", str(write(tmp_path, bad)))
    assert err == f"gptforge run: error: {path}: evaluate: splits={{'a': 1}}: expected a list of str or null"
    err = cli_error(capsys, "evaluate", "ck", "--judge.timeout", "soon")
    assert err == "gptforge evaluate: error: judge.timeout='soon': expected float"
    cfg = write(tmp_path, {"judge": {"backend": "openai", "retries": "x"}}, "e.yaml")
    err = cli_error(capsys, "evaluate", "ck", "--config", str(cfg))
    assert err == f"gptforge evaluate: error: {cfg}: judge.retries='x': expected int"
    err = cli_error(capsys, "generate", "ck", "hi", "--top-k", "1.5")
    assert err == "gptforge generate: error: top_k='1.5': expected int or null"
    err = cli_error(capsys, "info", "gpt2", "--json", "maybe", "--jsn")
    assert err == "gptforge info: error: unknown config key 'jsn'; did you mean 'json'?"


def test_model_lora_and_judge_configs_share_the_validator():
    from gptforge.model.lora import LoRAConfig
    from gptforge.pipeline.judge import JudgeConfig

    assert GPTConfig.from_dict({"emb_dim": 32, "n_heads": 2, "id2label": {"0": "ham"}}).id2label == {0: "ham"}
    with pytest.raises(
        ConfigError, match=r"^ck/config.json: unknown config key 'n_layer'; did you mean 'n_layers'\?$"
    ):
        GPTConfig.from_dict({"n_layer": 2}, where="ck/config.json: ")
    with pytest.raises(ConfigError, match=r"^unknown config key 'lora.rank'; did you mean 'lora.r'\?$"):
        LoRAConfig.from_dict({"rank": 4})
    with pytest.raises(ConfigError, match=r"^judge.concurrency='two': expected int$"):
        JudgeConfig.from_dict({"concurrency": "two"})
    with pytest.raises(ConfigError, match=r"judge.concurrency=0 must be at least 1"):
        JudgeConfig.from_dict({"concurrency": 0})


def test_run_print_config_sections_feed_back_as_a_pipeline(tmp_path, capsys):
    path = write(
        tmp_path, {**PIPE, "stages": ["classify", "evaluate", "export"], "export": {"verify": False}}
    )
    assert main(["run", str(path), "--print-config", "--set", "evaluate.judge.model=m"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "out_dir" not in printed["classify"]["train"] and "checkpoint" not in printed["evaluate"]
    assert printed["evaluate"]["judge"]["model"] == "m" and printed["export"]["verify"] is False
    again = write(
        tmp_path, {"name": "mini", "stages": ["classify", "evaluate", "export"], **printed}, "again.yaml"
    )
    assert main(["run", str(again), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
