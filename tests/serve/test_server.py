"""`gptforge serve` end to end: a subprocess on 127.0.0.1, called with the official `openai` client and urllib.

Every wait is bounded in count and time; only 127.0.0.1 is used.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.generate import generate_text
from gptforge.model.tokenizer import Tokenizer
from gptforge.tasks.instruct import get_prompt_style

from .conftest import tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "sk-test-Zq81-never-logged"
TOK = Tokenizer()
ALPACA = get_prompt_style("alpaca")
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `gptforge serve` subprocess; its stderr goes to a log file the tests read."""

    def __init__(self, model_dir: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.pop(API_KEY_ENV, None)
        cmd = [sys.executable, "-m", "gptforge.cli", "serve", str(model_dir), "--port", str(self.port), *args]
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server not up in {timeout} s: {self.log.read_text()[-2000:]}")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


API_KEY_ENV = "GPTFORGE_API_KEY"


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None, timeout: float = 30):
    """(status, headers, JSON body) of a POST; HTTP errors are returned, not raised."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    lm = tiny_model(seed=1, context_length=256)
    save_checkpoint(lm, root / "lm", metadata={"prompt_style.json": ALPACA.to_dict()})
    clf = tiny_model(seed=2)
    clf.add_classification_head(2, {0: "ham", 1: "spam"})
    save_checkpoint(clf, root / "clf")
    small = tiny_model(seed=3, context_length=512, emb_dim=64, n_layers=4)  # slower steps: clear timing
    save_checkpoint(small, root / "small")
    return {"root": root, "lm": lm, "clf": clf, "small": small, "lora": lora_run(root)}


def lora_run(root: Path) -> Path:
    """A LoRA instruction run's output as the trainer writes it (`write_final`: adapter, prompt style and
    metrics in `final/`, the base left where it was); returns the run dir."""
    from gptforge.model.load import load_model
    from gptforge.model.lora import LoRAConfig, apply_lora, lora_modules
    from gptforge.pipeline.checkpoints import write_final

    save_checkpoint(tiny_model(seed=5, context_length=256), root / "base")
    model = apply_lora(load_model(root / "base"), LoRAConfig(r=4, alpha=8, targets="all"))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    run = root / "lora-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    write_final(run, model.eval(), {"prompt_style.json": ALPACA.to_dict()}, str(root / "base"), plot=False)
    return run


@pytest.fixture(scope="module")
def servers(dirs):
    """The three servers start together (each takes seconds to import torch and load)."""
    root = dirs["root"]
    started = {
        "lm": Server(root / "lm", root / "lm.log", "--api-key", KEY, "--max-batch", "16", "--name", "tiny"),
        "clf": Server(root / "clf", root / "clf.log", "--api-key", KEY),
        "small": Server(root / "small", root / "small.log", "--max-batch", "1", "--max-queue", "1"),
        "lora": Server(dirs["lora"] / "final", root / "lora.log", "--max-batch", "4"),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers["lm"].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(servers):
    s = servers["lm"]
    assert s.health()["status"] == "ok"
    req = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        data = json.loads(r.read())["data"]
    assert [(m["id"], m["context_length"], m["prompt_style"]) for m in data] == [("tiny", 256, "alpaca")]


def test_chat_completions_use_the_prompt_style_and_its_stops(client, dirs):
    record = {"instruction": "Summarize.", "input": "The cat sat on the mat."}
    messages = [
        {"role": "system", "content": record["instruction"]},
        {"role": "user", "content": record["input"]},
    ]
    want = generate_text(
        dirs["lm"], TOK, ALPACA.format_prompt(record), max_new_tokens=20, stop_strings=ALPACA.stop_strings
    )[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    n_prompt = len(TOK.encode(ALPACA.format_prompt(record)))
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= 20
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_completions_stream_and_sampling(client, dirs):
    prompt = "Once upon a time"
    want = generate_text(dirs["lm"], TOK, prompt, max_new_tokens=12)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(TOK.encode(prompt))
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want
    stop = want[3:6]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stop=[stop])
    assert r.choices[0].text == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=1.2, top_p=0.9, seed=5)
    a, b = client.completions.create(**kw, n=2), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and len(a.choices) == 2


def test_16_concurrent_clients_get_their_solo_greedy_answers(client, dirs, servers):
    prompts = [f"Story {i}: " + "the quick brown fox " * (i % 5) + "jumped" for i in range(16)]
    lengths = [4 + (i * 5) % 17 for i in range(16)]
    solo = [generate_text(dirs["lm"], TOK, p, max_new_tokens=n)[0] for p, n in zip(prompts, lengths)]

    def call(i):
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i])
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, range(16), timeout=120))
    assert got == solo
    assert servers["lm"].health()["widest_step"] >= 4  # the clients shared forward passes


def test_classify_and_generation_on_a_classifier(servers, dirs):
    from gptforge.pipeline.evaluate.inference import classify_texts

    url = servers["clf"].url
    texts = ["WINNER!! Claim your prize now", "see you at lunch"]
    status, _, body = post(url + "/v1/classify", {"input": texts})
    assert status == 200
    want = classify_texts(dirs["clf"], texts, device="cpu")
    assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
    for d, w in zip(body["data"], want):
        assert set(d["probabilities"]) == {"ham", "spam"}
        assert d["probabilities"]["spam"] == pytest.approx(w["probabilities"]["spam"], abs=1e-6)
    status, _, body = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "/v1/classify" in body["error"]["message"]
    status, _, body = post(servers["lm"].url + "/v1/classify", {"input": "x"})
    assert status == 400 and "/v1/chat/completions" in body["error"]["message"]


def test_a_lora_runs_final_dir_is_served_merged_onto_its_base(servers, dirs, capsys):
    from gptforge.cli import main
    from gptforge.model.checkpoint import load_checkpoint
    from gptforge.model.load import load_model

    final = dirs["lora"] / "final"
    assert (final / "adapter.json").is_file() and not (final / "model.safetensors").exists()
    merged, base = load_model(final), load_checkpoint(dirs["root"] / "base")
    record = {"instruction": "Name a color.", "input": ""}
    prompt = ALPACA.format_prompt(record)
    want = generate_text(merged, TOK, prompt, max_new_tokens=16, stop_strings=ALPACA.stop_strings)[0]
    plain = generate_text(base, TOK, prompt, max_new_tokens=16, stop_strings=ALPACA.stop_strings)[0]
    assert want != plain  # the adapter changes the answer, so a server ignoring it would be caught
    s = servers["lora"]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [(m.id, m.prompt_style) for m in client.models.list().data] == [("final", "alpaca")]
    r = client.chat.completions.create(
        model="final", messages=[{"role": "user", "content": record["instruction"]}], max_tokens=16
    )
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))
    raw = generate_text(merged, TOK, "Once upon a time", max_new_tokens=10)[0]
    stream = client.completions.create(model="final", prompt="Once upon a time", max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in stream) == raw
    # the run dir itself is refused with the path to serve instead
    assert main(["serve", str(dirs["lora"])]) == 2
    assert f"use its final checkpoint: {final}" in capsys.readouterr().err


def test_bad_requests_get_openai_errors(servers):
    url = servers["lm"].url
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(raw=b"{not json"), 400, None),
        (dict(body={"messages": msgs, "max_tokens": "ten"}), 400, "max_tokens"),
        (dict(body={"messages": msgs, "temperature": [1]}), 400, "temperature"),
        (dict(body={"messages": "hi"}), 400, "messages"),
        (dict(body={"messages": [{"role": "user", "content": "word " * 300}]}), 400, "messages"),
        (dict(body={"messages": msgs, "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={"messages": msgs, "max_tokens": 10_000}), 400, "max_tokens"),
        (dict(body={"messages": msgs, "model": "gpt-4"}), 404, "model"),
        (dict(body={"messages": msgs}, key=None), 401, None),
        (dict(body={"messages": msgs}, key="sk-wrong"), 401, None),
    ]
    for kw, status, param in cases:
        got, headers, body = post(chat, kw.get("body"), key=kw.get("key", KEY), raw=kw.get("raw"))
        assert got == status, (kw, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert err["param"] == param, (kw, body)
    _, _, body = post(chat, {"messages": [{"role": "user", "content": "word " * 300}]})
    assert "context window is 256 tokens" in body["error"]["message"]
    _, _, body = post(chat, {"messages": msgs, "max_tokens": 10_000})
    assert "max_tokens=10000 must be between 1 and" in body["error"]["message"]
    got, _, body = post(url + "/v1/nope", {})
    assert got == 404 and body["error"]["type"] == "not_found_error"
    assert KEY not in servers["lm"].log.read_text() and "sk-wrong" not in servers["lm"].log.read_text()


def test_overload_answers_429_and_nothing_hangs(servers):
    url = servers["small"].url + "/v1/completions"  # max_batch 1, max_queue 1
    body = {"prompt": "Hello there", "max_tokens": 200}
    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: post(url, body, key=None, timeout=60), range(6), timeout=120))
    statuses = sorted(r[0] for r in results)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    busy = next(r for r in results if r[0] == 429)
    assert busy[1]["Retry-After"] == "1" and busy[2]["error"]["code"] == "queue_full"
    assert time.monotonic() - start < 120


def _stream_first_chunk(base: str, body: dict, key: str | None = None):
    """Open a streaming completion over a raw connection; return it after the first event arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers)
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    return conn, resp


def test_a_client_disconnecting_mid_stream_frees_its_slot(servers):
    s = servers["small"]
    before = s.health()["finished"].get("cancelled", 0)
    conn, resp = _stream_first_chunk(s.url, {"prompt": "Hello", "max_tokens": 500})
    resp.close()
    conn.close()
    for _ in range(100):  # bounded: 10 s
        h = s.health()
        if h["running"] == 0 and h["finished"].get("cancelled", 0) > before:
            break
        time.sleep(0.1)
    assert h["running"] == 0 and h["finished"]["cancelled"] == before + 1
    # the freed slot takes the next request at once
    status, _, body = post(s.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key=None)
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


def test_sigterm_drains_in_flight_requests_and_exits_0(servers):
    s = servers["small"]
    conn, resp = _stream_first_chunk(s.url, {"prompt": "Hello", "max_tokens": 300})
    s.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()  # the stream runs to its end
    conn.close()
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0


def test_the_judge_runs_end_to_end_against_gptforge_serve(servers, tmp_path):
    """The evaluation stage's OpenAI judge client, pointed at a running server: replies are no scores,
    but the run completes and counts them."""
    recs = [
        {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Red."},
        {"instruction": "Add 2 and 2.", "input": "", "output": "4", "model_response": "5"},
    ]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(recs))
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "JUDGE_KEY": KEY}
    cmd = [sys.executable, "-m", "gptforge.cli", "evaluate", "--responses", str(path), "--out", str(out)]
    cmd += ["--no-progress", "--judge.backend", "openai", "--judge.url", servers["lm"].url + "/v1"]
    cmd += ["--judge.model", "tiny", "--judge.api-key-env", "JUDGE_KEY", "--judge.max-tokens", "8"]
    cmd += ["--judge.retries", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    judge = json.loads((out / "metrics.json").read_text())["judge"]
    assert judge["n_total"] == 2 and judge["n_failed"] == 0
    assert judge["n_scored"] + judge["n_unparseable"] == 2
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert all("reply" in j for j in judgments)
