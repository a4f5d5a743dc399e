"""HTTP API (FastAPI): SGLang's /generate, OpenAI's completions / chat completions, and one route per member of
the engine's control surface (`inference_engine.control.MEMBERS`: SGLang's paths, bodies bound by the member's
signature).

Every request passes `_Guard` first (`ServerConfig`): the Bearer token on every route but /health (when an api key
is set), the admin switch on the routes that change the engine's weights or state, and the body-size limit
(Content-Length, then the bytes as they stream in). Bodies are JSON only: nothing sent over the network is ever
unpickled, so tensors are not accepted over HTTP (use Ray or the in-process Engine). Docs: docs/security.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from inference_engine import control
from inference_engine.config import ServerConfig
from inference_engine.control import MEMBERS, Member
from inference_engine.engine import Engine
from kiln_common.errors import EngineNotServingError

GENERATE_FIELDS = {"text": "prompt", "input_ids": "input_ids", "sampling_params": "sampling_params",
                   "return_logprob": "return_logprob", "stream": "stream", "rid": "rid"}   # body field -> argument
# OpenAI request field -> SGLang sampling parameter
OPENAI_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "n": "n",
                   "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
                   "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
                   "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim"}
# the OpenAI request fields each route reads, beside OPENAI_SAMPLING's; any other field is a 400 naming it
OPENAI_FIELDS = {"/v1/completions": {"prompt", "max_tokens", "logprobs", "stream"},
                 "/v1/chat/completions": {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                                          "top_logprobs", "stream"}}
# fields of OpenAI's API that are accepted and ignored on purpose: they do not change what is generated
OPENAI_IGNORED = {"model": "one model is served; any name is accepted (GET /v1/models reports it)",
                  "user": "an end-user id for OpenAI's abuse monitoring",
                  "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
                  "store": "OpenAI's stored completions", "metadata": "OpenAI's stored completions",
                  "service_tier": "OpenAI's processing tiers",
                  "prompt_cache_key": "the radix cache matches shared prefixes without a key",
                  "stream_options": "a stream ends with the last choice chunk and [DONE]; no usage chunk is sent"}
# fields of OpenAI's API that change the answer in ways this server does not implement: a 400 saying so
OPENAI_UNSUPPORTED = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                      "response_format", "logit_bias", "echo", "suffix", "best_of", "audio", "modalities",
                      "prediction", "reasoning_effort", "verbosity", "web_search_options")
# SGLang paths of members that are not served over HTTP: they answer 400 saying why
NOT_OVER_HTTP = {"/update_weights_from_tensor": "tensors are not accepted over HTTP (Kiln never unpickles network "
                 "data): push weights through Ray (EngineActor / EngineProxy), the in-process Engine, or "
                 "/update_weights_from_distributed and /update_weights_from_disk"}
ADMIN_PATHS = frozenset({m.route for m in MEMBERS.values() if m.admin and m.route} | set(NOT_OVER_HTTP))
OPEN_PATHS = frozenset({"/health"})   # answered without the api key (load balancers, liveness probes)
THREAD_PARSE_BYTES = 1 << 20   # larger JSON bodies are parsed off the event loop
CLIENT_GONE = 499   # nginx's status for a request whose client closed the connection


def _error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": status}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status_code=status)


class _BodyTooLarge(Exception):
    """The request body grew past max_request_bytes while it streamed in."""


class _Guard:
    """ASGI middleware in front of every route: api key (all but OPEN_PATHS), admin switch, body-size limit."""

    def __init__(self, app: Any, config: ServerConfig):
        self.app = app
        self.config = config
        self._key = None if config.api_key is None else config.api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], dict(scope["headers"])
        if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers.get(b"authorization")):
            await _send_error(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              [(b"www-authenticate", b"Bearer")])
            return
        if path in ADMIN_PATHS and not self.config.admin_routes:
            await _send_error(send, 403, admin_off_message(path))
            return
        limit = self.config.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            await _send_error(send, status, f"request body of {length.decode(errors='replace')} bytes; this server "
                                            f"accepts at most {limit} (max_request_bytes)")
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(f"request body over {limit} bytes (max_request_bytes); refused")
            return message

        await self.app(scope, limited_receive, send)

    def _authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


def admin_off_message(path: str) -> str:
    return (f"{path} is an admin route (it changes the engine's weights or state) and admin routes are off: start "
            "the server with --enable-admin-routes, or with --api-key (or KILN_API_KEY) so that only holders of "
            "the key reach them")


async def _send_error(send: Callable, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(_error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _sse(items: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for item in items:
            yield f"data: {json.dumps(item)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json(request: Request) -> dict:
    """The body as a JSON object (NaN / Infinity refused; large bodies parsed in a worker thread)."""
    raw = await request.body()
    try:
        if len(raw) > THREAD_PARSE_BYTES:
            body = await asyncio.to_thread(json.loads, raw, parse_constant=_no_constant)
        else:
            body = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:   # JSONDecodeError, bytes that are not UTF-8, NaN / Infinity
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def _check_n(sampling_params: Any, max_n: int, field: str) -> None:
    """400 when a request asks for more than max_n samples per prompt (types are SamplingParams' to check)."""
    for sp in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
        n = sp.get("n", 1) if isinstance(sp, dict) else 1
        if isinstance(n, int) and not isinstance(n, bool) and n > max_n:
            raise ValueError(f"{field} = {n} is above this server's max_n of {max_n} samples per prompt")


def _check_field(body: dict, name: str, kinds: tuple[type, ...]) -> None:
    value = body.get(name)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"field {name!r} = {str(value)[:60]!r} has type {type(value).__name__}; expected "
                         f"{' or '.join(k.__name__ for k in kinds)}")


async def _unless_client_left(request: Request, config: ServerConfig, work: Awaitable[Any]) -> Any:
    """Await `work`; if the client disconnects first, cancel it (which aborts its requests) and answer 499."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=config.disconnect_poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=CLIENT_GONE)
    finally:
        task.cancel()


def _memory_tags(body: dict, resume: bool) -> dict:
    """SGLang's {"tags": ["kv_cache", "weights"]} as release_memory's `weights` / resume_memory's `weights` and
    `kv_cache` (no tags: the KV pool on release, everything on resume)."""
    if "tags" not in body:
        return body
    body = dict(body)
    what = "resume" if resume else "release"
    tags = body.pop("tags") or (["kv_cache", "weights"] if resume else ["kv_cache"])
    if not isinstance(tags, list) or not all(t in ("kv_cache", "weights") for t in tags):
        raise ValueError(f"{what}_memory_occupation: field 'tags' = {tags!r}; expected a list of 'kv_cache' / "
                         "'weights'")
    if resume:
        return {**body, "weights": "weights" in tags, "kv_cache": "kv_cache" in tags}
    return {**body, "weights": "weights" in tags}


def _prometheus(metrics: dict) -> PlainTextResponse:
    lines = []
    for name, value in metrics.items():
        lines.append(f"# TYPE kiln_{name} gauge")
        if isinstance(value, dict):  # one labelled sample per key, e.g. weight_update_phases_s{part="load"}
            lines += [f'kiln_{name}{{part="{key}"}} {float(v)}' for key, v in value.items()]
        else:
            lines.append(f"kiln_{name} {float(value)}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


# SGLang's request bodies that differ from the member's arguments, and responses that are not {"success": ...}
REQUESTS: dict[str, Callable[[dict], dict]] = {"release_memory": lambda b: _memory_tags(b, resume=False),
                                               "resume_memory": lambda b: _memory_tags(b, resume=True)}
RESPONSES: dict[str, Callable[[Engine, Any], Any]] = {
    "metrics": lambda engine, result: _prometheus(result),
    "get_model_info": lambda engine, result: result,
    "weight_version": lambda engine, result: {"weight_version": result},
    "weight_checksums": lambda engine, result: {"weight_version": engine.weight_version, "checksums": result},
    "health": lambda engine, report: JSONResponse(report, status_code=200 if report["ok"] else 503),
}


def _control_route(engine: Engine, config: ServerConfig, member: Member) -> Callable[[Request], Any]:
    """The HTTP route of one control member: JSON body -> its arguments (checked by its signature) -> the call."""
    name = member.name

    async def route(request: Request):
        body = await _json(request) if request.method == "POST" and await request.body() else {}
        arguments = control.bind(name, kwargs=REQUESTS.get(name, lambda b: b)(body))
        control.check_json_types(name, arguments)
        if member.admin_if is not None and arguments[member.admin_if] and not config.admin_routes:
            return _error(403, admin_off_message(f"{member.route} with {member.admin_if}"))
        if member.is_attribute:
            result = getattr(engine, name)
        elif member.blocking:
            result = await asyncio.to_thread(getattr(engine, name), **arguments)
        else:
            result = getattr(engine, name)(**arguments)
        if name in RESPONSES:
            return RESPONSES[name](engine, result)
        response: dict[str, Any] = {"success": True, "message": f"{name}: done"}
        if isinstance(result, int) and not isinstance(result, bool):   # the weight updates return the new version
            response["weight_version"] = result
        return response

    route.__name__ = name
    route.__doc__ = member.doc
    return route


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving one engine (tests drive it through httpx.ASGITransport); `config` defaults to
    ServerConfig(): no api key, admin routes off."""
    config = ServerConfig() if config is None else config
    app = FastAPI(title="Kiln inference engine")
    app.add_middleware(_Guard, config=config)
    model_name = engine.config.served_model_name or engine.config.model_path.rstrip("/").split("/")[-1]

    @app.exception_handler(ValueError)
    async def bad_request(_, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(RuntimeError)
    async def conflict(_, exc: RuntimeError):
        return _error(409, str(exc))

    @app.exception_handler(EngineNotServingError)
    async def not_serving(_, exc: EngineNotServingError):   # memory released, scheduler gone: another engine may serve
        return _error(503, str(exc))

    @app.exception_handler(_BodyTooLarge)
    async def too_large(_, exc: _BodyTooLarge):
        return _error(413, str(exc))

    # ------------------------------------------------------------- SGLang native
    @app.post("/generate")
    async def generate(request: Request):
        body = await _json(request)
        unknown = sorted(set(body) - set(GENERATE_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; /generate accepts {sorted(GENERATE_FIELDS)}")
        kwargs = {GENERATE_FIELDS[k]: v for k, v in body.items()}
        control.check_json_types("async_generate", kwargs, aliases={v: k for k, v in GENERATE_FIELDS.items()})
        _check_n(kwargs.get("sampling_params"), config.max_n, "sampling_params.n")
        stream = kwargs.pop("stream", False)
        if isinstance(kwargs.get("prompt"), (str, list)):   # tokenised off the event loop
            text = kwargs.pop("prompt")
            ids = await asyncio.to_thread(engine.tokenize, text if isinstance(text, list) else [text])
            kwargs["input_ids"] = ids if isinstance(text, list) else ids[0]
        if stream:
            return _sse(await engine.async_generate(**kwargs, stream=True))
        return await _unless_client_left(request, config, engine.async_generate(**kwargs))

    for path, reason in NOT_OVER_HTTP.items():
        app.add_api_route(path, _refuse(reason), methods=["GET", "POST"], include_in_schema=False)

    for member in MEMBERS.values():
        if member.route is not None and member.generated_route:
            app.add_api_route(member.route, _control_route(engine, config, member),
                              methods=list(member.http_methods), name=member.name)

    # ------------------------------------------------------------- OpenAI compatible
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kiln", "max_model_len": engine.context_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        _check_openai(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (int, list)):
            prompts = {"input_ids": prompt}
            control.check_json_types("async_generate", prompts, aliases={"input_ids": "prompt"})
        elif isinstance(prompt, str) or isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            ids = await asyncio.to_thread(engine.tokenize, prompt if isinstance(prompt, list) else [prompt])
            prompts = {"input_ids": ids if isinstance(prompt, list) else ids[0]}
        else:
            raise ValueError("field 'prompt' must be a string, a list of strings, or token ids")
        top = body.get("logprobs")
        sp = _openai_sampling(body, default_max=16, top_logprobs=top or 0)
        _check_n(sp, config.max_n, "n")
        return await _openai_response(engine, request, config, model_name, prompts, sp, top is not None,
                                      body.get("stream", False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        _check_openai(body, chat=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("field 'messages' must be a non-empty list of {'role': str, 'content': str}")
        ids = await asyncio.to_thread(_chat_ids, engine, messages)
        want_lp = bool(body.get("logprobs", False))
        sp = _openai_sampling(body, default_max=None, top_logprobs=body.get("top_logprobs") or 0 if want_lp else 0)
        _check_n(sp, config.max_n, "n")
        return await _openai_response(engine, request, config, model_name, {"input_ids": ids}, sp, want_lp,
                                      body.get("stream", False), chat=True)

    return app


def _refuse(reason: str) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def refused(request: Request) -> JSONResponse:
        return _error(400, f"{request.url.path}: {reason}")
    return refused


def _check_openai(body: dict, chat: bool) -> None:
    """400 naming the field for a field the route does not know (or an OpenAI feature it does not implement) and
    for OpenAI fields of the wrong JSON type (sampling values are SamplingParams' to check)."""
    route = "/v1/chat/completions" if chat else "/v1/completions"
    accepted = OPENAI_FIELDS[route] | set(OPENAI_SAMPLING)
    extra = sorted(set(body) - accepted - set(OPENAI_IGNORED))
    unsupported = [name for name in extra if name in OPENAI_UNSUPPORTED]
    if unsupported:
        raise ValueError(f"field(s) {unsupported} of the OpenAI API are not supported by {route} on this server; "
                         "drop them (docs/engine.md lists what it reads and what it ignores)")
    if extra:
        raise ValueError(f"unknown field(s) {extra}; {route} accepts {sorted(accepted)} and ignores "
                         f"{sorted(OPENAI_IGNORED)}")
    _check_field(body, "stream", (bool,))
    _check_field(body, "max_tokens", (int,))
    _check_field(body, "max_completion_tokens", (int,))
    _check_field(body, "logprobs", (bool,) if chat else (int,))
    _check_field(body, "top_logprobs", (int,))


def _chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    """Token ids of the chat template over the messages; their contents' length and encoding are checked first."""
    total = sum(len(m["content"]) for m in messages)
    if total > engine.max_prompt_chars:
        raise ValueError(f"field 'messages' has {total} characters of content; more than {engine.max_prompt_chars} "
                         f"cannot fit the context_length of {engine.context_length} tokens")
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"field 'messages' [{i}].content holds a lone surrogate at character {exc.start}; "
                             "send valid UTF-8") from None
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _openai_sampling(body: dict, default_max: int | None, top_logprobs: int) -> dict:
    """SGLang sampling params from an OpenAI request body."""
    sp = {ours: body[theirs] for theirs, ours in OPENAI_SAMPLING.items() if body.get(theirs) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    if max_tokens is not None:
        sp["max_new_tokens"] = max_tokens
    if top_logprobs:
        sp["top_logprobs_num"] = top_logprobs
    return sp


def _finish(reason: dict | None) -> str | None:
    return None if reason is None else reason["type"]


async def _openai_response(engine: Engine, request: Request, config: ServerConfig, model: str, prompts: dict,
                           sp: dict, want_lp: bool, stream: bool, chat: bool):
    """Run the request and shape the OpenAI (chat) completion response or SSE stream."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    n = sp.get("n", 1)
    sp["n"] = n
    kind = "chat.completion" if chat else "text_completion"
    if stream:
        chunks = await engine.async_generate(**prompts, sampling_params=sp, return_logprob=want_lp, rid=rid,
                                             stream=True)
        return _sse(_openai_stream(engine, chunks, rid, created, model, chat, want_lp, sp.get("stop") or []))
    outs = await _unless_client_left(request, config, engine.async_generate(**prompts, sampling_params=sp,
                                                                           return_logprob=want_lp, rid=rid))
    if isinstance(outs, Response):   # the client left: nobody reads the answer
        return outs
    outs = outs if isinstance(outs, list) else [outs]
    choices = []
    for i, out in enumerate(outs):
        choice: dict[str, Any] = {"index": i, "finish_reason": _finish(out["meta_info"]["finish_reason"])}
        if chat:
            choice["message"] = {"role": "assistant", "content": out["text"]}
        else:
            choice["text"] = out["text"]
        choice["logprobs"] = _logprobs(engine, out["meta_info"], chat) if want_lp else None
        choices.append(choice)
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs[::n])
    completion_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": sum(o["meta_info"]["cached_tokens"] for o in outs)}},
            "weight_version": outs[0]["meta_info"]["weight_version"]}


def _logprobs(engine: Engine, meta: dict, chat: bool, start: int = 0) -> dict:
    """OpenAI log-prob objects for output tokens [start:]."""
    decode = engine.tokenizer.decode
    entries = meta["output_token_logprobs"][start:]
    tops = meta.get("output_top_logprobs", [[]] * len(meta["output_token_logprobs"]))[start:]
    if chat:
        return {"content": [{"token": decode([t]), "logprob": lp, "bytes": list(decode([t]).encode()),
                             "top_logprobs": [{"token": decode([tt]), "logprob": tlp,
                                               "bytes": list(decode([tt]).encode())}
                                              for tlp, tt, _ in top]}
                            for (lp, t, _), top in zip(entries, tops)]}
    return {"tokens": [decode([t]) for _, t, _ in entries], "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [{decode([tt]): tlp for tlp, tt, _ in top} for top in tops]}


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that may be the start of a stop string (not streamed until resolved)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


async def _openai_stream(engine: Engine, chunks: AsyncIterator[dict], rid: str, created: int, model: str, chat: bool,
                         want_lp: bool, stops: list[str]) -> AsyncIterator[dict]:
    """Turn cumulative engine outputs into OpenAI delta chunks.

    Text is held back while it ends mid-character or with what may become a stop string, so the
    concatenated deltas equal the final (stop-trimmed) text.
    """
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    kind = "chat.completion.chunk" if chat else "text_completion"
    async for out in chunks:
        i = out["index"]
        reason = _finish(out["meta_info"]["finish_reason"])
        text = out["text"]
        if reason is None:
            text = text[:len(text) - _held_back(text, [stops] if isinstance(stops, str) else stops)]
            if text.endswith("\ufffd"):
                continue
        delta_text = text[sent_text.get(i, 0):]
        choice: dict[str, Any] = {"index": i, "finish_reason": reason}
        if chat:
            choice["delta"] = {"content": delta_text}
            if i not in sent_text:
                choice["delta"]["role"] = "assistant"
        else:
            choice["text"] = delta_text
        if want_lp:
            choice["logprobs"] = _logprobs(engine, out["meta_info"], chat, start=sent_tokens.get(i, 0))
        sent_text[i], sent_tokens[i] = len(text), len(out["output_ids"])
        yield {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
