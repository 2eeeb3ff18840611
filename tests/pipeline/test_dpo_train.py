"""DPO training end to end: rewards rise on the reference preference pairs, LoRA's reference is the base,
resume after SIGKILL is bit-exact, and bad input is one line with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.cli import main
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.pipeline.checkpoints import FINAL, list_checkpoints
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_dpo


@pytest.fixture
def env(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path


def overrides(out: Path, **kw) -> dict:
    return {
        "model.init": "scratch",
        "model.preset": "test-tiny",
        "model.context_length": 96,
        "data.limit": 32,
        "train.batch_size": 8,
        "train.epochs": 4,
        "train.lr": 3e-3,
        "train.eval_every": 4,
        "train.eval_batches": None,
        "train.seed": 7,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(out),
        **kw,
    }


def test_rewards_rise_on_the_reference_pairs(env):
    res = run_dpo(load_config("dpo", **overrides(env / "run")))
    steps = [r for r in read_metrics(env / "run" / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    first, last = steps[0], steps[-1]
    # step 1: the policy is the reference, so every reward is 0 (up to fp noise of two equal forwards)
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["loss"] - 0.693147) < 1e-4
    assert res.metrics["train_rewards/accuracy"] > 0.9
    assert res.metrics["train_rewards/margins"] > 0.5 > first["rewards/margins"]
    assert last["rewards/margins"] > steps[3]["rewards/margins"] > first["rewards/margins"]
    evals = [
        r
        for r in read_metrics(env / "run" / "metrics.jsonl")
        if "val_rewards/accuracy" in r and not r.get("final")
    ]
    assert len(evals) == 4 and all("val_rewards/margins" in r for r in evals)
    assert json.loads((env / "run" / FINAL / "prompt_style.json").read_text())["name"] == "alpaca"


def test_lora_reference_is_the_base_with_adapters_off(env, tmp_path):
    torch.manual_seed(3)
    base = GPT(GPTConfig.from_preset("test-tiny", context_length=96))
    save_checkpoint(base, tmp_path / "base")
    ov = overrides(env / "lora", **{"model.init": str(tmp_path / "base"), "lora.r": 4, "train.epochs": 1})
    del ov["model.preset"], ov["model.context_length"]
    run_dpo(load_config("dpo", **ov))
    steps = [r for r in read_metrics(env / "lora" / "metrics.jsonl") if "lr" in r]
    # lora_B starts at 0: the first step's policy is exactly the reference
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert steps[-1]["rewards/margins"] != 0.0


def _argv(ov: dict) -> list[str]:
    out = []
    for k, v in ov.items():
        out += [f"--{k}", "null" if v is None else str(v)]
    return out


def test_sigkill_then_resume_equals_uninterrupted_run(env):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ov = overrides(env / "ref", **{"train.save_every": 3, "train.keep_last": 5})
        ref = run_dpo(load_config("dpo", **ov))
        out = env / "run"
        ov = {**ov, "train.out_dir": str(out)}
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen(
            [sys.executable, "-m", "gptforge.cli", "finetune", "dpo", *_argv(ov)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        target = out / "checkpoints" / "step-00000006"
        import time

        deadline = time.monotonic() + 240
        while not target.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.kill()
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
        k = int(list_checkpoints(out)[-1].name.split("-")[1])
        assert 6 <= k < 16 and not (out / FINAL).exists()
        res = run_dpo(load_config("dpo", **{**ov, "train.resume": "auto"}))
    finally:
        torch.set_num_threads(threads)
    got = [r for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    want = [r for r in read_metrics(env / "ref" / "metrics.jsonl") if "lr" in r]
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in want
    ]
    a, b = load_file(env / "ref" / FINAL / "model.safetensors"), load_file(out / FINAL / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert res.metrics["val_rewards/accuracy"] == ref.metrics["val_rewards/accuracy"]


# -- bad input: one line, exit 2 -----------------------------------------------------------------------


def cli_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip() and "%|" not in x and "dropped" not in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _file(tmp_path: Path, records: list[dict]) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return p


GOOD = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No."}


def _cli(tmp_path, data: Path, *extra: str) -> list[str]:
    base = ["finetune", "dpo", "--model.init", "scratch", "--model.preset", "test-tiny"]
    return [*base, "--data.dataset", str(data), "--train.out_dir", str(tmp_path / "o"), *extra]


def test_missing_rejected_names_the_line_and_the_flag(env, capsys, tmp_path):
    bad = {k: v for k, v in GOOD.items() if k != "rejected"}
    err = cli_error(capsys, *_cli(tmp_path, _file(tmp_path, [GOOD] * 5 + [bad])))
    assert "pairs.jsonl: line 6 has no field 'rejected'" in err and "data.rejected_column" in err


def test_missing_chosen_with_a_renamed_column(env, capsys, tmp_path):
    recs = [{**{k: v for k, v in GOOD.items() if k != "chosen"}, "good": "Hi!"}] * 3
    err = cli_error(capsys, *_cli(tmp_path, _file(tmp_path, recs), "--data.chosen_column", "better"))
    assert "line 1 has no field 'better'" in err and "data.chosen_column" in err


def test_identical_chosen_and_rejected(env, capsys, tmp_path):
    same = {**GOOD, "rejected": GOOD["chosen"]}
    err = cli_error(capsys, *_cli(tmp_path, _file(tmp_path, [GOOD, GOOD, same])))
    assert "line 3: 'chosen' and 'rejected' are identical" in err and "data.drop_identical" in err


def test_prompt_leaving_no_room_for_the_response(env, capsys, tmp_path):
    long = {**GOOD, "instruction": "word " * 80}
    err = cli_error(capsys, *_cli(tmp_path, _file(tmp_path, [GOOD] * 4 + [long]), "--data.max_length", "40"))
    assert "line 5: its prompt is" in err and "leaves no room for a response in max_length=40" in err


def test_classifier_as_init(env, capsys, tmp_path):
    clf = GPT(GPTConfig.from_preset("test-tiny"))
    clf.add_classification_head(2, {0: "ham", 1: "spam"})
    save_checkpoint(clf, tmp_path / "clf")
    err = cli_error(
        capsys,
        "finetune",
        "dpo",
        "--model.init",
        str(tmp_path / "clf"),
        "--train.out_dir",
        str(tmp_path / "o"),
    )
    assert "is a classifier; DPO needs a language model" in err


PIPE = """
name: p
stages: [pretrain, instruct, dpo, evaluate, export]
pretrain:
  model: {init: scratch, preset: test-tiny, context_length: 96}
  data: {sources: [instruction:train], context_length: 96}
  train: {max_steps: 2, batch_size: 8, progress: false, plot: false}
instruct:
  model: {init: pretrain}
  data: {limit: 16, mask_prompt: true}
  train: {max_steps: 2, progress: false, plot: false}
dpo:
  model: {init: instruct}
  data: {limit: 16}
  train: {max_steps: 2, progress: false, plot: false}
evaluate: {max_new_tokens: 2, progress: false, data: {limit: 8}}
export: {}
"""


def test_pipeline_dpo_stage_after_instruct_is_evaluated_and_exported(env, tmp_path):
    from gptforge.pipeline.runner import run_pipeline
    from gptforge.pipeline.stages import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(PIPE, encoding="utf-8")
    run_pipeline(load_pipeline(path, runs_dir=tmp_path / "runs"))
    root = tmp_path / "runs" / "p"
    run = json.loads((root / "dpo" / FINAL / "run.json").read_text())
    assert run["task"] == "dpo" and run["config"]["model"]["init"] == str(root / "instruct" / FINAL)
    m = json.loads((root / "evaluate" / "dpo" / "metrics.json").read_text())
    assert m["task"] == "dpo" and m["source"]["reference"] == str(root / "instruct" / FINAL)
    assert m["splits"]["test"]["n"] == 8 and 0.0 <= m["splits"]["test"]["rewards/accuracy"] <= 1.0
    assert (root / "export" / "dpo" / "model.safetensors").is_file()
    assert json.loads((root / "export" / "dpo" / "prompt_style.json").read_text())["name"] == "alpaca"


def test_evaluate_an_instruction_model_as_dpo_has_zero_rewards(env, tmp_path):
    """`--task dpo` on a model that is not a DPO run: it is its own reference (the 'before' numbers)."""
    from gptforge.pipeline.config import EvaluateConfig, EvaluateDataConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint

    torch.manual_seed(1)
    save_checkpoint(GPT(GPTConfig.from_preset("test-tiny", context_length=96)), tmp_path / "m")
    cfg = EvaluateConfig(
        checkpoint=str(tmp_path / "m"),
        task="dpo",
        out=str(tmp_path / "e"),
        progress=False,
        data=EvaluateDataConfig(limit=8),
    )
    m = evaluate_checkpoint(cfg)
    test = m["splits"]["test"]
    assert (
        test["rewards/accuracy"] == 0.0 and test["rewards/margins"] == 0.0 and 0 <= test["logp_accuracy"] <= 1
    )


def test_torchrun_two_processes_equal_one_process(env):
    """2 processes x batch 4 equal 1 x batch 8: the pair mean is normalised over the global batch, and
    the rewards are reduced over both processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common = {"data.limit": 24, "train.epochs": 1, "train.lr": 1e-3, "train.eval_every": 0}
    try:
        run_dpo(load_config("dpo", **overrides(env / "one", **common)))
    finally:
        torch.set_num_threads(threads)
    ov = overrides(env / "two", **common, **{"train.batch_size": 4})
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "gptforge.cli", "finetune", "dpo", *_argv(ov)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((env / "two" / "run.json").read_text())
    assert run["num_processes"] == 2
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")
    one = [r for r in read_metrics(env / "one" / "metrics.jsonl") if "lr" in r]
    two = [r for r in read_metrics(env / "two" / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for k in keys:
            if k == "rewards/accuracy" and a["step"] == 1:
                continue  # policy == reference: every reward is 0 up to rounding, so "chosen > rejected" is noise
            assert b[k] == pytest.approx(a[k], abs=1e-5), (a["step"], k)
    f1 = [r for r in read_metrics(env / "one" / "metrics.jsonl") if r.get("final")][0]
    f2 = [r for r in read_metrics(env / "two" / "metrics.jsonl") if r.get("final")][0]
    for k in ("val_loss", "val_rewards/accuracy", "val_rewards/margins", "test_rewards/accuracy"):
        assert f2[k] == pytest.approx(f1[k], abs=1e-5), k
    w1 = load_file(env / "one" / FINAL / "model.safetensors")
    w2 = load_file(env / "two" / FINAL / "model.safetensors")
    for name in w1:
        if name.endswith("attn.qkv.bias"):  # key bias: zero true gradient, AdamW-amplified float noise
            d = w1[name].numel() // 3
            w1[name], w2[name] = w1[name][:d], w2[name][:d]
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)


def test_judge_win_rate_against_the_starting_model(env, tmp_path):
    """With a judge, both models answer the held-out prompts and every answer is scored; the win rate
    counts the prompts where the DPO model's answer scored higher, and judgments.jsonl keeps every reply."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from gptforge.pipeline.config import EvaluateConfig, EvaluateDataConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint
    from gptforge.pipeline.judge import JudgeConfig

    def score(response: str) -> int:  # what the fake judge thinks of an answer
        return (len(response) * 7) % 101

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            answer = prompt.split("ANSWER<<", 1)[1].rsplit(">>", 1)[0]
            data = json.dumps({"choices": [{"message": {"content": f"Score: {score(answer)}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        torch.manual_seed(3)
        save_checkpoint(GPT(GPTConfig.from_preset("test-tiny", context_length=96)), tmp_path / "init")
        run = run_dpo(
            load_config(
                "dpo",
                **{
                    **overrides(env / "run", **{"model.init": str(tmp_path / "init")}),
                    "model.context_length": None,
                    "train.epochs": 1,
                    "train.lr": 3e-2,
                },
            )
        )
        judge = JudgeConfig(
            backend="openai",
            url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            template="Rate it. ANSWER<<{model_response}>>",
            retries=0,
        )
        cfg = EvaluateConfig(
            checkpoint=str(run.checkpoint),
            out=str(tmp_path / "e"),
            progress=False,
            max_new_tokens=6,
            judge=judge,
            data=EvaluateDataConfig(limit=8),
        )
        m = evaluate_checkpoint(cfg)
    finally:
        server.shutdown()
        server.server_close()
    j = m["judge"]
    rows = [json.loads(line) for line in (tmp_path / "e" / "judgments.jsonl").read_text().splitlines()]
    assert j["split"] == "test" and j["n_pairs"] == len(rows) == 8 and j["n_compared"] == 8
    wins = sum(score(r["dpo_response"]) > score(r["reference_response"]) for r in rows)
    losses = sum(score(r["dpo_response"]) < score(r["reference_response"]) for r in rows)
    assert (j["wins"], j["losses"], j["ties"]) == (wins, losses, 8 - wins - losses)
    assert j["win_rate"] == pytest.approx(wins / 8)
    assert any(r["dpo_response"] != r["reference_response"] for r in rows)  # two different models answered
    assert all(r["dpo_judgment"]["score"] == score(r["dpo_response"]) for r in rows)
    assert all(r["output"] == r["chosen"] for r in rows)  # the judge's reference answer is the chosen one
    assert "win rate" in (tmp_path / "e" / "report.md").read_text()
    from gptforge.pipeline.summary import summarize_evaluation

    assert summarize_evaluation(m)["judge_win_rate"] == j["win_rate"]  # the pipeline summary shows it


def test_loss_plot_has_a_reward_panel_for_dpo(tmp_path):
    import matplotlib.image

    from gptforge.pipeline.evaluate.report import plot_losses

    records = [
        {"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.01 * s, "rewards/accuracy": 0.5 + 0.05 * s}
        for s in range(1, 6)
    ] + [{"step": 5, "val_loss": 0.66, "val_rewards/margins": 0.04, "val_rewards/accuracy": 0.6}]
    plot_losses(records, tmp_path / "dpo.png")
    plot_losses([{k: v for k, v in r.items() if "rewards" not in k} for r in records], tmp_path / "lm.png")
    assert matplotlib.image.imread(tmp_path / "dpo.png").shape[:2] == (700, 600)  # two panels
    assert matplotlib.image.imread(tmp_path / "lm.png").shape[:2] == (400, 600)  # loss only, as before
