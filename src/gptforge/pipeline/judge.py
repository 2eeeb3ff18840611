"""LLM-as-judge scoring of instruction responses, over plain HTTP (stdlib urllib, no SDK).

Two wire formats cover the servers people run: Ollama's native `/api/chat` and the OpenAI-compatible
`/v1/chat/completions` (vLLM, llama.cpp server, Ollama's /v1, OpenAI itself). Unlike the reference, which
silently skips replies it cannot parse, every judgment is kept with its raw reply and status, and the
mean is always reported with the number of scores it averages.

API keys are read from an environment variable named in the config; only the variable's name is ever
stored, and the key is redacted from every recorded reply and error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Protocol

from gptforge.errors import ConfigError, GPTForgeError
from gptforge.schema import from_dict
from gptforge.tasks.instruct import alpaca_instruction

BACKENDS = ("ollama", "openai")
DEFAULT_URLS = {"ollama": "http://localhost:11434", "openai": "http://localhost:8000/v1"}

# The reference's 0-100 judging prompt (LLMs-from-scratch ch07), with named fields.
DEFAULT_TEMPLATE = (
    "Given the input `{prompt}` "
    "and correct output `{output}`, "
    "score the model response `{model_response}`"
    " on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)
TEMPLATE_FIELDS = ("prompt", "instruction", "input", "output", "model_response")


@dataclass
class JudgeConfig:
    """Where the judge runs and how it is asked. Only the *name* of the API key variable is stored."""

    backend: str = "ollama"
    """ollama (native /api/chat) or openai (any /v1/chat/completions server)."""
    model: str = "llama3"
    """Judge model name."""
    url: str | None = None
    """Server base URL (null: http://localhost:11434 for ollama, http://localhost:8000/v1 for openai)."""
    api_key_env: str | None = None
    """Environment variable holding the API key, e.g. OPENAI_API_KEY (sent as a Bearer token, never written)."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template with {prompt} {instruction} {input} {output} {model_response}."""
    concurrency: int = 4
    """Requests in flight at once."""
    timeout: float = 120.0
    """Seconds per request."""
    retries: int = 3
    """Extra attempts after a timeout, connection error, 429 or 5xx."""
    backoff: float = 1.0
    """First retry delay in seconds, doubling (capped at 60 s)."""
    temperature: float = 0.0
    """Sampling temperature sent to the server."""
    seed: int = 123
    """Sampling seed sent to the server."""
    num_ctx: int = 2048
    """Ollama only: context window."""
    max_tokens: int | None = None
    """OpenAI only: cap on the reply length."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"judge.backend={self.backend!r} is not supported; use one of {BACKENDS}")
        if not self.model:
            raise ConfigError("judge.model is empty; name the judge model (e.g. llama3)")
        if self.concurrency < 1:
            raise ConfigError(f"judge.concurrency={self.concurrency} must be at least 1")
        if self.timeout <= 0:
            raise ConfigError(f"judge.timeout={self.timeout} must be positive (seconds)")
        if self.retries < 0 or self.backoff < 0:
            raise ConfigError(f"judge.retries={self.retries} and judge.backoff={self.backoff} must be >= 0")
        url = self.base_url
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"judge.url={url!r} must start with http:// or https://")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        unknown = sorted(fields - set(TEMPLATE_FIELDS))
        if unknown:
            raise ConfigError(
                f"judge.template uses unknown fields {unknown}; available: {list(TEMPLATE_FIELDS)} "
                "(write literal braces as {{ and }})"
            )

    @property
    def base_url(self) -> str:
        return (self.url or DEFAULT_URLS[self.backend]).rstrip("/")

    @property
    def endpoint(self) -> str:
        """The chat URL: a base URL gets the backend's path appended unless it already ends with it."""
        suffix = "/api/chat" if self.backend == "ollama" else "/chat/completions"
        base = self.base_url
        return base if base.endswith(suffix) else base + suffix

    def api_key(self) -> str | None:
        """The key from the environment, or None when no variable is configured."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"judge.api_key_env={self.api_key_env}: the environment variable is not set; "
                f"export {self.api_key_env}=... or drop --judge.api-key-env for a server without auth"
            )
        return key

    def to_dict(self) -> dict:
        """Safe to write: no key, and user:password stripped from the URL."""
        d = dataclasses.asdict(self)
        d["url"] = redact_url(self.base_url)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> JudgeConfig:
        """A `judge:` mapping, keys and types checked (nested under `judge.` in messages)."""
        return from_dict(cls, d, where=where, prefix="judge.")


def redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts)


# -- score parsing ----------------------------------------------------------------------------------
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)")


def parse_score(reply: str | None) -> int | None:
    """The first number in `reply` if it is an integer in 0..100, else None.

    Tolerates "85", "Score: 85", "85/100", "**85**", "85.0" and a leading <think>...</think> block;
    rejects "150", "-3", "8.5" and replies without a number rather than guessing.
    """
    if not reply:
        return None
    text = _THINK.sub(" ", reply)
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    if not value.is_integer() or not 0 <= value <= 100:
        return None
    return int(value)


# -- HTTP clients -----------------------------------------------------------------------------------
class JudgeRequestError(Exception):
    """One request failed; `retryable` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ChatClient(Protocol):
    def chat(self, prompt: str) -> str: ...


def post_json(url: str, payload: dict, headers: dict[str, str], timeout: float) -> dict:
    """POST JSON, return the decoded JSON reply; failures become JudgeRequestError."""
    data = json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace").strip()
        retryable = e.code in (408, 429) or e.code >= 500
        raise JudgeRequestError(f"HTTP {e.code} from {redact_url(url)}: {detail}", retryable) from None
    except TimeoutError:
        raise JudgeRequestError(f"timeout after {timeout:g}s from {redact_url(url)}", True) from None
    except urllib.error.URLError as e:
        retryable = not isinstance(e.reason, ValueError)
        if isinstance(e.reason, TimeoutError):
            raise JudgeRequestError(f"timeout after {timeout:g}s from {redact_url(url)}", True) from None
        raise JudgeRequestError(f"cannot reach {redact_url(url)}: {e.reason}", retryable) from None
    except (ConnectionError, OSError) as e:
        raise JudgeRequestError(f"connection to {redact_url(url)} failed: {e}", True) from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        snippet = body[:200].decode("utf-8", "replace")
        raise JudgeRequestError(f"reply from {redact_url(url)} is not JSON: {snippet!r}", True) from None


class OllamaClient:
    """Ollama's native chat API: one non-streamed reply, sampling settings inside `options`."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg

    def chat(self, prompt: str) -> str:
        c = self.cfg
        payload = {
            "model": c.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": False,
            "options": {"temperature": c.temperature, "seed": c.seed, "num_ctx": c.num_ctx},
        }
        key = c.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = post_json(c.endpoint, payload, headers, c.timeout)
        try:
            return str(reply["message"]["content"])
        except (KeyError, TypeError):
            raise JudgeRequestError(
                f"Ollama reply has no message.content: {str(reply)[:200]}", False
            ) from None


class OpenAIClient:
    """Any OpenAI-compatible /v1/chat/completions server."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg

    def chat(self, prompt: str) -> str:
        c = self.cfg
        payload: dict = {
            "model": c.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": c.temperature,
            "seed": c.seed,
            "stream": False,
        }
        if c.max_tokens is not None:
            payload["max_tokens"] = c.max_tokens
        key = c.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = post_json(c.endpoint, payload, headers, c.timeout)
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeRequestError(
                f"OpenAI-style reply has no choices[0].message.content: {str(reply)[:200]}", False
            ) from None


def make_client(cfg: JudgeConfig) -> ChatClient:
    return OllamaClient(cfg) if cfg.backend == "ollama" else OpenAIClient(cfg)


def call_with_retries(
    fn: Callable[[], str], retries: int, backoff: float, sleep: Callable[[float], None] = time.sleep
) -> tuple[str, int]:
    """Run `fn`, retrying retryable failures with exponential backoff; returns (reply, attempts)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except JudgeRequestError as e:
            if not e.retryable or attempt > retries:
                e.attempts = attempt  # type: ignore[attr-defined]
                raise
            sleep(min(backoff * 2 ** (attempt - 1), 60.0))


# -- judging a set of records ---------------------------------------------------------------------
def build_prompt(entry: dict, template: str = DEFAULT_TEMPLATE, response_key: str = "model_response") -> str:
    fields = {
        "prompt": alpaca_instruction(entry),
        "instruction": entry.get("instruction", ""),
        "input": entry.get("input", ""),
        "output": entry.get("output", ""),
        "model_response": entry.get(response_key, ""),
    }
    return template.format(**fields)


def _redactor(secret: str | None) -> Callable[[str | None], str | None]:
    def redact(text: str | None) -> str | None:
        if text is None or not secret:
            return text
        return text.replace(secret, "[REDACTED]")

    return redact


def judge_records(
    records: Sequence[dict],
    cfg: JudgeConfig,
    *,
    response_key: str = "model_response",
    client: ChatClient | None = None,
    progress: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[dict], dict]:
    """Score every record with the judge; returns (judgments in record order, summary).

    A judgment's status is "ok" (score parsed), "unparseable" (reply without a valid 0-100 integer)
    or "failed" (no reply after retries). The summary's mean is over the "ok" ones and says how many.
    """
    client = client or make_client(cfg)
    redact = _redactor(cfg.api_key())
    judgments: list[dict | None] = [None] * len(records)

    def one(i: int) -> dict:
        prompt = build_prompt(records[i], cfg.template, response_key)
        start = time.perf_counter()
        out: dict = {"index": i, "score": None, "status": "failed", "reply": None, "error": None}
        try:
            reply, attempts = call_with_retries(lambda: client.chat(prompt), cfg.retries, cfg.backoff, sleep)
            score = parse_score(reply)
            out.update(reply=redact(reply), score=score, status="ok" if score is not None else "unparseable")
            if score is None:
                out["error"] = "no integer 0-100 in the reply"
        except JudgeRequestError as e:
            attempts = getattr(e, "attempts", 1)
            out["error"] = redact(str(e))
        out["attempts"] = attempts
        out["seconds"] = round(time.perf_counter() - start, 3)
        out["prompt"] = prompt
        return out

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc=f"judge {cfg.model}", unit="rec")
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge") as pool:
        futures = [pool.submit(one, i) for i in range(len(records))]
        for fut in as_completed(futures):
            j = fut.result()
            judgments[j["index"]] = j  # only this thread writes here; the workers just return
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    done = [j for j in judgments if j is not None]
    return done, summarize_judgments(done, cfg)


def summarize_judgments(judgments: Sequence[dict], cfg: JudgeConfig | None = None) -> dict:
    """Counts by status, the mean over the scored ones, and the most common cause of the failed ones."""
    scores = [j["score"] for j in judgments if j["status"] == "ok"]
    errors = Counter(j["error"] for j in judgments if j["status"] == "failed")
    summary = {
        "n_total": len(judgments),
        "n_scored": len(scores),
        "n_unparseable": sum(j["status"] == "unparseable" for j in judgments),
        "n_failed": sum(j["status"] == "failed" for j in judgments),
        "mean_score": (sum(scores) / len(scores)) if scores else None,
        "error": errors.most_common(1)[0][0] if errors else None,
    }
    if cfg is not None:
        summary["config"] = cfg.to_dict()
    return summary


class JudgeError(GPTForgeError):
    """No judgment came back: the judge server cannot be reached or refuses every request."""


def check_judgments(summary: dict, judgments_file: str | os.PathLike) -> None:
    """Name failed requests and their cause on stderr; raise `JudgeError` when every one failed.

    A judge that answered nothing must not pass for an evaluation that ran: its mean would be silently
    missing. `judgments_file` (already written) holds each request's error.
    """
    n_failed, n_total = summary["n_failed"], summary["n_total"]
    if not n_failed:
        return
    url = (summary.get("config") or {}).get("url", "the judge")
    cause = summary.get("error") or "unknown error"
    if n_failed < n_total:
        print(
            f"judge: {n_failed} of {n_total} requests to {url} failed: {cause} (see {judgments_file})",
            file=sys.stderr,
        )
        return
    raise JudgeError(
        f"judge at {url}: all {n_total} requests failed: {cause}; is the judge server running there? "
        f"start it or set --judge.url (judge.url in a pipeline file); each error is in {judgments_file}"
    )
