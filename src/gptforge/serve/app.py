"""The OpenAI-compatible HTTP API (FastAPI) over the engine; `run` serves it with uvicorn.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both also as
server-sent events with `stream: true`), POST /v1/classify (classifiers). Every error is OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the status a client can act on (400 bad request,
401 key, 404 model, 429 queue full with Retry-After, 503 shutting down).

Chat messages become a prompt by `export.chat_template`'s rule (the same one the exported Jinja
template applies): with a prompt style, the last user message is the instruction (or, after a system
message, the system message is the instruction and the user message its input); without one, the plain
"Role: content" format. Replies are cut at the style's stop strings and <|endoftext|>, as evaluation does.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptforge.errors import ConfigError
from gptforge.export.chat_template import PLAIN_STOP_STRINGS, messages_to_record, render_plain
from gptforge.machine import on_a_thread_that_ends
from gptforge.serve.engine import EOT_ID, Engine, EngineError, Request, SamplingParams

log = logging.getLogger("gptforge.serve")

API_KEY_ENV = "GPTFORGE_API_KEY"
MAX_STOP = 4
MAX_N = 8
CHAT_PAGE = Path(__file__).with_name("chat.html")


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """What the server serves: a model, its name, its tokenizer and (instruction models) its style."""

    model: Any
    name: str
    tokenizer: Any
    style: Any = None  # tasks.instruct.PromptStyle, or None (plain chat format)
    engine: Engine | None = None  # None for a classifier
    created: int = 0

    @property
    def is_classifier(self) -> bool:
        return bool(self.model.cfg.num_labels)


def load_served(
    path: str | os.PathLike,
    *,
    device: str | None = None,
    name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 32,
) -> Served:
    """Open a gptforge checkpoint, LoRA adapter dir or Hugging Face GPT-2 dir, and build its engine."""
    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.hf import from_hf
    from gptforge.model.load import is_model_dir, load_model
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.tasks.instruct import get_prompt_style

    p = Path(path)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if is_model_dir(p):
        load = functools.partial(load_model, p, device=dev)
    elif (p / "config.json").is_file():
        load = functools.partial(from_hf, p, device=dev)
    else:
        raise ConfigError(
            f"model={path}: not a gptforge checkpoint, LoRA adapter dir or Hugging Face GPT-2 dir "
            "(no config.json or adapter.json there)"
        )
    model = on_a_thread_that_ends(load)  # the engine's thread then holds the only OpenMP pool
    style_dict = read_metadata(p, "prompt_style.json")
    style = get_prompt_style(style_dict) if style_dict else None
    served = Served(model.eval(), name or p.resolve().name, Tokenizer(), style, created=int(time.time()))
    if not served.is_classifier:
        served.engine = Engine(model, served.tokenizer, max_batch=max_batch, max_queue=max_queue)
    return served


# -- request parsing ---------------------------------------------------------------------------------
def _get(body: dict, key: str, types: type | tuple[type, ...], default: Any = None, *, what: str = "") -> Any:
    """body[key] when present and of `types` (bools are not numbers), else `default`; else a 400."""
    if key not in body or body[key] is None:
        return default
    value = body[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))
    if not ok:
        raise ApiError(400, f"'{key}' must be {what or _names(types)}, not {type(value).__name__}", param=key)
    return value


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _names(types) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
    }
    return " or ".join(names.get(t, t.__name__) for t in _tuple(types))


def _sampling(
    body: dict, prompt_len: int, ctx: int, default_max: int, stop_extra: list[str]
) -> SamplingParams:
    max_tokens = _get(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = max(1, min(default_max, ctx - prompt_len))
    temperature = float(_get(body, "temperature", (int, float), 0.0))  # greedy unless asked: reproducible
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(
            400, f"temperature={temperature} must be between 0 and 2 (0: greedy)", param="temperature"
        )
    top_p = _get(body, "top_p", (int, float))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p={top_p} must be in (0, 1]", param="top_p")
    seed = _get(body, "seed", int)
    stop = _get(body, "stop", (str, list), what="a string or a list of up to 4 strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
        seed=seed,
        stop=[s for s in stop_extra + stops if s],
    )


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(
            400, "'messages' must be a non-empty list of {role, content} objects", param="messages"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}] must be an object with role system, user or assistant",
                param=f"messages[{i}].role",
            )
        c = m.get("content")
        if not (c is None or isinstance(c, str) or isinstance(c, list)):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    if not any(m["role"] == "user" for m in msgs):
        raise ApiError(400, "'messages' needs at least one user message", param="messages")
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in msgs]


class Mailbox:
    """Hands events from the engine thread to the event loop with one wake-up for all that arrive together.

    The engine calls every active request's `on_update` in one go after each step; one
    `call_soon_threadsafe` per call would wake the loop (a self-pipe write and a pass of the loop) once per
    request and token, stealing CPU from the model's threads. Here the first event schedules a flush and
    the rest of the step's events join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, tuple]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


# -- the app -----------------------------------------------------------------------------------------
def create_app(served: Served, api_key: str | None = None):
    """The FastAPI app; the engine thread starts and drains with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app):
        if served.engine is not None:
            served.engine.start()
        yield
        if served.engine is not None:  # uvicorn has let in-flight responses finish; finish the rest
            await asyncio.get_running_loop().run_in_executor(None, served.engine.stop)

    app = FastAPI(title="gptforge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    classify_lock = asyncio.Lock()
    mailboxes: dict = {}  # the event loop's Mailbox (engine thread -> loop)
    ctx = served.model.cfg.context_length
    eos = (EOT_ID,) if served.model.cfg.vocab_size > EOT_ID else ()

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    def authorize(request: HttpRequest) -> None:
        if not api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_body(request: HttpRequest) -> dict:
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served.name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {served.name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return body

    def need_generator(endpoint: str) -> Engine:
        if served.engine is None:
            raise ApiError(
                400,
                f"{served.name} is a classifier; {endpoint} needs a language model, use POST /v1/classify",
                param="model",
            )
        return served.engine

    def submit_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], param: str, streaming: bool):
        """Submit every choice; events (choice index, text delta, finished) arrive on the queue.

        Without streaming only the finished events are sent: a per-token wake-up of the event loop would
        cost the engine thread and the loop time for text nobody reads until the end.
        """
        loop = asyncio.get_running_loop()
        if mailboxes.get("loop") is not loop:  # one per event loop (tests start several servers)
            mailboxes.update(loop=loop, box=Mailbox(loop))
        post = mailboxes["box"].post
        queue: asyncio.Queue = asyncio.Queue()

        def callback(i: int):
            def on_update(req, delta, done):
                if done or streaming:
                    post(queue, (i, delta, done))

            return on_update

        reqs: list[Request] = []
        try:
            for i, (ids, params) in enumerate(jobs):
                reqs.append(engine.submit(ids, params, callback(i)))
        except EngineError as e:
            for r in reqs:
                engine.cancel(r)
            if e.kind == "queue_full":
                raise ApiError(
                    429,
                    f"server busy: {e}; retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                ) from None
            if e.kind == "stopping":
                raise ApiError(503, "the server is shutting down", type="server_error") from None
            raise ApiError(400, str(e), param=param if e.param == "messages/prompt" else e.param) from None
        return reqs, queue

    def usage(reqs: list[Request], prompt_lens: list[int]) -> dict:
        p = sum(prompt_lens[i] for i in range(len(reqs)))
        c = sum(r.generated for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def wait_done(request: HttpRequest, engine: Engine, reqs: list[Request], queue) -> None:
        """Until every choice finished; a client that goes away cancels them."""
        left = len(reqs)
        try:
            while left:
                try:
                    _, _, done = await asyncio.wait_for(queue.get(), 0.5)
                    left -= bool(done)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
        finally:
            for r in reqs:
                if not r.done.is_set():
                    engine.cancel(r)
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", type="server_error")

    def sse(obj: dict | str) -> bytes:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()

    def stream(engine: Engine, reqs, queue, chunk, final_chunks):
        async def gen():
            left = len(reqs)
            try:
                while left:
                    # Events that piled up while this stream waited for the event loop leave in one write:
                    # under load that is one socket send instead of one per token.
                    events = [await queue.get()]
                    while not queue.empty():
                        events.append(queue.get_nowait())
                    out = []
                    for i, delta, done in events:
                        if delta:
                            out.append(sse(chunk(i, delta, None)))
                        if done:
                            left -= 1
                            out.append(sse(chunk(i, None, reqs[i].finish_reason)))
                    if not left:
                        out += [sse(extra) for extra in final_chunks()] + [sse("[DONE]")]
                    yield b"".join(out)
            finally:  # the client went away (or the stream ended): free the slots
                for r in reqs:
                    if not r.done.is_set():
                        engine.cancel(r)

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        """The chat page: one self-contained file (no CDN), usable offline."""
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        load = served.engine.load if served.engine else {"running": 0, "waiting": 0}
        return {"status": "ok", "model": served.name, **load}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        kind = "classifier" if served.is_classifier else "language-model"
        return {
            "object": "list",
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "gptforge",
                    "kind": kind,
                    "context_length": ctx,
                    "prompt_style": served.style.name if served.style else None,
                }
            ],
        }

    def n_and_stream(body: dict) -> tuple[int, bool]:
        n = _get(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"n={n} must be between 1 and {MAX_N}", param="n")
        return n, bool(_get(body, "stream", bool, False))

    def choice_params(params: SamplingParams, i: int) -> SamplingParams:
        if i == 0 or params.seed is None:
            return params
        return SamplingParams(**{**params.__dict__, "seed": params.seed + i})

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_body(request)
        engine = need_generator("/v1/completions")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [served.tokenizer.encode(prompt)]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            prompts = [served.tokenizer.encode(t) for t in prompt]
        else:
            raise ApiError(
                400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt"
            )
        n, streaming = n_and_stream(body)
        if _get(body, "echo", bool, False):
            raise ApiError(400, "'echo' is not supported", param="echo")
        jobs, lens = [], []
        for ids in prompts:
            params = _sampling(body, len(ids), ctx, 16, [])
            params.eos_ids = eos
            for i in range(n):
                jobs.append((ids, choice_params(params, i)))
                lens.append(len(ids))
        reqs, queue = submit_all(engine, jobs, "prompt", streaming)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(choices):
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": served.name,
                "choices": choices,
            }

        if streaming:

            def chunk(i, delta, finish):
                return envelope(
                    [{"index": i, "text": delta or "", "logprobs": None, "finish_reason": finish}]
                )

            def final():
                so = body.get("stream_options") or {}
                return (
                    [{**envelope([]), "usage": usage(reqs, lens)}]
                    if isinstance(so, dict) and so.get("include_usage")
                    else []
                )

            return stream(engine, reqs, queue, chunk, final)
        await wait_done(request, engine, reqs, queue)
        out = envelope(
            [
                {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                for i, r in enumerate(reqs)
            ]
        )
        return {**out, "usage": usage(reqs, lens)}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await read_body(request)
        engine = need_generator("/v1/chat/completions")
        msgs = _messages(body)
        if served.style is not None:
            text, stops = (
                served.style.format_prompt(messages_to_record(msgs)),
                list(served.style.stop_strings),
            )
        else:
            text, stops = render_plain(msgs), list(PLAIN_STOP_STRINGS)
        ids = served.tokenizer.encode(text)
        n, streaming = n_and_stream(body)
        params = _sampling(body, len(ids), ctx, ctx, stops)
        params.eos_ids = eos
        reqs, queue = submit_all(
            engine, [(ids, choice_params(params, i)) for i in range(n)], "messages", streaming
        )
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(obj, choices):
            return {"id": rid, "object": obj, "created": created, "model": served.name, "choices": choices}

        if streaming:
            started: set[int] = set()

            def chunk(i, delta, finish):
                d: dict = {} if finish else {"content": delta}
                if i not in started:
                    started.add(i)
                    d = {"role": "assistant", **d}
                return envelope(
                    "chat.completion.chunk",
                    [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}],
                )

            def final():
                so = body.get("stream_options") or {}
                if isinstance(so, dict) and so.get("include_usage"):
                    return [{**envelope("chat.completion.chunk", []), "usage": usage(reqs, [len(ids)] * n)}]
                return []

            return stream(engine, reqs, queue, chunk, final)
        await wait_done(request, engine, reqs, queue)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(reqs)
        ]
        return {**envelope("chat.completion", choices), "usage": usage(reqs, [len(ids)] * n)}

    @app.post("/v1/classify")
    async def classify(request: HttpRequest):
        body = await read_body(request)
        if not served.is_classifier:
            raise ApiError(
                400,
                f"{served.name} is a language model; /v1/classify needs a classifier, use "
                "/v1/completions or /v1/chat/completions",
                param="model",
            )
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ApiError(400, "'input' must be a non-empty string or a list of them", param="input")
        if len(texts) > 256:
            raise ApiError(
                400, f"'input' has {len(texts)} texts; send at most 256 per request", param="input"
            )
        from gptforge.pipeline.evaluate.inference import classify_texts

        dev = next(served.model.parameters()).device
        async with classify_lock:
            results = await asyncio.get_running_loop().run_in_executor(
                None, lambda: classify_texts(served.model, texts, tokenizer=served.tokenizer, device=dev)
            )
        data = [
            {
                "index": i,
                "label": r["label"],
                "score": r["score"],
                "probabilities": r["probabilities"],
                "truncated": r["truncated"],
            }
            for i, r in enumerate(results)
        ]
        return {"object": "list", "model": served.name, "data": data}

    return app


def run(served: Served, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first (uvicorn's graceful shutdown), then 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown, so the process would die
            # of SIGTERM; a drained shutdown is a clean exit.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    config = uvicorn.Config(
        create_app(served, api_key), host=host, port=port, log_level="info", timeout_graceful_shutdown=None
    )
    Server(config).run()
    return 0
