"""bf16 on a CPU: the trainer warns only where the CPU is known to lack bf16 units, never on "unknown"."""

from __future__ import annotations

import warnings

import pytest

from gptforge.pipeline import accelerator as accelerator_mod
from gptforge.pipeline.config import TrainConfig


@pytest.mark.parametrize("native, warns", [(False, True), (None, False), (True, False)])
def test_bf16_on_cpu_warns_only_on_a_known_no(tmp_path, monkeypatch, native, warns):
    monkeypatch.setattr(accelerator_mod, "cpu_has_native_bf16", lambda: native)
    cfg = TrainConfig(out_dir=str(tmp_path), mixed_precision="bf16", cpu=True, progress=False, plot=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        accelerator_mod.make_accelerator(cfg)
    slow = [w for w in seen if "without bf16 units" in str(w.message)]
    assert len(slow) == (1 if warns else 0), [str(w.message) for w in seen]
