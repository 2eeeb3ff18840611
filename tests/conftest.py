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
