"""Judge clients against a real HTTP server on 127.0.0.1 speaking the Ollama and OpenAI chat formats."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptforge.errors import ConfigError
from gptforge.pipeline.judge import (
    DEFAULT_TEMPLATE,
    JudgeConfig,
    JudgeRequestError,
    build_prompt,
    call_with_retries,
    judge_records,
    parse_score,
)
from gptforge.tasks.instruct import alpaca_instruction, get_prompt_style

SECRET = "sk-test-SECRET-0123456789"


class FakeJudge:
    """A chat server whose reply depends on a marker in the judged response text."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.requests: list[dict] = []  # {"path", "body", "auth"}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                    outer.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                self.counted = True
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    self._done()

            def _done(self):
                # a request stops counting before its reply is sent: once the client has the reply it may
                # send the next one, which must not find this one still counted
                if self.counted:
                    self.counted = False
                    with outer.lock:
                        outer.active -= 1

            def _answer(self, body):
                prompt = body["messages"][0]["content"]
                marker = next(
                    m for m in ("GOOD", "GARBAGE", "ERROR500", "FLAKY", "SLOW", "ECHOKEY") if m in prompt
                )
                with outer.lock:
                    outer.hits[marker] = outer.hits.get(marker, 0) + 1
                    n = outer.hits[marker]
                time.sleep(outer.delay)
                if marker == "ERROR500" or (marker == "FLAKY" and n == 1):
                    return self._send(
                        500, {"error": f"overloaded, your key {self.headers.get('Authorization')}"}
                    )
                if marker == "SLOW":
                    time.sleep(1.0)
                content = {
                    "GOOD": "Score: 85",
                    "FLAKY": "70/100",
                    "GARBAGE": "I would rather not say.",
                    "SLOW": "90",
                    "ECHOKEY": f"60 (you sent {self.headers.get('Authorization')})",
                }[marker]
                if self.path == "/api/chat":
                    reply = {
                        "model": body["model"],
                        "message": {"role": "assistant", "content": content},
                        "done": True,
                    }
                else:
                    reply = {
                        "id": "x",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    }
                self._send(200, reply)

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self._done()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeJudge()
    yield s
    s.close()


def records(*markers: str) -> list[dict]:
    return [
        {"instruction": f"Task {i}", "input": "" if i % 2 else "x", "output": "ref", "model_response": m}
        for i, m in enumerate(markers)
    ]


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("**100**", 100),
        ("0", 0),
        ("85.0", 85),
        ("<think>maybe 20?</think>\n77", 77),
        ("150", None),
        ("-3", None),
        ("8.5", None),
        ("no idea", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_default_prompt_is_the_reference_template():
    entry = {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Red."}
    expected = (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Blue.`, score the model "
        "response `Red.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )
    assert build_prompt(entry, DEFAULT_TEMPLATE) == expected
    assert alpaca_instruction({"instruction": "I", "input": "X"}).endswith(
        "### Instruction:\nI\n\n### Input:\nX"
    )
    # the judge is shown the prompt the alpaca style trains with, up to its response header
    rec = {"instruction": "I", "input": "X"}
    assert get_prompt_style("alpaca").format_prompt(rec) == alpaca_instruction(rec) + "\n\n### Response:\n"
    assert build_prompt(entry, "{instruction}|{output}|{model_response}") == "Name a color.|Blue.|Red."


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown fields \\['answer'\\]"):
        JudgeConfig(template="score {answer}")
    with pytest.raises(ConfigError, match="judge.backend"):
        JudgeConfig(backend="anthropic")
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        JudgeConfig(backend="openai", api_key_env="NO_SUCH_KEY_VAR").api_key()
    assert JudgeConfig(backend="openai", url="http://h:1/v1").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig(url="http://h:1/").endpoint == "http://h:1/api/chat"
    assert JudgeConfig(url="http://u:pw@h:1").to_dict()["url"] == "http://h:1"


def test_backoff_doubles_and_stops_after_retries():
    waits: list[float] = []
    calls = 0

    def fail():
        nonlocal calls
        calls += 1
        raise JudgeRequestError("HTTP 500", retryable=True)

    with pytest.raises(JudgeRequestError):
        call_with_retries(fail, retries=3, backoff=0.5, sleep=waits.append)
    assert calls == 4 and waits == [0.5, 1.0, 2.0]

    def bad_request():
        raise JudgeRequestError("HTTP 400", retryable=False)

    waits.clear()
    with pytest.raises(JudgeRequestError):
        call_with_retries(bad_request, retries=3, backoff=0.5, sleep=waits.append)
    assert waits == []


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_good_garbage_500_flaky(server, backend):
    url = server.url + ("/v1" if backend == "openai" else "")
    cfg = JudgeConfig(backend=backend, model="judge-m", url=url, retries=2, backoff=0.01, timeout=5, seed=7)
    judgments, summary = judge_records(records("GOOD", "GARBAGE", "ERROR500", "FLAKY", "GOOD"), cfg)
    assert [j["status"] for j in judgments] == ["ok", "unparseable", "failed", "ok", "ok"]
    assert [j["score"] for j in judgments] == [85, None, None, 70, 85]
    assert judgments[1]["reply"] == "I would rather not say."
    assert "HTTP 500" in judgments[2]["error"] and judgments[2]["attempts"] == 3
    assert judgments[3]["attempts"] == 2  # 500 once, then a good reply
    assert server.hits["ERROR500"] == 3 and server.hits["FLAKY"] == 2
    assert summary == {
        "n_total": 5,
        "n_scored": 3,
        "n_unparseable": 1,
        "n_failed": 1,
        "mean_score": pytest.approx(80.0),
        "error": judgments[2]["error"],
        "config": cfg.to_dict(),
    }
    body = server.requests[0]["body"]
    assert body["model"] == "judge-m" and body["stream"] is False
    if backend == "ollama":
        assert server.requests[0]["path"] == "/api/chat"
        assert body["options"] == {"temperature": 0.0, "seed": 7, "num_ctx": 2048}
    else:
        assert server.requests[0]["path"] == "/v1/chat/completions"
        assert body["temperature"] == 0.0 and body["seed"] == 7
    assert all(r["auth"] is None for r in server.requests)


def test_timeout_is_retried_then_failed(server):
    cfg = JudgeConfig(url=server.url, timeout=0.3, retries=1, backoff=0.01)
    start = time.perf_counter()
    judgments, summary = judge_records(records("SLOW"), cfg)
    elapsed = time.perf_counter() - start
    assert judgments[0]["status"] == "failed" and "timeout" in judgments[0]["error"]
    assert judgments[0]["attempts"] == 2 and server.hits["SLOW"] == 2
    assert summary["n_failed"] == 1 and summary["mean_score"] is None
    assert elapsed < 1.5  # two 0.3 s timeouts, not two full 1 s replies


def test_concurrency_limit_is_respected():
    server = FakeJudge(delay=0.15)
    try:
        cfg = JudgeConfig(backend="openai", url=server.url + "/v1", concurrency=3, timeout=5)
        judgments, summary = judge_records(records(*["GOOD"] * 10), cfg)
    finally:
        server.close()
    assert summary["n_scored"] == 10 and summary["mean_score"] == 85
    assert [j["index"] for j in judgments] == list(range(10))
    assert 2 <= server.max_active <= 3


def test_api_key_is_sent_but_never_recorded(server, monkeypatch):
    monkeypatch.setenv("GPTFORGE_TEST_JUDGE_KEY", SECRET)
    cfg = JudgeConfig(
        backend="openai", url=server.url + "/v1", api_key_env="GPTFORGE_TEST_JUDGE_KEY", retries=0, backoff=0
    )
    judgments, summary = judge_records(records("ECHOKEY", "ERROR500"), cfg)
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert judgments[0]["score"] == 60 and "[REDACTED]" in judgments[0]["reply"]
    assert "[REDACTED]" in judgments[1]["error"]
    assert SECRET not in json.dumps([judgments, summary])
    assert summary["config"]["api_key_env"] == "GPTFORGE_TEST_JUDGE_KEY"


def test_cli_judge_end_to_end_never_writes_the_key(server, monkeypatch, tmp_path, capsys):
    from gptforge.cli import main

    monkeypatch.setenv("GPTFORGE_TEST_JUDGE_KEY", SECRET)
    recs = records("GOOD", "ECHOKEY", "GARBAGE", "ERROR500")
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(recs))
    out = tmp_path / "eval"
    argv = ["evaluate", "--responses", str(path), "--out", str(out), "--no-progress"]
    argv += ["--judge.backend", "openai", "--judge.url", server.url + "/v1", "--judge.model", "m"]
    argv += ["--judge.api-key-env", "GPTFORGE_TEST_JUDGE_KEY", "--judge.retries", "1", "--judge.backoff", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "judge: mean score 72.50 over n=2 of 4 (1 unparseable, 1 failed)" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["mean_score"] == 72.5 and metrics["judge"]["n_scored"] == 2
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert [j["status"] for j in judgments] == ["ok", "ok", "unparseable", "failed"]
    assert judgments[2]["reply"] == "I would rather not say."
    assert "n=2 of 4 records; 1 unparseable and 1 failed" in (out / "report.md").read_text()
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 7
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in printed.out + printed.err

    monkeypatch.delenv("GPTFORGE_TEST_JUDGE_KEY")
    assert main(argv + ["--out", str(tmp_path / "again")]) == 2
    assert "GPTFORGE_TEST_JUDGE_KEY: the environment variable is not set" in capsys.readouterr().err


def test_cli_template_file(server, tmp_path):
    from gptforge.cli import main

    (tmp_path / "t.txt").write_text("Rate `{model_response}` against `{output}` for: {instruction}")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records("GOOD")))
    argv = ["evaluate", "--responses", str(path), "--out", str(tmp_path / "e"), "--no-progress"]
    assert main(argv + ["--judge.url", server.url, "--judge.template-file", str(tmp_path / "t.txt")]) == 0
    assert server.requests[0]["body"]["messages"][0]["content"] == "Rate `GOOD` against `ref` for: Task 0"
    (tmp_path / "bad.txt").write_text("Rate {answer}")
    assert main(argv + ["--judge.url", server.url, "--judge.template-file", str(tmp_path / "bad.txt")]) == 2


def closed_port() -> int:
    """A localhost port nothing listens on: bound, then closed."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_judge_fails_with_the_cause(tmp_path, capsys):
    """Every request failed: exit 2, one line naming the URL, the cause and the fix; no mean anywhere;
    judgments.jsonl still says why for each record."""
    from gptforge.cli import main

    port = closed_port()
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records("GOOD", "GOOD", "GOOD", "GOOD", "GOOD")))
    out = tmp_path / "eval"
    url = f"http://127.0.0.1:{port}/v1"
    argv = ["evaluate", "--responses", str(path), "--out", str(out), "--no-progress"]
    argv += ["--judge.backend", "openai", "--judge.url", url, "--judge.retries", "0"]
    assert main(argv) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1, printed.err
    line = lines[0]
    assert line.startswith(
        f"gptforge evaluate: error: judge at {url}: all 5 requests failed: cannot reach {url}"
    )
    assert "Connection refused" in line and "is the judge server running" in line and "--judge.url" in line
    assert "mean score" not in printed.out
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert [j["status"] for j in judgments] == ["failed"] * 5
    assert all("Connection refused" in j["error"] for j in judgments)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["mean_score"] is None and metrics["judge"]["n_failed"] == 5
    assert "Connection refused" in metrics["judge"]["error"]


def test_cli_judge_password_in_url_is_redacted(tmp_path, capsys):
    from gptforge.cli import main

    port = closed_port()
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records("GOOD")))
    argv = ["evaluate", "--responses", str(path), "--out", str(tmp_path / "e"), "--no-progress"]
    argv += ["--judge.url", f"http://me:{SECRET}@127.0.0.1:{port}", "--judge.retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"judge at http://127.0.0.1:{port}: all 1 requests failed" in err and SECRET not in err
    for p in (tmp_path / "e").iterdir():
        assert SECRET.encode() not in p.read_bytes(), p


def test_cli_judge_partial_failure_names_count_and_cause(tmp_path, capsys):
    """A server that fails every other request: the evaluation succeeds, and the failures are counted
    with their cause on stderr."""
    from gptforge.cli import main

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            if len(seen) % 2 == 0:
                code, obj = 503, {"error": "busy, try later"}
            else:
                code, obj = 200, {"choices": [{"message": {"role": "assistant", "content": "80"}}]}
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        path = tmp_path / "responses.json"
        path.write_text(json.dumps(records(*["GOOD"] * 6)))
        out = tmp_path / "eval"
        argv = ["evaluate", "--responses", str(path), "--out", str(out), "--no-progress"]
        argv += ["--judge.backend", "openai", "--judge.url", url, "--judge.retries", "0"]
        argv += ["--judge.concurrency", "1"]
        assert main(argv) == 0
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr()
    assert len(seen) == 6
    assert "judge: mean score 80.00 over n=3 of 6 (0 unparseable, 3 failed)" in printed.out
    assert (
        f"judge: 3 of 6 requests to {url} failed: HTTP 503 from {url}/chat/completions: "
        '{"error": "busy, try later"}' in printed.err
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["mean_score"] == 80 and metrics["judge"]["n_failed"] == 3
    assert "most common cause: `HTTP 503 from" in (out / "report.md").read_text()
