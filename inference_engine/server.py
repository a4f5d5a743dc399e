"""HTTP API (FastAPI): SGLang's /generate, OpenAI's completions / chat completions, and one route per member of
the engine's control surface (`inference_engine.control.MEMBERS`: SGLang's paths, bodies bound by the member's
signature)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from inference_engine import control
from inference_engine.control import MEMBERS, Member
from inference_engine.engine import Engine
from weight_sync.ipc import SharedBucket

GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "stream", "rid"}
# OpenAI request field -> SGLang sampling parameter
OPENAI_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "n": "n",
                   "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty",
                   "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
                   "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                        status_code=status)


def _sse(items: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for item in items:
            yield f"data: {json.dumps(item)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def serialize_named_tensors(named_tensors: SharedBucket | list) -> str:
    """One entry of `serialized_named_tensors` for POST /update_weights_from_tensor: base64 of a torch.multiprocessing pickle.

    A SharedBucket travels as its handles (CUDA IPC / shared memory); plain (hf_name, tensor) pairs as shared-memory
    tensors on CPU, CUDA IPC handles on GPU, so the server must run on the same machine as the caller.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions with ForkingPickler

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode()


def _deserialize_named_tensors(entry: str) -> SharedBucket | list:
    try:
        return pickle.loads(base64.b64decode(entry))
    except Exception as exc:
        raise ValueError(f"serialized_named_tensors[0] could not be decoded ({type(exc).__name__}: {exc}); expected "
                         "base64 of a torch.multiprocessing pickle of (hf_name, tensor) pairs or a SharedBucket") from exc


def _required(body: dict, route: str, *names: str) -> list:
    missing = [n for n in names if n not in body]
    if missing:
        raise ValueError(f"{route} needs field(s) {missing}; got {sorted(body)}")
    return [body[n] for n in names]


def _release_tags(body: dict) -> dict:
    """SGLang's {"tags": ["kv_cache", "weights"]} as release_memory's `weights`."""
    if "tags" not in body:
        return body
    body = dict(body)
    tags = body.pop("tags") or ["kv_cache"]
    if not isinstance(tags, list) or not all(t in ("kv_cache", "weights") for t in tags):
        raise ValueError(f"release_memory_occupation: field 'tags' = {tags!r}; expected a list of 'kv_cache' / "
                         "'weights'")
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
REQUESTS: dict[str, Callable[[dict], dict]] = {"release_memory": _release_tags}
RESPONSES: dict[str, Callable[[Engine, Any], Any]] = {
    "metrics": lambda engine, result: _prometheus(result),
    "get_model_info": lambda engine, result: result,
    "weight_version": lambda engine, result: {"weight_version": result},
    "weight_checksums": lambda engine, result: {"weight_version": engine.weight_version, "checksums": result},
    "health": lambda engine, ok: {"status": "ok"} if ok else JSONResponse({"status": "unhealthy"}, status_code=503),
}


def _control_route(engine: Engine, member: Member) -> Callable[[Request], Any]:
    """The HTTP route of one control member: JSON body -> its arguments (checked by its signature) -> the call."""
    name = member.name

    async def route(request: Request):
        body = await _json(request) if request.method == "POST" and await request.body() else {}
        arguments = control.bind(name, kwargs=REQUESTS.get(name, lambda b: b)(body))
        control.check_json_types(name, arguments)
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


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving one engine (tests drive it through httpx.ASGITransport or TestClient)."""
    app = FastAPI(title="Kiln inference engine")
    model_name = engine.config.served_model_name or engine.config.model_path.rstrip("/").split("/")[-1]

    @app.exception_handler(ValueError)
    async def bad_request(_, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(RuntimeError)
    async def conflict(_, exc: RuntimeError):
        return _error(409, str(exc))

    # ------------------------------------------------------------- SGLang native
    @app.post("/generate")
    async def generate(request: Request):
        body = await _json(request)
        unknown = sorted(set(body) - GENERATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; /generate accepts {sorted(GENERATE_FIELDS)}")
        kwargs = dict(prompt=body.get("text"), input_ids=body.get("input_ids"),
                      sampling_params=body.get("sampling_params"), return_logprob=body.get("return_logprob", False),
                      rid=body.get("rid"))
        if body.get("stream"):
            return _sse(await engine.async_generate(**kwargs, stream=True))
        return await engine.async_generate(**kwargs)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        body = await _json(request)
        entries, = _required(body, "update_weights_from_tensor", "serialized_named_tensors")
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], str):
            raise ValueError("serialized_named_tensors must be a non-empty list of strings (SGLang sends one per tp "
                             "rank; Kiln's rank 0 takes the first and shares the full tensors with its tp ranks)")
        named = _deserialize_named_tensors(entries[0])
        if "weight_version" not in body:
            raise ValueError("update_weights_from_tensor needs field(s) ['weight_version']")
        version = await asyncio.to_thread(engine.update_weights_from_tensor, named, body["weight_version"])
        return {"success": True, "message": "weights updated", "weight_version": version}

    for member in MEMBERS.values():
        if member.route is not None and member.generated_route:
            app.add_api_route(member.route, _control_route(engine, member), methods=list(member.http_methods),
                              name=member.name)

    # ------------------------------------------------------------- OpenAI compatible
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kiln", "max_model_len": engine.context_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (int, list)):
            prompts = {"input_ids": prompt}
        elif isinstance(prompt, (str, list)):
            prompts = {"prompt": prompt}
        else:
            raise ValueError("prompt must be a string, a list of strings, or token ids")
        top = body.get("logprobs")
        sp = _openai_sampling(body, default_max=16, top_logprobs=top or 0)
        return await _openai_response(engine, model_name, prompts, sp, top is not None, body.get("stream", False),
                                      chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        want_lp = bool(body.get("logprobs", False))
        sp = _openai_sampling(body, default_max=None, top_logprobs=body.get("top_logprobs") or 0 if want_lp else 0)
        return await _openai_response(engine, model_name, {"input_ids": ids}, sp, want_lp, body.get("stream", False),
                                      chat=True)

    return app


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


async def _openai_response(engine: Engine, model: str, prompts: dict, sp: dict, want_lp: bool, stream: bool,
                           chat: bool):
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
    outs = await engine.async_generate(**prompts, sampling_params=sp, return_logprob=want_lp, rid=rid)
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
                             "top_logprobs": [{"token": decode([tt]), "logprob": tlp, "bytes": list(decode([tt]).encode())}
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
