"""Serving under concurrency: `gptforge serve` vs `transformers serve --continuous-batching`, same weights.

Both servers run as subprocesses on 127.0.0.1 at once: gptforge serves a gptforge checkpoint of random
weights, transformers the Hugging Face export of that same checkpoint (`gptforge.export.hf.export`).
Every request is the same on both sides: `POST /v1/completions`, streaming, greedy, a prompt of exactly
`prompt_len` tokens (distinct per request) and a fixed `max_tokens`. Neither server can be told to ignore
<|endoftext|> through /v1/completions, so the token counts are checked instead: every request's
`usage.completion_tokens` must equal `max_tokens` (a run where one stops early fails with its seed).

At each concurrency c, c client threads (one keep-alive connection each) send the round's requests one
after another; a round is timed from the first send to the last byte. Rounds alternate between the two
servers in ABBA order after a warm-up round each (transformers sizes its cache on the first request).
Reported: generated tokens/s of a round (median over rounds), and over every request of every timed
round, p50/p95 of time to first token (first streamed text) and of total latency.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, log, median, record

BASELINE = "transformers serve --continuous-batching (paged KV cache, sdpa)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def word_ids(tok) -> list[int]:
    """Ids of tokens that are one space + lowercase letters: any sequence of them re-encodes to itself."""
    out = []
    for t in range(50000):
        s = tok.decode([t])
        if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and s[1:].islower():
            out.append(t)
    return out


def make_prompts(n: int, length: int, seed: int) -> list[str]:
    """`n` distinct prompts of exactly `length` GPT-2 tokens (checked by re-encoding)."""
    from gptforge.model.tokenizer import Tokenizer

    tok = Tokenizer()
    words = word_ids(tok)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = tok.decode([rng.choice(words) for _ in range(length)])
        assert len(tok.encode(text)) == length, "a word-token prompt did not re-encode to its length"
        prompts.append(text)
    return prompts


class ServerProc:
    """A server subprocess; its output goes to a log file shown when it fails."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict) -> None:
        self.name, self.log_path = name, log_path
        self.port = int(cmd[cmd.index("--port") + 1])
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def stream_completion(conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: send time, first-text time, end time, text, usage's token count."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first, parts, tokens = None, [], None
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            continue
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(f"stream error: {obj['error']}")
        for ch in obj.get("choices") or []:
            if ch.get("text"):
                if first is None:
                    first = time.perf_counter()
                parts.append(ch["text"])
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {
        "t0": t0,
        "ttft": (first or end) - t0,
        "latency": end - t0,
        "tokens": tokens,
        "text": "".join(parts),
    }


def run_round(port: int, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send `prompts` with `concurrency` clients; the round's wall time, tokens and per-request records."""
    work = list(enumerate(prompts))
    lock = threading.Lock()
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    if not work or errors:
                        return
                    i, p = work.pop(0)
                try:
                    results[i] = stream_completion(conn, p, max_tokens)
                except Exception as e:  # noqa: BLE001 - reported after the round
                    errors.append(f"request {i}: {type(e).__name__}: {e}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    reqs = [r for r in results if r is not None]
    return {"wall": wall, "tokens": sum(r["tokens"] or 0 for r in reqs), "requests": reqs}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def build_dirs(preset: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A gptforge checkpoint of random weights and its Hugging Face export (verified by reloading)."""
    from gptforge.export.hf import export
    from gptforge.model.checkpoint import save_checkpoint
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset(preset)).eval()
    ours, hf = root / f"{preset}-gptforge", root / f"{preset}-hf"
    save_checkpoint(model, ours)
    export(model, hf, overwrite=True)
    return ours, hf


def transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else (shutil.which("transformers") or "transformers")


def start_servers(
    preset: str,
    ours: Path,
    hf: Path,
    root: Path,
    max_batch: int,
    cb_blocks: int,
    cb_batch_tokens: int,
    device: str,
) -> dict[str, ServerProc]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    p1, p2 = free_port(), free_port()
    gf_cmd = [sys.executable, "-m", "gptforge.cli", "serve", str(ours), "--port", str(p1), "--device", device]
    gf_cmd += ["--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    # transformers sizes a CPU KV cache from 60% of the machine's free memory unless told (11.5 GB of resident
    # memory for cpu-tiny on this 23 GB machine, and 23 s to set it up): give it the blocks the run needs.
    tf_cmd = [transformers_cli(), "serve", str(hf), "--continuous-batching", "--host", "127.0.0.1"]
    tf_cmd += ["--port", str(p2), "--device", device, "--attn-implementation", "sdpa"]
    tf_cmd += ["--cb-num-blocks", str(cb_blocks), "--cb-max-batch-tokens", str(cb_batch_tokens)]
    tf_cmd += ["--log-level", "error"]
    servers = {
        "gptforge": ServerProc("gptforge serve", gf_cmd, root / f"{preset}-gptforge.log", env),
        "transformers": ServerProc("transformers serve", tf_cmd, root / f"{preset}-transformers.log", env),
    }
    try:
        for s in servers.values():
            s.wait_ready()
    except Exception:
        for s in servers.values():
            s.stop()
        raise
    return servers


def run(
    presets: list[str],
    concurrency: list[int],
    prompt_len: int,
    max_tokens: dict[str, int],
    requests: dict[int, int],
    reps: int,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict]:
    def _term(signum, frame):  # a killed benchmark must not leave its two servers running
        raise SystemExit(f"bench_serve: stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _term)
    try:
        return _run(presets, concurrency, prompt_len, max_tokens, requests, reps, device, seed)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    presets: list[str],
    concurrency: list[int],
    prompt_len: int,
    max_tokens: dict[str, int],
    requests: dict[int, int],
    reps: int,
    device: str,
    seed: int,
) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-serve-") as tmp:
        root = Path(tmp)
        for preset in presets:
            n_tok = max_tokens[preset]
            log(f"serve: {preset}: writing the checkpoint and its Hugging Face export ...")
            ours, hf = build_dirs(preset, root, seed)
            top = max(concurrency)
            # one 256-token page holds a request (prompt + completion) here; twice the batch leaves the
            # scheduler its safety margin
            assert prompt_len + n_tok <= 256
            setup = {
                "gptforge_max_batch": top,
                "cb_num_blocks": 2 * top + 4,
                "cb_max_batch_tokens": top * (prompt_len + 1),
            }
            servers = start_servers(
                preset,
                ours,
                hf,
                root,
                top,
                cb_blocks=setup["cb_num_blocks"],
                cb_batch_tokens=setup["cb_max_batch_tokens"],
                device=device,
            )
            try:
                rows += _measure(preset, servers, concurrency, prompt_len, n_tok, requests, reps, seed, setup)
            finally:
                for s in servers.values():
                    s.stop()
    return rows


def _measure(
    preset: str,
    servers: dict[str, ServerProc],
    concurrency: list[int],
    prompt_len: int,
    n_tok: int,
    requests: dict[int, int],
    reps: int,
    seed: int,
    setup: dict,
) -> list[dict]:
    names = list(servers)
    warm = make_prompts(max(concurrency), prompt_len, seed + 999)
    for n in names:  # transformers builds its cache and batch processor on the first request; then
        log(f"serve: {preset}: warming up {n} ...")  # each batch width once, both sides alike
        for c in concurrency[::-1]:
            run_round(servers[n].port, warm[:c], c, 8)
    rss = {n: s.rss_mib() for n, s in servers.items()}
    rows = []
    for c in concurrency:
        prompts = make_prompts(requests[c], prompt_len, seed + c)
        rounds: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(reps):
            for n in names if r % 2 == 0 else names[::-1]:
                rounds[n].append(run_round(servers[n].port, prompts, c, n_tok))
        short = {
            n: sorted({q["tokens"] for rd in rs for q in rd["requests"] if q["tokens"] != n_tok})
            for n, rs in rounds.items()
        }
        if any(short.values()):
            raise RuntimeError(
                f"serve: {preset} c={c}: completions shorter than max_tokens={n_tok} (token counts "
                f"{short}): a request hit <|endoftext|>; rerun with another --seed"
            )
        tps = {n: [rd["tokens"] / rd["wall"] for rd in rs] for n, rs in rounds.items()}
        reqs = {n: [q for rd in rs for q in rd["requests"]] for n, rs in rounds.items()}
        ttft = {n: [q["ttft"] for q in qs] for n, qs in reqs.items()}
        lat = {n: [q["latency"] for q in qs] for n, qs in reqs.items()}
        texts = {n: [q["text"] for q in rounds[n][-1]["requests"]] for n in names}
        same = sum(a == b for a, b in zip(texts["gptforge"], texts["transformers"])) / len(prompts)
        label = f"{preset}, concurrency {c}"
        common = dict(
            concurrency=c,
            requests_per_round=len(prompts),
            prompt_tokens=prompt_len,
            max_tokens=n_tok,
            rounds=reps,
            same_text_share=round(same, 3),
            server_rss_mib=rss,
            server_settings=setup,
        )
        targets = {"tokens/s": 1.5 if c == max(concurrency) and c >= 16 else None}
        if c == 1:
            targets.update({"TTFT p50 s": 1.0, "latency p50 s": 1.0})
        tp = {n: median(v) for n, v in tps.items()}
        rows.append(
            record(
                "serve",
                label,
                "tokens/s",
                tp["gptforge"],
                tp["transformers"],
                BASELINE,
                higher_is_better=True,
                target=targets["tokens/s"],
                samples=tps,
                **common,
            )
        )
        for metric, xs in (("TTFT", ttft), ("latency", lat)):
            for q in (50, 95):
                m = f"{metric} p{q} s"
                rows.append(
                    record(
                        "serve",
                        label,
                        m,
                        round(_pct(xs["gptforge"], q), 4),
                        round(_pct(xs["transformers"], q), 4),
                        BASELINE,
                        higher_is_better=False,
                        target=targets.get(m),
                        **common,
                    )
                )
        log(
            f"serve: {label}: tokens/s gptforge {tp['gptforge']:.1f} vs transformers {tp['transformers']:.1f}; "
            f"TTFT p50 {_pct(ttft['gptforge'], 50):.3f} vs {_pct(ttft['transformers'], 50):.3f} s; latency p50 "
            f"{_pct(lat['gptforge'], 50):.3f} vs {_pct(lat['transformers'], 50):.3f} s; same text {same:.0%}"
        )
    return rows
