"""Every path that loads weights turns a truncated, corrupt or unreadable file into one line naming the file
and the fix, exit 2, nothing written (issue 13 item 4): evaluate, generate, export, classify,
convert --from-hf, training's model.init, merge; and a full disk during export or training is one line
naming the path and the space needed, with no half-written dir left."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.cli import main as cli_main
from gptforge.io import FILE_MANIFEST
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.hf import to_hf
from gptforge.model.lora import LoRAConfig, apply_lora, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_labels: int = 0) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", context_length=16))
    if num_labels:
        model.add_classification_head(num_labels, {0: "ham", 1: "spam"})
    return model


@pytest.fixture(scope="module")
def made(tmp_path_factory, shared_data_dir) -> Path:
    """One of each: an LM checkpoint, a classifier, a Hugging Face dir, a LoRA adapter; a small corpus."""
    root = tmp_path_factory.mktemp("made")
    save_checkpoint(tiny(), root / "lm")
    save_checkpoint(tiny(2), root / "cls")
    to_hf(tiny()).save_pretrained(str(root / "hf"))
    save_adapter(apply_lora(tiny(), LoRAConfig(r=2)), root / "adapter", base=root / "lm")
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:1000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return root


# verb -> (source dir, weights file in it, argv given the source copy and a scratch dir)
VERBS = {
    "generate": ("lm", "model.safetensors", lambda s, t: ["generate", s, "hello", "--max-new-tokens", "2"]),
    "evaluate": (
        "lm",
        "model.safetensors",
        lambda s, t: ["evaluate", s, "--task", "pretrain", "--data", t / "corpus.txt", "--out", t / "o"],
    ),
    "export": ("lm", "model.safetensors", lambda s, t: ["export", s, "--out", t / "o"]),
    "classify": ("cls", "model.safetensors", lambda s, t: ["classify", s, "a text"]),
    "convert": ("hf", "model.safetensors", lambda s, t: ["convert", "--from-hf", s, "--out", t / "o"]),
    "model.init": (
        "lm",
        "model.safetensors",
        lambda s, t: [
            "pretrain",
            "--model.init",
            s,
            "--data.sources",
            f"[{t / 'corpus.txt'}]",
            "--train.epochs",
            "1",
            "--train.out_dir",
            t / "o",
            "--train.progress",
            "false",
            "--train.plot",
            "false",
        ],  # fmt: skip
    ),
    "merge": ("adapter", "adapter.safetensors", lambda s, t: ["merge", s, "--out", t / "o"]),
}


def setup(made: Path, tmp_path: Path, verb: str) -> tuple[Path, list[str]]:
    kind, weights, args = VERBS[verb]
    src = tmp_path / kind
    shutil.copytree(made / kind, src)
    shutil.copyfile(made / "corpus.txt", tmp_path / "corpus.txt")
    return src / weights, [str(a) for a in args(src, tmp_path)]


def one_line(capsys) -> str:
    """The one error line (progress bars and notes may come before it), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("gptforge ")]
    assert len(lines) == 1 and ": error: " in lines[0], err[-3000:]
    return lines[0]


DAMAGE = ["truncated", "garbage", "truncated-with-manifest", "config"]
# A Hugging Face dir has no gptforge manifest, so "truncated-with-manifest" applies to gptforge dirs only.
CASES = [
    (v, d) for v in VERBS for d in DAMAGE if not (VERBS[v][0] == "hf" and d == "truncated-with-manifest")
]


@pytest.mark.parametrize("verb,damage", CASES)
def test_damaged_weights_are_one_line_naming_the_file(made, tmp_path, capsys, verb, damage):
    weights, argv = setup(made, tmp_path, verb)
    manifest = weights.parent / FILE_MANIFEST
    assert manifest.is_file() == (VERBS[verb][0] != "hf")
    if damage != "truncated-with-manifest":
        manifest.unlink(missing_ok=True)  # as a dir from before manifests: the file itself must be checked
    bad = weights.parent / "config.json" if damage == "config" else weights
    data = bad.read_bytes()
    bad.write_bytes(b"this is not a weights file" if damage == "garbage" else data[: len(data) // 2])
    capsys.readouterr()
    assert cli_main(argv) == 2
    line = one_line(capsys)
    assert str(bad) in line, line
    assert any(fix in line for fix in ("re-save", "re-export", "re-download")), line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_checkpoints_from_before_manifests_still_load(made, tmp_path):
    from gptforge.model.checkpoint import load_checkpoint

    shutil.copytree(made / "lm", tmp_path / "lm")
    (tmp_path / "lm" / FILE_MANIFEST).unlink()
    model = load_checkpoint(tmp_path / "lm", deep=True)
    want = load_checkpoint(made / "lm", deep=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_unreadable_files_are_one_line_naming_the_path(made, tmp_path):
    """As a user without root's override (root reads any file): permission denied names the path."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not found")
    cases = {}
    for verb in ("generate", "convert", "merge"):
        d = tmp_path / verb
        d.mkdir()
        weights, argv = setup(made, d, verb)
        weights.chmod(0)
        cases[verb] = (str(weights), argv)
    script = (
        "import contextlib, io, json, sys\n"
        "from gptforge.cli import main\n"
        "out = {}\n"
        f"for verb, (path, argv) in {cases!r}.items():\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stderr(buf):\n"
        "        rc = main(argv)\n"
        "    out[verb] = [rc, buf.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    proc = subprocess.run([*cmd, sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for verb, (path, _) in cases.items():
        rc, err = got[verb]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (verb, err)
        assert path in lines[0] and "permission denied" in lines[0], (verb, lines[0])


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_export_is_one_line_and_leaves_nothing(made, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    assert cli_main(["export", str(made / "lm"), "--out", str(tmp_path / "hf")]) == 2
    line = one_line(capsys)
    assert str(tmp_path / "hf") in line and "no space left" in line and "needs about 10.2 MB" in line, line
    assert list(tmp_path.iterdir()) == []


def test_full_disk_as_safetensors_reports_it_is_one_line(made, tmp_path, capsys, monkeypatch):
    """safetensors' writer does not raise OSError on a full disk but its own error (checked on a 1 MB tmpfs)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert cli_main(["convert", "--from-hf", str(made / "hf"), "--out", str(tmp_path / "ck")]) == 2
    line = one_line(capsys)
    assert str(tmp_path / "ck") in line and "no space left" in line and "MB" in line, line
    assert list(tmp_path.iterdir()) == []


def pretrain_argv(made: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--model.preset", "test-tiny", "--model.context_length", "16",
        "--data.sources", f"[{made / 'corpus.txt'}]", "--train.epochs", "1", "--train.batch_size", "2",
        "--train.out_dir", str(out), "--train.progress", "false", "--train.plot", "false", *extra,
    ]  # fmt: skip


def test_full_disk_during_training_checkpoint_is_one_line_and_leaves_nothing(
    made, tmp_path, capsys, monkeypatch
):
    import accelerate.utils.other

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full_disk)
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli_main(pretrain_argv(made, out, "--train.save_every", "2")) == 2
    line = one_line(capsys)
    ckpts = out / "checkpoints"
    assert str(ckpts / "step-00000002") in line and "no space left" in line and "needs about" in line, line
    assert list(ckpts.iterdir()) == []  # the temp dir is gone (today: an empty .tmp-step-N)
    assert not (out / "final").exists()


def test_full_disk_during_final_save_is_one_line_and_leaves_nothing(made, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # gptforge's own writer, not accelerate's
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli_main(pretrain_argv(made, out)) == 2
    line = one_line(capsys)
    assert str(out / "final") in line and "no space left" in line and "needs about 6.2 MB" in line, line
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "final"]
    from gptforge.pipeline.checkpoints import list_checkpoints, verify_checkpoint

    (last,) = list_checkpoints(out)  # the end of training is saved and intact: a resume only writes final/
    verify_checkpoint(last)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [last.name]
