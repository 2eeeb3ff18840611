"""The GPU-ready step loop, checked on CPU: no host reads between log steps, log_every windows averaged
(and resumed exactly), divergence still reported at its step, `auto` precision and compile resolved from
the device's capability (mocked), and the CUDA data path (pinned memory, non-blocking copies; mocked)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from gptforge.errors import ConfigError, TrainingError
from gptforge.pipeline.checkpoints import FINAL, list_checkpoints
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.trainer import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import VOCAB, NanAtStep5, fit, lm_rows, make_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Every way Python code reads a tensor's value on the host; on CUDA each one waits for the GPU.
HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__format__")
# Reads the model makes on CPU only, each behind a `device.type` test that CUDA tensors never pass:
# lm_loss's padding compaction and the fused loss's backward shortcut for a unit gradient.
CPU_ONLY_READS = {("gpt.py", "lm_loss"), ("perf.py", "backward")}


def step_records(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "lr" in r]


class CountingTrainer(Trainer):
    """Records every host read of a tensor made by gptforge or Accelerate code, with the step it happened in.

    `in_step`: inside `_train_step` (never allowed); otherwise the step just finished. torch's own code is
    not counted: its CPU-only reads (the optimizer's step counter lives on the host) are not GPU syncs."""

    def _train_step(self, window, state):
        self._in_step = True
        try:
            return super()._train_step(window, state)
        finally:
            self._in_step = False


@pytest.fixture
def count_reads(monkeypatch):
    reads: list[tuple[bool, int, str]] = []
    current: list[Trainer] = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            code = sys._getframe(1).f_code
            caller = code.co_filename
            ours = f"{os.sep}gptforge{os.sep}" in caller or f"{os.sep}accelerate{os.sep}" in caller
            ours = ours and (os.path.basename(caller), code.co_name) not in CPU_ONLY_READS
            trainer = current[0] if current else None
            if ours and trainer is not None and hasattr(trainer, "state"):
                where = f"{name} from {os.path.basename(caller)}:{sys._getframe(1).f_lineno}"
                reads.append((getattr(trainer, "_in_step", False), trainer.state.step, where))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in HOST_READS:
        watch(name)
    return reads, current


def test_no_host_reads_between_log_steps(tmp_path, count_reads):
    reads, current = count_reads
    cfg = make_cfg(tmp_path / "r", log_every=4, eval_every=0, save_every=0)  # 5 steps an epoch, 2 epochs

    class Watched(CountingTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            current.append(self)

    res = fit(cfg, trainer_cls=Watched)
    assert res.metrics["status"] == "completed"
    in_step = [r for r in reads if r[0]]
    assert in_step == []  # a training step never waits for the device
    # outside steps: only at log steps (4, 8, 10: the last), epoch ends (5, 10: eval + save) and setup
    steps = sorted({s for _, s, _ in reads})
    assert set(steps) <= {0, 4, 5, 8, 10}, [r for r in reads if r[1] not in (0, 4, 5, 8, 10)]
    assert 4 in steps and 8 in steps  # the log steps do read (the counter works)
    assert [r["step"] for r in step_records(tmp_path / "r")] == [4, 8, 10]
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["mixed_precision"] == "no" and run["compile"] is False  # `auto` on a CPU


def test_no_host_reads_in_classification_steps(tmp_path, count_reads):
    """Padded batches with an attention mask, targets counted as examples (a host int)."""
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    reads, current = count_reads

    def collate(rows):
        width = max(len(r["ids"]) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r["ids"])], mask[i, : len(r["ids"])] = torch.tensor(r["ids"]), 1
        return {"input_ids": x, "attention_mask": mask, "targets": x[:, 0] % 2}

    class Watched(CountingTrainer):
        def __init__(self, cfg):
            super().__init__(cfg, kind="classify")
            current.append(self)

    trainer = Watched(make_cfg(tmp_path / "c", log_every=3, epochs=1, eval_every=0, save_every=0))
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=VOCAB, context_length=32, num_labels=2))
    res = trainer.fit(model, lm_rows(40, 0), collate, lm_rows(8, 1), run_config={"task": "test"})
    assert res.metrics["status"] == "completed" and res.metrics["step"] == 5
    assert [r for r in reads if r[0]] == []
    assert {s for _, s, _ in reads} <= {0, 3, 5}, [r for r in reads if r[1] not in (0, 3, 5)]
    tokens = [r["tokens"] for r in step_records(tmp_path / "c")]
    assert tokens[-1] == sum(len(r["ids"]) for r in lm_rows(40, 0))  # real tokens, padding not counted


def test_the_cpu_only_reads_are_guarded_against_cuda():
    import inspect

    from gptforge.model import gpt, perf

    assert 'h.device.type != "cuda" and not bool(keep.all())' in inspect.getsource(gpt.lm_loss)
    assert 'grad_out.device.type == "cpu" and grad_out.item()' in inspect.getsource(perf)


def test_log_every_k_logs_the_mean_of_its_steps(tmp_path):
    fit(make_cfg(tmp_path / "k1", log_every=1))
    fit(make_cfg(tmp_path / "k3", log_every=3))
    per_step = {r["step"]: r for r in step_records(tmp_path / "k1")}
    got = step_records(tmp_path / "k3")
    assert [r["step"] for r in got] == [3, 6, 9, 10]  # and the last step, whatever k
    first = 1
    for r in got:
        window = [per_step[s] for s in range(first, r["step"] + 1)]
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(sum(w[key] for w in window) / len(window), rel=1e-12, abs=0)
        assert r["lr"] == per_step[r["step"]]["lr"]  # the lr of the logged step, as before
        assert r["tokens"] == per_step[r["step"]]["tokens"]
        first = r["step"] + 1
    # the validation lines and the final line are the same
    val = [
        {k: v for k, v in r.items() if k != "tokens_per_s"}
        for r in read_metrics(tmp_path / "k1" / "metrics.jsonl")
        if "lr" not in r
    ]
    val3 = [
        {k: v for k, v in r.items() if k != "tokens_per_s"}
        for r in read_metrics(tmp_path / "k3" / "metrics.jsonl")
        if "lr" not in r
    ]
    assert val == val3


def test_a_log_window_cut_by_a_resume_averages_the_same_steps(tmp_path, sigterm_trainer):
    """Stopped after step 4 (mid-window for log_every=3), resumed: the step-6 line still averages 4, 5, 6."""
    kw = dict(log_every=3, save_every=2)
    fit(make_cfg(tmp_path / "ref", **kw))
    out = tmp_path / "run"
    stopped = fit(make_cfg(out, **kw), trainer_cls=sigterm_trainer)
    assert stopped.metrics["status"] == "interrupted" and stopped.metrics["step"] == 4
    fit(make_cfg(out, resume="auto", **kw))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(step_records(out)) == strip(step_records(tmp_path / "ref"))


def test_divergence_noticed_at_a_later_read_is_reported_at_its_step(tmp_path):
    """NaN at step 5, logging every 4 and saving every 2: noticed at step 6's save, which it prevents."""
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 \(epoch 0\).*step-00000004"):
        fit(make_cfg(out, save_every=2, log_every=4), trainer_cls=NanAtStep5)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert not (out / FINAL).exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "diverged" and run["step"] == 5
    recs = read_metrics(out / "metrics.jsonl")
    assert [r.get("event") for r in recs] == [None, "nonfinite_loss"]
    assert recs[0]["step"] == 4 and recs[1] == {
        "step": 5,
        "epoch": 0,
        "event": "nonfinite_loss",
        "loss": "nan",
    }


class NanAtStep2(Trainer):
    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        return loss * float("inf") if self.state.step == 1 else loss


def test_divergence_without_log_or_save_steps_is_caught_at_the_epoch_end(tmp_path):
    out = tmp_path / "late"
    with pytest.raises(TrainingError, match=r"loss became (inf|nan) at step 2 \(epoch 0\).*no checkpoint"):
        fit(make_cfg(out, log_every=100, eval_every=0, save_every=0), trainer_cls=NanAtStep2)
    assert list_checkpoints(out) == []
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 2


# -- precision and compile: `auto` ---------------------------------------------------------------------


def test_auto_precision_follows_the_device(monkeypatch):
    from gptforge import machine

    monkeypatch.setattr(machine, "cuda_has_native_bf16", lambda: True)
    assert machine.auto_precision() == ("bf16", True)
    assert machine.auto_precision(cpu=True) == ("no", False)  # train.cpu wins over the GPU
    monkeypatch.setattr(machine, "cuda_has_native_bf16", lambda: False)
    assert machine.auto_precision() == ("no", False)


@pytest.mark.parametrize("capability, native", [((9, 0), True), ((8, 0), True), ((7, 5), False)])
def test_cuda_native_bf16_is_compute_capability_8(monkeypatch, capability, native):
    from gptforge import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: asked.append(i) or capability)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert machine.cuda_has_native_bf16() is native
    assert asked == [1]  # this rank's GPU


def test_auto_is_resolved_in_the_config_record_and_explicit_values_kept(monkeypatch):
    from gptforge import machine
    from gptforge.pipeline.config import ClassifyConfig, TrainConfig, config_from_mapping
    from gptforge.pipeline.manifest import hash_obj
    from gptforge.pipeline.stages import config_record

    cpu = config_from_mapping(ClassifyConfig, {})
    assert (cpu.train.mixed_precision, cpu.train.compile) == ("no", False)
    monkeypatch.setattr(machine, "cuda_has_native_bf16", lambda: True)
    gpu = config_from_mapping(ClassifyConfig, {})
    assert (gpu.train.mixed_precision, gpu.train.compile) == ("bf16", True)
    assert config_record(gpu)["train"]["mixed_precision"] == "bf16"
    assert hash_obj(config_record(gpu)) != hash_obj(config_record(cpu))  # a GPU run is another stage run
    explicit = config_from_mapping(ClassifyConfig, {"train": {"mixed_precision": "no", "compile": False}})
    assert (explicit.train.mixed_precision, explicit.train.compile) == ("no", False)
    on_cpu = config_from_mapping(ClassifyConfig, {"train": {"cpu": True}})
    assert (on_cpu.train.mixed_precision, on_cpu.train.compile) == ("no", False)
    t = TrainConfig(compile="auto", mixed_precision="fp16")
    t.resolve()
    assert (t.mixed_precision, t.compile) == ("fp16", True)


def test_compile_flag_takes_true_false_auto(monkeypatch):
    from gptforge import machine
    from gptforge.pipeline.cli_args import parse_config

    monkeypatch.setattr(machine, "cuda_has_native_bf16", lambda: True)
    assert parse_config("pretrain", ["--train.compile", "--train.lr", "1e-3"])[0].train.compile is True
    assert parse_config("pretrain", ["--train.compile", "false"])[0].train.compile is False
    assert parse_config("pretrain", ["--train.compile", "auto"])[0].train.compile is True
    assert parse_config("pretrain", ["--no-train.compile"])[0].train.compile is False
    with pytest.raises(ConfigError, match=r"train.compile='maybe' is not valid; use true, false or auto"):
        parse_config("pretrain", ["--train.compile=maybe"])


def test_cuda_accelerator_gets_bf16_compile_and_non_blocking_copies(tmp_path, monkeypatch):
    """The CUDA branch of make_accelerator, with the Accelerator itself replaced (no GPU here)."""
    import accelerate

    from gptforge import machine
    from gptforge.pipeline import accelerator as accelerator_mod
    from gptforge.pipeline.config import TrainConfig

    made = {}

    class FakeAccelerator:
        distributed_type = None

        def __init__(self, **kw):
            made.update(kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(machine, "cuda_has_native_bf16", lambda: True)
    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    cfg = TrainConfig(out_dir=str(tmp_path))
    accelerator_mod.make_accelerator(cfg)
    assert made["cpu"] is False and made["mixed_precision"] == "bf16"
    assert made["dynamo_backend"] == "inductor"
    assert made["dataloader_config"].non_blocking is True
    assert (cfg.mixed_precision, cfg.compile) == ("bf16", True)  # what run.json records
    made.clear()
    accelerator_mod.make_accelerator(TrainConfig(out_dir=str(tmp_path), cpu=True))
    assert made["cpu"] is True and made["mixed_precision"] is None and made["dynamo_backend"] is None
    assert made["dataloader_config"].non_blocking is False


def test_loaders_pin_memory_only_for_cuda(tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(tmp_path / "p"))
    rows = [{"ids": [1, 2, 3]}] * 4
    assert trainer._loader(rows, list).pin_memory is False
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: torch.device("cuda")))
    assert trainer._loader(rows, list).pin_memory is True


# -- on a real GPU (skipped without one) ---------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_steps_never_synchronise(tmp_path):
    """CUDA's own check: any device-to-host wait inside a training step or its bookkeeping raises."""

    class SyncChecked(Trainer):
        def _train_step(self, window, state):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return super()._train_step(window, state)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    cfg = make_cfg(tmp_path / "g", log_every=5, compile=False, mixed_precision="bf16")
    res = fit(cfg, trainer_cls=SyncChecked)
    assert res.metrics["status"] == "completed"
    assert json.loads((tmp_path / "g" / "run.json").read_text())["device"].startswith("cuda")
    assert [r["step"] for r in step_records(tmp_path / "g")] == [5, 10]


@pytest.mark.gpu
def test_auto_on_this_gpu(tmp_path):
    from gptforge.machine import cuda_has_native_bf16

    trainer = Trainer(make_cfg(tmp_path / "a"))
    native = cuda_has_native_bf16()
    assert (trainer.cfg.mixed_precision, trainer.cfg.compile) == (("bf16", True) if native else ("no", False))
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    assert trainer._loader([{"ids": [1, 2]}] * 2, list).pin_memory is True
