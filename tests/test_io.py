"""The bottom layer for files: atomic writes leave nothing on failure, a full disk is one line naming the
path and the space, outputs get the umask's permissions, stale temps go only when their writer is gone,
and integrity manifests catch truncation, replacement and missing files."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gptforge import io
from gptforge.errors import CheckpointError
from gptforge.io import (
    FILE_MANIFEST,
    StorageError,
    atomic_dir,
    clean_stale_temps,
    content_hash,
    storage_error,
    temp_path,
    verify_file_manifest,
    write_file_manifest,
    write_json,
    write_jsonl,
    write_text,
)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- atomic writes ---------------------------------------------------------------------------------


def test_write_json_text_jsonl_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"é": [1, 2]})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{\n  "é": [\n    1,\n    2\n  ]\n}\n'
    write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, {"x": 2}])
    assert [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()] == [
        {"x": 1},
        {"x": 2},
    ]
    write_text(tmp_path / "c.txt", "old")
    write_text(tmp_path / "c.txt", "new")
    assert (tmp_path / "c.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl", "c.txt"]


def test_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    write_text(tmp_path / "c.txt", "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(StorageError) as e:
        write_text(tmp_path / "c.txt", "x" * 3000)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'c.txt'}: no space left on the device (needs about 2.9 kB;"), msg
    assert "free some space or write elsewhere" in msg
    assert (tmp_path / "c.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]


def test_failed_dir_write_leaves_nothing_and_enospc_is_one_line(tmp_path):
    out = tmp_path / "out"

    def fills_the_disk(d: Path) -> None:
        (d / "weights.bin").write_bytes(b"\0" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as e:
        atomic_dir(out, fills_the_disk, need_bytes=3 * 2**30)
    assert str(e.value).startswith(f"{out}: no space left on the device (needs about 3.0 GB; ")
    assert list(tmp_path.iterdir()) == []

    atomic_dir(out, lambda d: (d / "a").write_text("old"))
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C mid-write: the old dir stays, the temp goes
        atomic_dir(out, lambda d: ((d / "a").write_text("new"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert (out / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_storage_error_for_writers_that_do_not_raise_oserror(tmp_path):
    """safetensors and torch.save report a full disk in their own exception types."""
    e = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(storage_error(e, tmp_path / "x", need_bytes=10), StorageError)
    cryptic = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert isinstance(
        storage_error(cryptic, tmp_path / "x", need_bytes=2**60), StorageError
    )  # not enough free
    assert storage_error(cryptic, tmp_path / "x", need_bytes=10) is cryptic  # plenty free: not a full disk
    other = ValueError("something else")
    assert storage_error(other, tmp_path / "x") is other
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "y"))
    assert str(storage_error(denied, tmp_path / "x")) == (
        f"{tmp_path / 'y'}: permission denied; fix the permissions or choose another path"
    )


def test_nested_writer_errors_name_the_destination_not_the_temp(tmp_path):
    def inner(d: Path) -> None:
        atomic_dir(d / "sub", lambda s: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), need_bytes=10)

    with pytest.raises(StorageError) as e:
        atomic_dir(tmp_path / "out", inner)
    assert str(e.value).startswith(f"{tmp_path / 'out' / 'sub'}: no space left")
    assert list(tmp_path.iterdir()) == []


# -- permissions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "dmode", "fmode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_get_the_umask_permissions_not_mkdtemps(tmp_path, umask, mask, dmode, fmode):
    umask(mask)

    def write(d: Path) -> None:
        fd, name = tempfile.mkstemp(dir=d)  # 0600, as libraries' temp files are
        os.close(fd)
        os.replace(name, d / "weights.bin")
        sub = Path(tempfile.mkdtemp(dir=d))  # 0700
        (sub / "f.txt").write_text("x")
        os.replace(sub, d / "sub")

    out = atomic_dir(tmp_path / "out", write)
    assert mode(out) == dmode and mode(out / "sub") == dmode
    assert mode(out / "weights.bin") == fmode and mode(out / "sub" / "f.txt") == fmode
    write_json(tmp_path / "m.json", {})
    assert mode(tmp_path / "m.json") == fmode


# -- stale temps -----------------------------------------------------------------------------------


def test_stale_temps_go_only_when_their_writer_is_dead(tmp_path):
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".out.tmp-{dead}-abc123": False,  # removed
            f".out.old-{dead}-abc123": False,
            f".out.tmp-{dead}": False,
            f".out.tmp-{live.pid}-abc123": True,  # its writer is alive: kept
            f".other.tmp-{dead}-abc123": True,  # another destination: kept when asked for "out"
            ".out.tmp-notapid": True,  # not our naming: never touched
            "out": True,
        }
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "f").write_text("x")
        (tmp_path / f".c.json.tmp-{dead}-abcdef").write_text("{")
        removed = clean_stale_temps(tmp_path, "out")
        assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
            n for n, k in names.items() if k
        )
        clean_stale_temps(tmp_path)  # every destination
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([f".out.tmp-{live.pid}-abc123", ".out.tmp-notapid", "out"])
    finally:
        live.kill()
        live.wait()


def test_temp_path_is_recognised_and_ours_is_never_stale(tmp_path):
    t = temp_path(tmp_path / "export")
    assert t.parent == tmp_path and t.name.startswith(f".export.tmp-{os.getpid()}-")
    t.mkdir()
    assert clean_stale_temps(tmp_path) == [] and t.is_dir()
    atomic_dir(tmp_path / "export", lambda d: None)  # a second writer in this process keeps ours too
    assert t.is_dir()


# -- manifests -------------------------------------------------------------------------------------


@pytest.fixture
def checked(tmp_path) -> Path:
    d = tmp_path / "ck"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "state.pkl").write_bytes(b"\x80\x04" + b"x" * 500)
    write_file_manifest(d)
    return d


def test_manifest_lists_every_file_and_verifies(checked):
    files = json.loads((checked / FILE_MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "sub/state.pkl"]
    assert files["config.json"]["size"] == 8 and len(files["config.json"]["sha256"]) == 64
    assert verify_file_manifest(checked) is True
    (checked / "README.md").write_text("added later")  # not listed: not checked
    assert verify_file_manifest(checked) is True


def test_manifest_catches_truncation(checked):
    f = checked / "sub" / "state.pkl"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"^{f}: 100 bytes, 502 expected \(truncated or replaced\)"):
        verify_file_manifest(checked, deep=False)


def test_manifest_catches_same_size_replacement_with_sha256_only(checked):
    f = checked / "model.safetensors"
    f.write_bytes(os.urandom(4096))
    assert verify_file_manifest(checked, deep=False) is True  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match=rf"^{f}: sha256 differs from {FILE_MANIFEST}.*; fix it$"):
        verify_file_manifest(checked, fix="fix it")


def test_manifest_catches_missing_files_and_a_missing_manifest(checked):
    (checked / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"^{checked / 'config.json'}: missing"):
        verify_file_manifest(checked)
    (checked / FILE_MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"no {FILE_MANIFEST}"):
        verify_file_manifest(checked)
    assert verify_file_manifest(checked, required=False) is False  # older dirs still load


def test_unreadable_manifest_is_named(checked):
    (checked / FILE_MANIFEST).write_text("{trunc")
    with pytest.raises(CheckpointError, match=rf"^{checked / FILE_MANIFEST}: unreadable integrity manifest"):
        verify_file_manifest(checked)


def test_content_hash_follows_content(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    h1 = content_hash(f)
    assert content_hash(f) == h1 and len(h1) == 16
    f.write_text("a,c\n")
    assert content_hash(f) != h1
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("1")
    hd = content_hash(d)
    (d / "y").write_text("2")
    assert content_hash(d) != hd
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")
