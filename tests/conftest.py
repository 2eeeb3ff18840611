import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPTFORGE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set GPTFORGE_SLOW=1 (make test-all)")
    gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The local copies of the real data sets ($GPTFORGE_DATA_DIR, else ../shared/data beside the repo)."""
    env = os.environ.get("GPTFORGE_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if cand.is_dir():
            return cand
    pytest.fail("real data sets not found: set GPTFORGE_DATA_DIR to a copy of shared/data")


def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One intra-op thread: identical float reductions in every run, and tiny models run faster on a busy
    2-core box than with spinning OpenMP threads; restored afterwards. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module (also around its module-scoped fixtures)."""
    yield from _single_thread()


def overrides_to_argv(ov: dict) -> list[str]:
    """{"train.lr": 1e-3, "data.sources": ["a"]} -> ["--train.lr", "0.001", "--data.sources", "[a]"]."""
    out = []
    for k, v in ov.items():
        text = (
            f"[{','.join(v)}]" if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
        )
        out += [f"--{k}", text]
    return out


def torchrun_cli(
    task: str,
    ov: dict,
    *extra: str,
    nproc: int = 2,
    accelerate_config: Path | None = None,
    timeout: float = 400,
):
    """`torchrun --standalone --nproc_per_node N -m gptforge.cli TASK` (gloo on CPU, one thread a process),
    or `accelerate launch --config_file CONFIG -m gptforge.cli TASK`; fails the test with the end of
    stderr when it exits non-zero."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if accelerate_config is not None:
        import socket

        with socket.socket() as sock:  # accelerate launch's default port 29500 clashes with concurrent runs
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [
            accelerate,
            "launch",
            "--config_file",
            str(accelerate_config),
            "--main_process_port",
            str(port),
        ]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "gptforge.cli", task, *overrides_to_argv(ov), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture
def to_argv():
    return overrides_to_argv


@pytest.fixture
def sigterm_trainer():
    """A Trainer that sends itself SIGTERM during its 4th optimizer step, as a scheduler or Ctrl-C would
    (mid-epoch in the trainer tests); the run saves and stops after that step."""
    import signal

    from gptforge.pipeline.trainer import Trainer

    class SigtermAtStep(Trainer):
        def compute_loss(self, model, batch):
            if self.state.step == 3 and not getattr(self, "_sent", False):
                self._sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return super().compute_loss(model, batch)

    return SigtermAtStep
