"""sources.resolve: explicit path, $GPTFORGE_DATA_DIR, cache, download (checked, atomic), and bad input."""

import hashlib
import http.server
import os
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from gptforge.errors import DataError
from gptforge.tasks import sources
from gptforge.tasks.sources import REGISTRY, check_utf8, read_json_records, resolve


def _files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_resolve_from_data_dir_is_checked(data_env, name):
    src = REGISTRY[name]
    p = resolve(name)
    assert p == data_env / src.subdir / src.file
    if src.sha256 is not None:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == src.sha256


def test_registry_has_canonical_urls_and_no_local_paths():
    assert REGISTRY["sms_spam"].url == "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    assert REGISTRY["sms_spam"].sha256 is None and REGISTRY["sms_spam"].check is not None
    for s in REGISTRY.values():
        assert s.url.startswith("https://") and "shared" not in s.url
        assert s.sha256 is None or len(s.sha256) == 64


def test_explicit_path_file_and_folder(data_env, tmp_path):
    own = tmp_path / "mine.json"
    own.write_text("[]")
    assert resolve("instruction", own) == own  # an explicit file is used as given (not hash-checked)
    assert resolve("the-verdict", data_env) == data_env / "text" / "the-verdict.txt"
    with pytest.raises(DataError, match=r"missing\.json: no such file for instruction"):
        resolve("instruction", tmp_path / "missing.json")
    with pytest.raises(DataError, match="no text/the-verdict.txt"):
        resolve("the-verdict", tmp_path)


def test_unknown_name_lists_known(data_env):
    with pytest.raises(DataError, match=r"unknown data set 'imdb'; known: sms_spam, instruction"):
        resolve("imdb")


def test_offline_without_local_copy(no_data_env, monkeypatch):
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    with pytest.raises(DataError, match="not available locally and GPTFORGE_OFFLINE=1"):
        resolve("the-verdict")


class _Server:
    """A local http.server on 127.0.0.1 serving one folder, counting requests."""

    def __init__(self, root: Path):
        outer = self
        self.requests = 0

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                outer.requests += 1
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_over_http_is_verified_cached_and_reused(
    no_data_env, shared_data_dir, tmp_path, monkeypatch
):
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(shared_data_dir / "text" / "the-verdict.txt", www / "verdict.txt")
    server = _Server(www)
    try:
        monkeypatch.setenv("GPTFORGE_URL_THE_VERDICT", f"{server.url}/verdict.txt")
        p = resolve("the-verdict")
        assert p == no_data_env / "data" / "text" / "the-verdict.txt"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == REGISTRY["the-verdict"].sha256
        assert _files_under(no_data_env / "data") == ["text", "text/the-verdict.txt"]  # no temp leftovers
        assert server.requests == 1
        assert resolve("the-verdict") == p  # from the cache now
        assert server.requests == 1
    finally:
        server.close()


def test_download_with_wrong_hash_is_rejected_and_leaves_nothing(no_data_env, tmp_path):
    bad = tmp_path / "verdict.txt"
    bad.write_text("not the verdict\n")
    with pytest.raises(
        DataError, match=r"download of file://.* rejected, nothing was kept: .* does not match"
    ):
        resolve("the-verdict", url=bad.as_uri())
    assert _files_under(no_data_env / "data") == ["text"]


def test_download_removes_what_a_killed_download_left(no_data_env, shared_data_dir, tmp_path):
    """A download killed with -9 leaves its `.NAME.tmp-PID-*` dir; the next download of that file removes
    it (its writer is gone) and leaves a live writer's temp and other files alone."""
    import subprocess

    cache = no_data_env / "data" / "text"
    cache.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".the-verdict.txt.tmp-{dead.pid}-abcdef"
    (stale / "download").parent.mkdir()
    (stale / "download").write_bytes(b"half a file")
    live = cache / f".the-verdict.txt.tmp-{os.getpid()}-123456"
    live.mkdir()
    other = cache / f".notes.txt.tmp-{dead.pid}-abcdef"
    other.write_text("another file's temp")
    src = tmp_path / "verdict.txt"
    shutil.copy(shared_data_dir / "text" / "the-verdict.txt", src)
    assert resolve("the-verdict", url=src.as_uri()) == cache / "the-verdict.txt"
    assert not stale.exists() and live.exists() and other.exists()


def test_corrupt_cache_copy_is_refused(no_data_env):
    p = no_data_env / "data" / "instruction" / "instruction-data.json"
    p.parent.mkdir(parents=True)
    p.write_text("[]")
    with pytest.raises(DataError, match="does not match instruction's .*; delete it"):
        resolve("instruction")


def test_unreachable_url_is_one_line_error(no_data_env):
    with pytest.raises(
        DataError, match=r"cannot download http://127\.0\.0\.1:9/x.*GPTFORGE_URL_TINYSHAKESPEARE"
    ):
        resolve("tinyshakespeare", url="http://127.0.0.1:9/x")
    assert _files_under(no_data_env / "data") == ["text"]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_sms_zip_download_is_extracted_and_structure_checked(no_data_env, shared_data_dir, tmp_path):
    sms = (shared_data_dir / "sms_spam" / "SMSSpamCollection").read_bytes()
    good = _zip(tmp_path / "good.zip", {"SMSSpamCollection": sms, "readme": b"SMS Spam Collection v.1"})
    p = resolve("sms_spam", url=good.as_uri())
    assert p.read_bytes() == sms
    assert _files_under(no_data_env / "data") == ["sms_spam", "sms_spam/SMSSpamCollection"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (
            {"SMSSpamCollection": b"ham\thello\nspam\tbuy now\n"},
            r"2 messages \(1 ham, 1 spam\), expected 5574",
        ),
        ({"SMSSpamCollection": b"ham\thello\nspam buy now\n"}, "line 2 is not 'ham<TAB>text'"),
        ({"readme": b"no data"}, "the zip has no SMSSpamCollection"),
        (None, "not a zip file"),
    ],
)
def test_bad_sms_download_is_rejected(no_data_env, tmp_path, members, message):
    if members is None:
        (tmp_path / "bad.zip").write_bytes(b"this is not a zip")
        url = (tmp_path / "bad.zip").as_uri()
    else:
        url = _zip(tmp_path / "bad.zip", members).as_uri()
    with pytest.raises(DataError, match=message):
        resolve("sms_spam", url=url)
    assert _files_under(no_data_env / "data") == ["sms_spam"]


def test_check_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: line 3 \(byte 21\) is not valid UTF-8"):
        check_utf8(f)
    g = tmp_path / "ok.txt"
    g.write_text("caf\u00e9\n", encoding="utf-8")
    check_utf8(g)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.json", '[{"a": 1},\n {"a": 2,}]', r"a\.json: line 2 column 10: Expecting property name"),
        ("b.jsonl", '{"a": 1}\n{"a": 2\n', r"b\.jsonl: line 2 column 8"),
        ("c.jsonl", '{"a": 1}\n[1, 2]\n', r"c\.jsonl: line 2 is not a JSON object"),
        ("d.json", '{"a": 1}', r"d\.json: the top level is a dict, expected a list"),
        ("e.json", '[{"a": 1}, 3]', r"e\.json: record 2 is a number, expected an object"),
        ("f.json", "[]", r"f\.json: no records"),
        (
            "g.json",
            '{"a": 1}\n{"a": 2}\n',
            r"line 2 column 1: Extra data \(one object per line\? name the file \.jsonl\)",
        ),
    ],
)
def test_read_json_records_errors_name_the_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=message):
        read_json_records(f)


def test_read_json_records_both_formats(tmp_path):
    (tmp_path / "a.json").write_text('[{"x": 1}, {"x": 2}]')
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert (
        read_json_records(tmp_path / "a.json")
        == read_json_records(tmp_path / "a.jsonl")
        == [{"x": 1}, {"x": 2}]
    )


def test_url_env_var_names():
    assert sources.url_env_var("instruction-preference") == "GPTFORGE_URL_INSTRUCTION_PREFERENCE"
