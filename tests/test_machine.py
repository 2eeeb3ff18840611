"""Machine facts and settings: the CPU bf16 probe answers yes, no or unknown; the allocator keeps freed memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

from gptforge import machine


@pytest.fixture
def probe(monkeypatch):
    """cpu_has_native_bf16 with torch's own probes saying no and the cache cleared around each call."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(machine, "_is_x86", lambda: True)

    def ask(flags):
        monkeypatch.setattr(machine, "_cpu_flags", lambda: flags)
        machine.cpu_has_native_bf16.cache_clear()
        return machine.cpu_has_native_bf16()

    yield ask
    machine.cpu_has_native_bf16.cache_clear()


def test_cpu_bf16_probe_says_yes_no_or_unknown(probe, monkeypatch):
    assert probe(frozenset({"avx2", "fma"})) is False  # an AVX2-only x86 CPU: a known no
    assert probe(frozenset()) is False  # /proc/cpuinfo read, no flags line: no bf16 units listed
    assert probe(frozenset({"avx2", "amx_bf16"})) is True
    assert probe(frozenset({"avx512_bf16"})) is True
    assert probe(None) is None  # /proc/cpuinfo unreadable (macOS, a sandbox): unknown, not no
    monkeypatch.setattr(machine, "_is_x86", lambda: False)
    assert probe(frozenset({"fp", "asimd"})) is None  # not x86: these flags do not tell
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert probe(None) is True  # torch's own probe is believed first
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert probe(frozenset({"avx512_bf16"})) is False  # no oneDNN: bf16 matmuls are slow on any CPU


def test_cpu_flags_are_read_from_proc_cpuinfo():
    machine._cpu_flags.cache_clear()
    flags = machine._cpu_flags()
    if os.path.exists("/proc/cpuinfo"):
        assert isinstance(flags, frozenset) and (flags or not machine._is_x86())
    else:
        assert flags is None


# Allocates, fills and frees a 64 MiB tensor 16 times, like a training step's biggest buffer; prints whether
# the allocator setting took and the page faults of the last 4 rounds (a fresh mmap faults in all 16,384
# pages; a reused heap block none; the heap needs a few rounds before a freed block fits the next request).
_ALLOC_PROBE = """
import resource, torch
from gptforge import machine
tuned = machine.keep_freed_memory()
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    del t
    return n
print(tuned, *[faults() for _ in range(16)][-4:])
"""


@pytest.mark.skipif(machine._glibc() is None, reason="the setting exists for glibc's allocator only")
@pytest.mark.parametrize("env", ["", "default"])
def test_keep_freed_memory_reuses_big_buffers_without_page_faults(env):
    env_vars = {**os.environ, "GPTFORGE_MALLOC": env, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _ALLOC_PROBE], env=env_vars, capture_output=True, text=True, check=True
    )
    tuned, *faults = out.stdout.split()
    pages = (64 << 20) // resource.getpagesize()
    if env == "default":  # left alone: glibc maps every 64 MiB tensor anew
        assert tuned == "False" and min(map(int, faults)) >= pages // 2
    else:
        assert tuned == "True" and sum(map(int, faults)) < pages // 50


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(machine, "_allocator_tuned", False)
    monkeypatch.setattr(machine, "_glibc", lambda: None)
    assert machine.keep_freed_memory() is False
    machine.release_freed_memory()  # nothing to release, no error
