"""The bottom layer for files: atomic writes, integrity manifests and content hashes. Used everywhere.

Every file or directory gptforge writes goes through here, so that a kill, a full disk or a permission
problem never leaves a half-written output under its final name:
- `write_text`, `write_json`, `write_jsonl`: a sibling temp file, then `os.replace`.
- `atomic_dir`: a whole directory is built in a sibling temp dir and renamed into place.
- Temp names carry the writer's pid (`.NAME.tmp-PID-XXXX`); `clean_stale_temps` removes the ones whose
  writer is gone, so a killed export or save leaves nothing behind for long.
- Final files and dirs get the permissions the umask gives (as `save_pretrained` does), not mkdtemp's 0700.
- `write_file_manifest` / `verify_file_manifest`: sizes and sha256 of a directory's files, written last;
  a directory whose manifest verifies is complete and intact.
- `content_hash`: the hash of a file or directory's content, cached on (path, size, mtime).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from gptforge.errors import CheckpointError, GPTForgeError

FILE_MANIFEST = "files.sha256.json"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


class StorageError(GPTForgeError):
    """A file or directory cannot be written or read: full disk, no permission."""


# -- permissions and errors ---------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dir_mode() -> int:
    return 0o777 & ~_umask()


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _mb(n: int | float) -> str:
    """A size a person reads: kB below a megabyte, GB from a gigabyte (binary units)."""
    if n < 2**20:
        return f"{max(n, 1) / 2**10:,.1f} kB"
    if n < 2**30:
        return f"{n / 2**20:,.1f} MB"
    return f"{n / 2**30:,.1f} GB"


_FULL_MARKS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _disk_full(e: BaseException, path: Path, need_bytes: int | None) -> bool:
    """Whether `e` means the disk is full. Writers in Rust and C++ do not raise OSError: safetensors says
    "I/O error: No space left on device (os error 28)", torch.save only "unexpected pos 576 vs 534"; for
    the latter a free space below what the write needed is the evidence."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if any(m in str(e) for m in _FULL_MARKS):
        return True
    if need_bytes and isinstance(e, RuntimeError):
        try:
            return shutil.disk_usage(_existing_parent(path)).free < need_bytes
        except OSError:
            return False
    return False


def storage_error(e: BaseException, path: str | os.PathLike, need_bytes: int | None = None) -> BaseException:
    """An error a user can fix (full disk, no permission, read-only) as one StorageError line naming `path`
    (and for a full disk the space needed and free); any other error comes back unchanged."""
    p = Path(path)
    if _disk_full(e, p, need_bytes):
        try:
            free = shutil.disk_usage(_existing_parent(p)).free
            have = f"; {_mb(free)} free"
        except OSError:
            have = ""
        need = f" (needs about {_mb(need_bytes)}{have})" if need_bytes else (f" ({have[2:]})" if have else "")
        return StorageError(f"{p}: no space left on the device{need}; free some space or write elsewhere")
    if not isinstance(e, OSError):
        return e
    if e.errno in (errno.EACCES, errno.EPERM):
        target = e.filename or p
        return StorageError(f"{target}: permission denied; fix the permissions or choose another path")
    if e.errno == errno.EROFS:
        return StorageError(f"{p}: the file system is read-only; write elsewhere")
    return e


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def read_bytes_checked(path: str | os.PathLike, what: str = "file") -> bytes:
    """Read a file, turning permission problems into one line."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        err = storage_error(e, path)
        if err is e:
            raise CheckpointError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
        raise err from None


# -- temp names ------------------------------------------------------------------------------------


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """The sibling temp name for `path` (`.NAME.tmp-PID-XXXXXX`) that `clean_stale_temps` recognises.

    For writers that cannot use `atomic_dir` as is (several processes writing one dir), so that what a
    killed one leaves is still found and removed by the next run.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` entries in `parent` whose writer process is gone.

    `name` limits it to one destination's temps. Returns what was removed.
    """
    root = Path(parent)
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        base, pids = entry.name, []
        while m := _TEMP.match(base):  # a temp of a temp (a writer nested in another) counts as its base's
            base = m.group("name")
            pids.append(int(m.group("pid")))
        if not pids or (name is not None and base != name) or any(_alive(p) for p in pids):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# -- atomic writes ---------------------------------------------------------------------------------


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically: a sibling temp file, flushed, then renamed over `path`."""
    path = Path(path)
    tmp = temp_path(path)
    clean_stale_temps(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write_file")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = storage_error(e, path, need_bytes=len(data))
        if err is e:
            raise
        raise err from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Write JSON atomically (UTF-8, not ASCII-escaped, a trailing newline)."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object a line, atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_dir(
    out_dir: str | os.PathLike,
    write: Callable[[Path], None],
    overwrite: bool = True,
    need_bytes: int | None = None,
) -> Path:
    """Build a directory through `write(tmp)` in a sibling temp dir, then rename it into place.

    An existing `out_dir` is replaced only once the new one is complete, so it is never half-overwritten;
    a failure (a full disk included) removes the temp dir and leaves `out_dir` as it was. Stale temps of
    the same destination from killed writers are removed first. The result has umask permissions.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite=True or choose another directory")
    tmp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out.parent, out.name)
        tmp.mkdir(mode=_dir_mode())
        write(tmp)
        fix_modes(tmp)
        fault_point("write_dir")
        if out.exists():
            old = temp_path(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except GPTForgeError as e:  # a nested writer's error names our temp dir: the user knows `out`
        shutil.rmtree(tmp, ignore_errors=True)
        if str(tmp) in str(e):
            raise type(e)(str(e).replace(str(tmp), str(out))) from None
        raise
    except Exception as e:
        written = _tree_size(tmp) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(e, out, need_bytes=need_bytes or (written or None))
        if err is e:
            raise
        raise err from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def fix_modes(root: Path) -> None:
    """Give a tree built by a library that used 0600/0700 temp files the umask's permissions (safetensors
    0.8 writes 0600 files; mkdtemp makes 0700 dirs). `atomic_dir` does it; other dir writers call it."""
    dmode, fmode = _dir_mode(), 0o666 & ~_umask()
    os.chmod(root, dmode)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, dmode if p.is_dir() else (fmode | (p.stat().st_mode & 0o111 & ~_umask())))


# -- hashing and integrity manifests ---------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _file_hash_cached(f: Path) -> str:
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(f)
    return _HASH_CACHE[key]


def content_hash(path: str | os.PathLike, ignore: Callable[[Path], bool] | None = None) -> str:
    """A short hash of a file's bytes, or of a directory's relative names and bytes.

    Each file's sha256 is cached on (path, size, mtime) for the life of the process, so a corpus that did
    not change is not read twice.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        h.update(_file_hash_cached(p).encode())
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            rel = f.relative_to(p)
            if ignore is not None and ignore(rel):
                continue
            h.update(str(rel.as_posix()).encode() + b"\0" + _file_hash_cached(f).encode())
    else:
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(p))
    return h.hexdigest()[:16]


def write_file_manifest(directory: str | os.PathLike) -> Path:
    """Record every file's size and sha256 in `directory/files.sha256.json`. Call it last: its presence
    is what marks the directory complete."""
    d = Path(directory)
    files = {
        f.relative_to(d).as_posix(): {"size": f.stat().st_size, "sha256": _file_hash_cached(f)}
        for f in sorted(x for x in d.rglob("*") if x.is_file())
        if f.name != FILE_MANIFEST and not _TEMP.match(f.name)
    }
    return write_json(d / FILE_MANIFEST, {"version": 1, "files": files})


def verify_file_manifest(
    directory: str | os.PathLike, required: bool = True, deep: bool = True, fix: str = "re-save it"
) -> bool:
    """Check a directory against its manifest; raise CheckpointError naming the first bad file and `fix`.

    Returns False (and checks nothing) when there is no manifest and `required` is False: directories
    written before manifests existed still load. `deep=False` checks sizes only. Files not listed (added
    later, e.g. a README) are not checked. A hash is cached on (path, size, mtime), so checking a directory
    this process wrote or checked before costs a stat per file.
    """
    d = Path(directory)
    mf = d / FILE_MANIFEST
    if not mf.is_file():
        if required:
            raise CheckpointError(
                f"{d}: no {FILE_MANIFEST}, so it is incomplete or was written before integrity manifests; {fix}"
            )
        return False
    try:
        files = json.loads(mf.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{mf}: unreadable integrity manifest ({e}); the directory is damaged; {fix}"
        ) from None
    for rel, rec in files.items():
        f = d / rel
        if not f.is_file():
            raise CheckpointError(
                f"{f}: missing (listed in {FILE_MANIFEST}); the directory is damaged; {fix}"
            )
        size = f.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(
                f"{f}: {size} bytes, {rec['size']} expected (truncated or replaced); the directory is damaged; {fix}"
            )
        if deep and _file_hash_cached(f) != rec["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from {FILE_MANIFEST} (damaged or replaced); {fix}")
    return True


# -- what a run really read -------------------------------------------------------------------------

_READ_SETS: list[dict[str, str]] = []


def record_read(path: str | os.PathLike, kind: str = "input") -> None:
    """Note that the running stage read `path` (a file or a directory) as `kind` ("data file",
    "checkpoint", ...). A no-op unless a `tracking_reads()` block is active; the pipeline runner keys a
    stage on the content of everything recorded here."""
    if not _READ_SETS:
        return
    p = str(Path(path).expanduser().absolute())
    for reads in _READ_SETS:
        reads.setdefault(p, kind)


class tracking_reads:
    """`with tracking_reads() as reads:` collects {absolute path: kind} of every `record_read` inside."""

    def __enter__(self) -> dict[str, str]:
        self.reads: dict[str, str] = {}
        _READ_SETS.append(self.reads)
        return self.reads

    def __exit__(self, *exc) -> None:
        _READ_SETS.remove(self.reads)


def stat_signature(path: str | os.PathLike) -> str | None:
    """A cheap signature of (relative name, size, mtime) of a file or of every file in a directory;
    None when the path is gone. Equal signatures mean the content hash need not be recomputed."""
    p = Path(path)
    if p.is_file():
        entries = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)]
    elif p.is_dir():
        entries = [
            (f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(x for x in p.rglob("*") if x.is_file())
        ]
    else:
        return None
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def fingerprint(path: str | os.PathLike, previous: dict | None = None) -> dict | None:
    """{"stat": ..., "hash": ...} of a file or directory; None when it is gone.

    When `previous` (an earlier fingerprint) has the same stat signature, its hash is reused: an unchanged
    10 GB corpus is not read again. Otherwise the content is hashed.
    """
    sig = stat_signature(path)
    if sig is None:
        return None
    if previous and previous.get("stat") == sig and previous.get("hash"):
        return {"stat": sig, "hash": previous["hash"]}
    return {"stat": sig, "hash": content_hash(path)}


# -- fault injection (tests/reliability) -----------------------------------------------------------

_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL at the Nth time it passes `name`, when `GPTFORGE_FAULT=name:N`.

    The reliability tests use it to stop a run at exact places (a training step, inside a directory or
    file write, between evaluations) and check that the next run recovers. Costs one dict lookup.
    """
    log = os.environ.get("GPTFORGE_FAULT_LOG")
    if log:  # the tests count the points a run passes, to choose where to stop the next one
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    spec = os.environ.get("GPTFORGE_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
