"""Engine clients: HTTP (mock transport) request format, retries, errors; local engine and Ray-handle adapters."""

import asyncio
import json

import httpx
import pytest

from rollout.client import EngineError, EngineUnavailableError, HttpEngineClient, LocalEngineClient

RESPONSE = {"text": "hi", "output_ids": [5, 6],
            "meta_info": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0,
                          "finish_reason": {"type": "stop", "matched": 6},
                          "output_token_logprobs": [(-0.5, 5, None), (-0.25, 6, None)], "weight_version": 2}}


def transport(handler):
    return httpx.MockTransport(handler)


async def test_http_generate_sends_sglang_json():
    seen = []

    def handler(request):
        seen.append((request.method, request.url.path, json.loads(request.content)))
        return httpx.Response(200, json=RESPONSE)

    client = HttpEngineClient("http://engine:30000/", transport=transport(handler))
    out = await client.generate([1, 2, 3], {"max_new_tokens": 2, "temperature": 1.0})
    assert out["output_ids"] == [5, 6]
    assert seen == [("POST", "/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                                           "sampling_params": {"max_new_tokens": 2, "temperature": 1.0}})]
    await client.aclose()


async def test_http_retries_connection_errors_then_succeeds():
    attempts = []

    def handler(request):
        attempts.append(1)
        if len(attempts) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=RESPONSE)

    client = HttpEngineClient("http://engine:1", transport=transport(handler), max_retries=3, retry_backoff=0.001)
    assert (await client.generate([1], {}))["text"] == "hi" and len(attempts) == 3


async def test_http_gives_up_with_a_clear_error():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    client = HttpEngineClient("http://engine:1", transport=transport(handler), max_retries=2, retry_backoff=0.001)
    with pytest.raises(EngineUnavailableError, match=r"engine http://engine:1 unreachable at /generate after 3"):
        await client.generate([1], {})
    assert await client.health() is False


@pytest.mark.parametrize("status, body, error, match", [
    (400, {"error": "bad sampling param 'tempreature'"}, EngineError, r"answered 400.*tempreature"),
    (503, {"error": "overloaded"}, EngineUnavailableError, r"answered 503"),
    (200, {"text": "no ids"}, EngineError, r"malformed response"),
    (200, {**RESPONSE, "output_ids": [5]}, EngineError, r"1 output ids but 2 output_token_logprobs"),
])
async def test_http_error_answers(status, body, error, match):
    client = HttpEngineClient("http://e:1", transport=transport(lambda r: httpx.Response(status, json=body)))
    with pytest.raises(error, match=match):
        await client.generate([1], {})


async def test_http_health_abort_flush():
    paths = []

    def handler(request):
        paths.append((request.url.path, request.content and json.loads(request.content)))
        return httpx.Response(200, json={})

    client = HttpEngineClient("http://e:1", transport=transport(handler))
    assert await client.health() is True
    await client.abort_all()
    await client.flush_cache()
    assert paths == [("/health", b""), ("/abort_request", {"rid": "", "abort_all": True}), ("/flush_cache", b"")]


def test_http_rejects_bad_url():
    with pytest.raises(ValueError, match="must start with http"):
        HttpEngineClient("engine:30000")


class FakeEngine:
    """The in-process Engine's surface that LocalEngineClient uses."""

    def __init__(self):
        self.calls, self.aborted = [], []

    async def async_generate(self, input_ids, sampling_params, return_logprob):
        self.calls.append((input_ids, sampling_params, return_logprob))
        return RESPONSE

    def abort(self, rid=None, abort_all=False):
        self.aborted.append((rid, abort_all))


class FakeActorHandle:
    """A Ray actor handle: every method is called as handle.method.remote(...) and returns an awaitable."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        method = getattr(self.engine, name)

        class Remote:
            @staticmethod
            def remote(*args, **kwargs):
                async def run():
                    result = method(*args, **kwargs)
                    return await result if asyncio.iscoroutine(result) else result
                return asyncio.ensure_future(run())
        return Remote()


@pytest.mark.parametrize("as_actor", [False, True])
async def test_local_client_engine_and_actor_handle(as_actor):
    engine = FakeEngine()
    client = LocalEngineClient(FakeActorHandle(engine) if as_actor else engine)
    out = await client.generate((1, 2), {"max_new_tokens": 2})
    assert out == RESPONSE and engine.calls == [([1, 2], {"max_new_tokens": 2}, True)]
    await client.abort_all()
    assert engine.aborted == [(None, True)]
    assert await client.health() is True
