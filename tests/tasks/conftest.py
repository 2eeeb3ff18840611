"""Fixtures for the data tests: the real data through $GPTFORGE_DATA_DIR, a private cache, no downloads."""

from pathlib import Path

import pytest


@pytest.fixture
def data_env(shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Resolve known data sets from the local copies; any download attempt fails loudly."""
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "gptforge-cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    return shared_data_dir


@pytest.fixture
def no_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $GPTFORGE_DATA_DIR and an empty cache: resolve() must download (from a local URL)."""
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    monkeypatch.delenv("GPTFORGE_OFFLINE", raising=False)
    cache = tmp_path / "gptforge-cache"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache))
    for var in ("SMS_SPAM", "INSTRUCTION", "INSTRUCTION_PREFERENCE", "THE_VERDICT", "TINYSHAKESPEARE"):
        monkeypatch.delenv(f"GPTFORGE_URL_{var}", raising=False)
    return cache
