"""The OpenAI-compatible HTTP API over the engine (FastAPI).

    app = create_app(engine, model_name="tiny", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` over
server-sent events), ``POST /tokenize``, ``POST /detokenize``, ``GET /health``, ``GET /metrics``. Errors
have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for anything
the client sent wrong, 429 with ``Retry-After`` when the queue is full.
"""


import asyncio
import json
import threading
import time
import uuid
from typing import Any

from llamaherd.errors import HerdError
from llamaherd.serve.engine import Engine, Event, QueueFull, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _field(body: dict, name: str, kind, default=None, *, low=None, high=None):
    """``body[name]`` checked: its type, its range; ApiError (400) naming the field otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"{name}: expected {kinds[0].__name__}, got {value!r}", name)
    if not isinstance(value, kinds):
        if float in kinds and isinstance(value, int):
            value = float(value)
        else:
            raise ApiError(400, f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}", name)
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(400, f"{name}: {value!r} is out of range [{low}, {high}]", name)
    return value


class Server:
    """What the routes share: the engine, the tokenizer, limits, metrics."""

    def __init__(self, engine: Engine | None, model_name: str, *, api_key: str | None = None,
                 max_prompt_tokens: int | None = None, max_total_tokens: int | None = None,
                 request_timeout: float | None = 600.0, guardrails=None):
        self.model_name, self.api_key, self.timeout = model_name, api_key, request_timeout
        self.guardrails = guardrails if guardrails is not None and guardrails.active else None
        self.limits = (max_prompt_tokens, max_total_tokens)
        self.ready = False  # until an engine is attached (and warmed up): /health says 503, the API too
        self.engine = None
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Engine) -> None:
        """Serve ``engine`` from now on (``herd serve`` listens first, and loads the model meanwhile)."""
        from llamaherd.serve.metrics import Metrics
        from llamaherd.tokenizer.chat import ChatFormat

        self.tokenizer = engine.tokenizer
        self.chat = ChatFormat(self.tokenizer)
        self.max_prompt = self.limits[0] or engine.max_context()
        self.max_total = self.limits[1] or engine.max_context()
        self.metrics = Metrics(engine, self.guardrails)
        self.engine = engine
        self.ready = True

    # --- requests to engine parameters ---------------------------------------------------------------

    def params(self, body: dict, default_max: int) -> tuple[SamplingParams, int]:
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > 4:
            raise ApiError(400, "stop: expected a string or a list of up to 4 non-empty strings", "stop")
        n = _field(body, "n", int, 1, low=1, high=16)
        params = SamplingParams(
            max_tokens=_field(body, "max_tokens", int, default_max, low=0, high=self.max_total),
            temperature=_field(body, "temperature", float, 1.0, low=0.0, high=2.0),
            top_p=_field(body, "top_p", float, 1.0, low=0.0, high=1.0),
            top_k=_field(body, "top_k", int, None, low=1),
            seed=_field(body, "seed", int, None),
            stop=stop,
            stop_tokens=not _field(body, "ignore_eos", bool, False),  # vLLM's extension: generate max_tokens
            # vLLM's extension (its default is true): special tokens the model writes are left out of the text
            skip_special_tokens=_field(body, "skip_special_tokens", bool, False))
        if params.top_p == 0.0:
            params.top_p = 1e-9
        return params, n

    def check_lengths(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ApiError(400, "the prompt is empty: expected at least one token", "prompt")
        if any(not 0 <= t < self.tokenizer.n_words for t in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {self.tokenizer.n_words})", "prompt")
        if len(prompt) > self.max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server takes at most {self.max_prompt}",
                           "prompt")
        if len(prompt) + params.max_tokens > self.max_total:
            raise ApiError(400, f"the prompt's {len(prompt)} tokens + max_tokens {params.max_tokens} are more than "
                                f"the {self.max_total} tokens a request may have", "max_tokens")

    def submit(self, prompt: list[int], params: SamplingParams, loop, out: asyncio.Queue | None = None):
        """Queue a request; its events arrive on ``out`` (streaming), or without ``out`` all at once in the
        future ``request.result`` when it ends (fewer wake-ups)."""
        delivery = self._delivery(loop)
        if out is not None:
            def on_event(event: Event) -> None:
                delivery.put(out.put_nowait, event)
            result = None
        else:
            events: list[Event] = []
            result = loop.create_future()

            def on_event(event: Event) -> None:
                events.append(event)
                if event.finish_reason is not None:
                    delivery.put(lambda _: result.done() or result.set_result(events), event)
        try:
            request = self.engine.submit(prompt, params, timeout=self.timeout, on_event=on_event)
            request.result = result
            return request
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except HerdError as e:
            raise ApiError(400, str(e)) from None

    def _delivery(self, loop) -> "_Delivery":
        if getattr(self, "_deliver", None) is None or self._deliver.loop is not loop:
            self._deliver = _Delivery(loop)
        return self._deliver


class _Delivery:
    """Events from the engine's thread to the event loop: one wake-up of the loop hands over every event
    that arrived since the last one (an engine turn's worth), not one wake-up per token."""

    def __init__(self, loop):
        self.loop, self.pending, self.scheduled, self.lock = loop, [], False, threading.Lock()

    def put(self, target, event: Event) -> None:
        with self.lock:
            self.pending.append((target, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for target, event in pending:
            target(event)


# the request bodies, as the OpenAPI description (/openapi.json) documents them (the routes read raw JSON and
# check every field themselves, so that a wrong one is a 400 naming it, in OpenAI's error shape)
_SAMPLING = {"model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 0},
             "temperature": {"type": "number", "minimum": 0, "maximum": 2},
             "top_p": {"type": "number", "minimum": 0, "maximum": 1}, "top_k": {"type": "integer", "minimum": 1},
             "n": {"type": "integer", "minimum": 1, "maximum": 16}, "seed": {"type": "integer"},
             "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
             "ignore_eos": {"type": "boolean"}, "skip_special_tokens": {"type": "boolean"},
             "stream": {"type": "boolean"}}
_COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    **_SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                      {"type": "array", "items": {"type": "integer"}},
                                      {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, "echo": {"type": "boolean"}}}
_CHAT = {"type": "object", "required": ["messages"], "properties": {
    **_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                       "content": {"type": "string"}}}},
    "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "max_completion_tokens": {"type": "integer", "minimum": 0},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}}
_TOKENIZE = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string"}, "add_special_tokens": {"type": "boolean"}, "model": {"type": "string"}}}
_DETOKENIZE = {"type": "object", "required": ["tokens"], "properties": {
    "tokens": {"type": "array", "items": {"type": "integer"}}, "model": {"type": "string"}}}


def _body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_app(engine: Engine | None, model_name: str, **limits: Any):
    """The FastAPI app serving ``engine`` as ``model_name``; without an engine, one that answers 503 (loading)
    until ``app.state.server.attach(engine)``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    server = Server(engine, model_name, **limits)
    app = FastAPI(title="llamaherd", version="1")
    app.state.server = server

    def error(status: int, message: str, param=None, kind="invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # the engine keeps running; the client is told
        return error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if not server.ready and request.url.path not in ("/health", "/"):
            return error(503, "the model is still loading; GET /health says when it is ready",
                         kind="service_unavailable", headers={"Retry-After": "5"})
        if server.api_key and request.url.path.startswith(("/v1", "/tokenize", "/detokenize", "/tokenizer_info")):
            if request.headers.get("authorization") != f"Bearer {server.api_key}":
                return error(401, "invalid or missing API key (Authorization: Bearer ...)",
                             kind="authentication_error")
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != server.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {server.model_name!r}",
                           "model", kind="not_found_error")
        return body

    @app.get("/health")
    async def health():
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "llamaherd"}]}

    @app.post("/tokenize", openapi_extra=_body(_TOKENIZE))
    async def tokenize(request: Request):
        body = await body_of(request)
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise ApiError(400, "prompt: expected a string", "prompt")
        # special tokens written in the text are those tokens, as Hugging Face tokenizers (and vLLM) read them
        ids = server.tokenizer.encode(text, bos=bool(body.get("add_special_tokens", True)), allowed_special="all")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_context()}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """What lm-evaluation-harness's remote tokenizer asks for (vLLM's endpoint of the same name)."""
        return {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>", "pad_token": None,
                "model_max_length": server.engine.max_context(), "tokenizer_class": "llamaherd"}

    @app.post("/detokenize", openapi_extra=_body(_DETOKENIZE))
    async def detokenize(request: Request):
        body = await body_of(request)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ApiError(400, "tokens: expected a list of token ids", "tokens")
        if any(not 0 <= t < server.tokenizer.n_words for t in ids):
            raise ApiError(400, f"tokens: ids must be in [0, {server.tokenizer.n_words})", "tokens")
        return {"prompt": server.tokenizer.decode(ids)}

    @app.post("/v1/completions", openapi_extra=_body(_COMPLETION))
    async def completions(request: Request):
        body = await body_of(request)
        prompts = _prompts(body.get("prompt"), server.tokenizer)
        params, n = server.params(body, 16)
        logprobs = _field(body, "logprobs", int, None, low=0, high=20)
        echo = bool(_field(body, "echo", bool, False))
        params.logprobs, params.prompt_logprobs = logprobs, echo and logprobs is not None
        if body.get("stream"):
            raise ApiError(400, "stream: streaming is available on /v1/chat/completions", "stream")
        loop = asyncio.get_running_loop()
        jobs, refused = [], {}
        for prompt in prompts:
            server.check_lengths(prompt, params)
        guard = server.guardrails
        for k, prompt in enumerate(prompts):
            if guard is not None:  # a refused prompt is not generated for
                said = [{"role": "user", "content": server.tokenizer.decode(prompt)}]
                refused[k] = await guard.check_input(said)
            for i in range(n):
                p = _seeded(params, i)
                jobs.append((k, prompt, None if refused.get(k) else server.submit(prompt, p, loop)))
        choices, usage_in, usage_out = [], 0, 0
        try:
            for index, (k, prompt, req) in enumerate(jobs):
                usage_in += len(prompt)
                if req is None:
                    choices.append({"index": index, "text": "", "finish_reason": "content_filter", "logprobs": None,
                                    "content_filter": refused[k]})
                    continue
                events = await _collect(request, req, server.timeout)
                usage_out += len([e for e in events if e.token is not None])
                text = "".join(e.text for e in events)
                choice = {"index": index, "text": text, "finish_reason": _reason(events[-1]), "logprobs": None}
                if guard is not None:
                    said = [{"role": "user", "content": server.tokenizer.decode(prompt)}]
                    flagged, warning = await guard.check_output(said, text)
                    if flagged:
                        choices.append({**choice, "text": "", "finish_reason": "content_filter",
                                        "content_filter": flagged})
                        continue
                    if warning:
                        choice["content_filter"] = {"stage": "output", **warning}
                if echo:
                    choice["text"] = server.tokenizer.decode(prompt) + text
                if logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(server.tokenizer, prompt if echo else [], req, events)
                choices.append(choice)
        finally:
            for _, _, req in jobs:
                if req is not None:
                    req.cancel()
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": choices,
                "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                          "total_tokens": usage_in + usage_out}}

    @app.post("/v1/chat/completions", openapi_extra=_body(_CHAT))
    async def chat(request: Request):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
        try:
            prompt = server.chat.encode_dialog_prompt([_message(m, i) for i, m in enumerate(messages)])
        except HerdError as e:
            raise ApiError(400, str(e), "messages") from None
        params, n = server.params(body, server.max_total - len(prompt))
        if "max_completion_tokens" in body:
            params.max_tokens = _field(body, "max_completion_tokens", int, params.max_tokens, low=0,
                                       high=server.max_total)
        params.max_tokens = min(params.max_tokens, max(server.max_total - len(prompt), 0))
        want_logprobs = bool(_field(body, "logprobs", bool, False))
        top = _field(body, "top_logprobs", int, None, low=0, high=20)
        if want_logprobs:
            params.logprobs = top or 0
        server.check_lengths(prompt, params)
        if n != 1 and body.get("stream"):
            raise ApiError(400, "n: streaming returns one choice (n = 1)", "n")
        loop = asyncio.get_running_loop()
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        guard = server.guardrails
        refused = await guard.check_input(messages) if guard is not None else None
        if refused:
            return _refusal(server, body, cid, created, n, len(prompt), refused)
        if body.get("stream"):
            out: asyncio.Queue = asyncio.Queue()
            req = server.submit(prompt, params, loop, out)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream_chat(server, request, req, out, cid, created, include_usage,
                                                  want_logprobs, messages), media_type="text/event-stream")
        jobs = [server.submit(prompt, _seeded(params, i), loop) for i in range(n)]
        choices, generated = [], 0
        try:
            for index, req in enumerate(jobs):
                events = await _collect(request, req, server.timeout)
                generated += len([e for e in events if e.token is not None])
                text = "".join(e.text for e in events)
                choice = {"index": index, "message": {"role": "assistant", "content": text},
                          "finish_reason": _reason(events[-1]), "logprobs": None}
                if guard is not None:
                    flagged, warning = await guard.check_output(messages, text)
                    if flagged:
                        choices.append({**choice, "message": {"role": "assistant", "content": ""},
                                        "finish_reason": "content_filter", "content_filter": flagged})
                        continue
                    if warning:
                        choice["content_filter"] = {"stage": "output", **warning}
                if want_logprobs:
                    choice["logprobs"] = {"content": [_chat_logprob(server.tokenizer, e) for e in events
                                                      if e.token is not None]}
                choices.append(choice)
        finally:
            for req in jobs:
                req.cancel()
        return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                                              "total_tokens": len(prompt) + generated}}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from importlib.resources import files

        return (files("llamaherd.serve") / "chat.html").read_text(encoding="utf-8")

    return app


async def _collect(request, req, timeout: float | None) -> list[Event]:
    """The events of a request without a queue (``Server.submit``), once it has ended."""
    while True:
        try:
            events = await asyncio.wait_for(asyncio.shield(req.result), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                req.cancel()
                raise ApiError(499, "the client went away") from None
            continue
        reason = events[-1].finish_reason
        if reason == "error":
            raise ApiError(500, f"the engine failed on this request: {events[-1].error}", kind="server_error")
        if reason == "timeout":
            raise _timed_out(timeout)
        return events


def _timed_out(timeout: float | None) -> ApiError:
    return ApiError(408, f"the request took longer than this server's limit of {timeout:g} s (herd serve "
                         "--timeout)", kind="timeout_error")


def _refusal(server, body: dict, cid: str, created: int, n: int, prompt_tokens: int, found: dict):
    """The answer to a chat request the guard refused: no text, finish_reason content_filter, what was found."""
    from fastapi.responses import StreamingResponse

    if body.get("stream"):
        def events():
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({}, "content_filter")):
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                if finish:
                    choice["content_filter"] = found
                body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": server.model_name, "choices": [choice]}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter",
                "logprobs": None, "content_filter": found} for i in range(n)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                          "total_tokens": prompt_tokens}}


HOLD_CHARS = 200  # a guarded stream releases its text in pieces of about this size, each after a check


async def _stream_chat(server, request, req, out, cid, created, include_usage, want_logprobs, messages=()):
    def chunk(delta: dict, finish=None, logprobs=None, usage=None, extra=None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs, **(extra or {})}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                "choices": [choice]}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    guard = server.guardrails
    generated, held, released = 0, [], ""  # with a guard: events not yet sent, and the text sent so far
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                events = [await asyncio.wait_for(out.get(), timeout=1.0)]
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            while not out.empty():  # what else has arrived: one chunk for all of it, when no logprobs are asked
                events.append(out.get_nowait())
            generated += len([e for e in events if e.token is not None])
            if guard is not None:  # hold the text back until what would be sent has passed the checks
                held += events
                pending = "".join(e.text for e in held)
                if events[-1].finish_reason is None and len(pending) < HOLD_CHARS:
                    continue
                flagged, warning = await guard.check_output(list(messages), released + pending)
                if flagged:
                    yield chunk({}, finish="content_filter", extra={"content_filter": flagged})
                    yield "data: [DONE]\n\n"
                    return
                events, held, released = held, [], released + pending
                if warning and events[-1].finish_reason is not None:
                    yield chunk({}, extra={"content_filter": {"stage": "output", **warning}})
            tokens = [e for e in events if e.token is not None]
            text = "".join(e.text for e in events)
            if want_logprobs:
                for e in tokens:
                    yield chunk({"content": e.text}, logprobs={"content": [_chat_logprob(server.tokenizer, e)]})
                text = "".join(e.text for e in events if e.token is None)
            if text:
                yield chunk({"content": text})
            event = events[-1]
            if event.finish_reason == "timeout":
                error = _timed_out(server.timeout)  # the status is sent already: an error event, as OpenAI's
                body = {"error": {"message": error.message, "type": error.kind, "param": None, "code": 408}}
                yield f"data: {json.dumps(body)}\n\n"
            if event.finish_reason is not None:
                yield chunk({}, finish=_reason(event))
                if include_usage:
                    n = len(req.prompt)
                    usage = {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": server.model_name, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        req.cancel()  # a client gone mid-stream frees its slot at once


def _reason(event: Event) -> str:
    return {"stop": "stop", "length": "length", "timeout": "length"}.get(event.finish_reason, "stop")


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=None if params.seed is None else params.seed + i, stop=list(params.stop))


def _prompts(prompt, tokenizer) -> list[list[int]]:
    """A completion prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, bos=True)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p, bos=True) for p in prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "ipython", "tool"):
        raise ApiError(400, f"messages[{i}]: expected an object with role system, user, assistant or tool",
                       "messages")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                   for c in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content: expected a string", "messages")
    role = "ipython" if m["role"] == "tool" else m["role"]
    return {"role": role, "content": content}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def _chat_logprob(tokenizer, event: Event) -> dict:
    text = _token_text(tokenizer, event.token)
    return {"token": text, "logprob": event.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token_text(tokenizer, t), "logprob": lp, "bytes": list(_token_text(
                tokenizer, t).encode())} for t, lp in (event.top_logprobs or {}).items()]}


def _completion_logprobs(tokenizer, prompt: list[int], req, events: list[Event]) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, tops = [], [], []
    for i, t in enumerate(prompt):
        tokens.append(t)
        token_logprobs.append(req.prompt_logprobs[i] if i < len(req.prompt_logprobs) else None)
        top = req.prompt_top[i] if i < len(req.prompt_top) else None
        tops.append(None if top is None else {_token_text(tokenizer, k): v for k, v in top.items()})
    for e in events:
        if e.token is None:
            continue
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        tops.append({_token_text(tokenizer, k): v for k, v in (e.top_logprobs or {}).items()})
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
