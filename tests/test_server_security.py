"""The HTTP control surface as an attack surface (docs/security.md): no unpickling, the api key, the admin switch,
admission limits (body size, n, prompt length, client disconnects) and bad input as 400s naming the field."""

import base64
import contextlib
import json
import math
import pickle
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the HTTP server needs fastapi (the GPU machine has none)")

from inference_engine import Engine  # noqa: E402
from inference_engine.config import ServerConfig  # noqa: E402
from inference_engine.sampling_params import SamplingParams  # noqa: E402
from inference_engine.serve import API_KEY_ENV, parse_configs  # noqa: E402
from inference_engine.server import ADMIN_PATHS, create_app  # noqa: E402
from kiln_common.net import free_port  # noqa: E402
from orchestrator.actors import http_host  # noqa: E402
from rollout.client import EngineError, HttpEngineClient  # noqa: E402

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024, context_length=128) as eng:
        yield eng


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@contextlib.contextmanager
def serving(app):
    """The app on a real uvicorn server bound to 127.0.0.1 (sockets, disconnects); yields its base URL."""
    import uvicorn

    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class _CreatesFile:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code from the network."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _routes(app) -> list[tuple[str, set[str]]]:
    return [(r.path, set(r.methods) - {"HEAD"}) for r in app.routes if hasattr(r, "methods")]


async def test_a_pickle_payload_to_every_route_is_refused_and_never_unpickled(engine, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFile(probe)))   # the payload does what it says when unpickled
    assert probe.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps(_CreatesFile(marker))
    wrapped = {"serialized_named_tensors": [base64.b64encode(payload).decode()], "weight_version": 1,
               "text": base64.b64encode(payload).decode()}
    app = create_app(engine, ServerConfig(api_key=KEY))   # a key: every route, admin ones included, is reachable
    async with _client(app) as client:
        for path, methods in _routes(app):
            for method in methods | {"POST"}:
                for content, kind in ((payload, "application/octet-stream"), (payload, "application/json"),
                                      (json.dumps(wrapped).encode(), "application/json")):
                    r = await client.request(method, path, content=content,
                                             headers={**AUTH, "Content-Type": kind})
                    if method == "GET":   # a GET route reads no body at all
                        continue
                    assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:200])
    assert not marker.exists()


async def test_every_route_but_health_needs_the_key_and_admin_routes_work_with_it(engine, qwen3_model):
    app = create_app(engine, ServerConfig(api_key=KEY))
    async with _client(app) as client:
        for path, methods in _routes(app):
            for method in methods:
                for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
                    r = await client.request(method, path, headers=headers)
                    if path == "/health":
                        assert r.status_code == 200 and r.json()["ok"] is True and KEY not in r.text
                    else:
                        assert r.status_code == 401, (method, path, headers)
                        assert r.headers["www-authenticate"] == "Bearer"
        assert (await client.post("/generate", headers=AUTH, json={"text": "hi", "sampling_params": GREEDY})).is_success
        answers = {
            ("POST", "/pause_generation", None): 200, ("POST", "/continue_generation", None): 200,
            ("GET", "/flush_cache", None): 200, ("POST", "/flush_cache", None): 200,
            ("POST", "/release_memory_occupation", '{"tags": ["kv_cache"]}'): 200,
            ("POST", "/resume_memory_occupation", None): 200,
            ("POST", "/update_weights_from_disk", json.dumps({"model_path": str(qwen3_model),
                                                              "weight_version": 1})): 200,
            ("POST", "/init_weights_update_group", json.dumps({"master_address": "127.0.0.1", "master_port": 1,
                                                               "rank_offset": 1, "world_size": 1,
                                                               "group_name": "g"})): 400,   # the engine's answer
            ("POST", "/update_weights_from_distributed", json.dumps({"names": [], "dtypes": [], "shapes": [],
                                                                     "group_name": "none",
                                                                     "weight_version": 2})): 409,
            ("POST", "/destroy_weights_update_group", '{"group_name": "none"}'): 409,
            ("POST", "/update_weights_from_tensor", "{}"): 400,
        }
        assert {path for _, path, _ in answers} == ADMIN_PATHS   # every admin route is tried
        for (method, path, body), status in answers.items():
            r = await client.request(method, path, content=body, headers=AUTH)
            assert r.status_code == status, (path, r.text)
        r = await client.post("/abort_request", headers=AUTH, json={"rid": "", "abort_all": True})
        assert r.json()["success"] and engine.weight_version == 1 and not engine.metrics()["paused"]


async def test_admin_routes_are_off_without_a_key_unless_enabled(engine):
    async with _client(create_app(engine)) as client:   # the default ServerConfig: no key, admin routes off
        for path in sorted(ADMIN_PATHS):
            r = await client.post(path, json={})
            assert r.status_code == 403 and "--enable-admin-routes" in r.json()["error"]["message"], path
        r = await client.post("/abort_request", json={"abort_all": True})
        assert r.status_code == 403 and "abort_all" in r.json()["error"]["message"]
        assert (await client.post("/abort_request", json={"rid": "not-running"})).status_code == 200
        assert (await client.post("/generate", json={"text": "hi", "sampling_params": GREEDY})).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    async with _client(create_app(engine, ServerConfig(enable_admin_routes=True))) as client:
        assert (await client.post("/pause_generation")).status_code == 200
        assert (await client.post("/continue_generation")).status_code == 200
    assert not engine.metrics()["paused"]


def test_a_client_that_disconnects_frees_its_request(engine):
    """Non-streaming: the server notices the closed connection while it waits and aborts the request."""
    with serving(create_app(engine, ServerConfig(api_key=KEY, disconnect_poll_s=0.05))) as url:
        port = int(url.rsplit(":", 1)[1])
        engine.pause_generation()   # the request stays queued until its client leaves
        try:
            body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": GREEDY}).encode()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while engine.metrics()["num_queued_requests"] != 1:
                assert time.monotonic() < deadline, "the request never reached the engine"
                time.sleep(0.01)
            sock.close()
            deadline = time.monotonic() + 10
            while engine.metrics()["num_queued_requests"] + engine.metrics()["num_running_requests"]:
                assert time.monotonic() < deadline, "the disconnected client's request was not freed"
                time.sleep(0.02)
        finally:
            engine.continue_generation()


async def test_n_above_the_cap_is_refused(engine):
    async with _client(create_app(engine, ServerConfig(max_n=4))) as client:
        for sp in ({**GREEDY, "n": 5}, [GREEDY, {**GREEDY, "n": 5}]):
            text = "hi" if isinstance(sp, dict) else ["hi", "there"]
            r = await client.post("/generate", json={"text": text, "sampling_params": sp})
            assert r.status_code == 400 and "max_n of 4" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json={"prompt": "hi", "n": 5, "max_tokens": 2})
        assert r.status_code == 400 and "n = 5" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "n": 5, "max_tokens": 2})
        assert r.status_code == 400
        r = await client.post("/generate", json={"text": "hi", "sampling_params": {**GREEDY, "n": 4}})
        assert r.status_code == 200 and len(r.json()) == 4


def test_an_8mb_prompt_is_refused_fast_while_health_answers(engine):
    big = json.dumps({"text": "a" * (8 << 20), "sampling_params": GREEDY}).encode()
    with serving(create_app(engine, ServerConfig(api_key=KEY))) as url:
        result = {}

        def send():
            start = time.monotonic()
            result["response"] = httpx.post(f"{url}/generate", content=big, timeout=60,
                                            headers={**AUTH, "Content-Type": "application/json"})
            result["seconds"] = time.monotonic() - start

        sender = threading.Thread(target=send)
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as client:
            client.get("/health")   # the connection is open before the big request starts
            sender.start()
            while sender.is_alive():
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.01)
        sender.join()
    assert result["response"].status_code == 400 and "cannot fit" in result["response"].json()["error"]["message"]
    assert result["seconds"] < 10 and latencies and max(latencies) < 0.5, (result["seconds"], max(latencies))


async def test_bodies_over_the_limit_get_413_before_they_are_read(engine):
    app = create_app(engine, ServerConfig(max_request_bytes=64 << 10))
    big = json.dumps({"text": "a" * (128 << 10)}).encode()
    async with _client(app) as client:
        r = await client.post("/generate", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]

        async def chunks():   # no Content-Length: counted as it streams in
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]

        r = await client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
        r = await client.post("/generate", json={"text": "hi", "sampling_params": GREEDY})
        assert r.status_code == 200


@pytest.mark.parametrize("route, body, field", [
    ("/generate", {"input_ids": {"a": 1}}, "'input_ids'"),
    ("/generate", {"input_ids": [[1, 2], "x"]}, "'input_ids'"),
    ("/generate", {"text": "\ud800 lone surrogate"}, "lone surrogate"),
    ("/generate", {"text": ["ok", "\udfff"]}, "lone surrogate"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 1.5}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": "5"}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": "greedy"}, "'sampling_params'"),
    ("/generate", {"text": "hi", "sampling_params": {"n": "2"}}, "n="),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": 1e309}}, "Infinity is not a JSON number"),
    ("/generate", {"text": "hi", "return_logprob": "yes"}, "'return_logprob'"),
    ("/generate", {"text": "hi", "rid": {"a": 1}}, "'rid'"),
    ("/generate", {"text": "hi", "stream": "yes"}, "'stream'"),
    ("/generate", {"text": "a" * 100_000}, "cannot fit"),
    ("/generate", {"input_ids": list(range(1, 200))}, "context_length"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "'max_tokens'"),
    ("/v1/completions", {"prompt": {"a": 1}}, "'prompt'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "'logprobs'"),
    ("/pause_generation", {"mode": 3}, "'mode'"),
    ("/release_memory_occupation", {"tags": "weights"}, "'tags'"),
])
async def test_bad_types_get_a_400_naming_the_field(engine, route, body, field):
    async with _client(create_app(engine, ServerConfig(enable_admin_routes=True))) as client:
        r = await client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        r = await client.post("/generate", content=b'{"text": "hi", "sampling_params": {"temperature": NaN}}')
        assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    assert not engine.metrics()["paused"]


def test_bad_types_in_process_raise_value_error_naming_the_argument(engine):
    with pytest.raises(ValueError, match="input_ids must be a list"):
        engine.generate(input_ids={"a": 1})
    with pytest.raises(ValueError, match="lone surrogate"):
        engine.generate("\ud800")
    with pytest.raises(ValueError, match="sampling_params must be"):
        engine.generate("hi", sampling_params="greedy")
    for name in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(ValueError, match=f"{name}=inf is invalid; expected a finite number"):
            engine.generate("hi", sampling_params={name: float("inf")})


def test_a_temperature_that_underflows_is_greedy_with_finite_log_probs(engine):
    """1 / 1e-300 overflows float32 (1e-300 is 0 there): such a temperature is greedy, as SGLang does below 1e-6."""
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    greedy = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 8},
                             return_logprob=True)
    engine.flush_cache()  # the same computation for both (a cached prefix is an extend: float32 sums in another order)
    tiny = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 8,
                                                                 "temperature": 1e-300, "seed": 1},
                           return_logprob=True)
    assert tiny["output_ids"] == greedy["output_ids"]
    logprobs = [lp for lp, _, _ in tiny["meta_info"]["output_token_logprobs"]]
    assert all(math.isfinite(lp) for lp in logprobs)
    assert logprobs == [lp for lp, _, _ in greedy["meta_info"]["output_token_logprobs"]]


def test_a_top_k_beyond_the_vocabulary_is_no_top_k(engine):
    """top_k >= vocab size (2**63 included, once an int64 overflow that made the request greedy) means no top-k."""
    vocab = engine.spec.vocab_size
    sampled = {**GREEDY, "temperature": 1.0, "seed": 3, "max_new_tokens": 16}
    reference = engine.generate(input_ids=[5, 6, 7], sampling_params={**sampled, "top_k": -1}, return_logprob=True)
    greedy = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 16})
    assert reference["output_ids"] != greedy["output_ids"]   # the draws differ from greedy, so greedy would show
    for top_k in (vocab, vocab + 1, 2**31, 2**63, 2**70):
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={**sampled, "top_k": top_k}, return_logprob=True)
        assert out["output_ids"] == reference["output_ids"], top_k
        assert out["meta_info"]["output_token_logprobs"] == reference["meta_info"]["output_token_logprobs"]


async def test_the_rollout_http_client_sends_the_key(engine):
    app = create_app(engine, ServerConfig(api_key=KEY))
    client = HttpEngineClient("http://test", api_key=KEY, transport=httpx.ASGITransport(app=app), max_retries=0)
    out = await client.generate([5, 6, 7], GREEDY)
    assert out["output_ids"] == engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["output_ids"]
    await client.abort_all()   # an admin route: the key turns them on
    await client.flush_cache()
    assert await client.health()
    await client.aclose()
    keyless = HttpEngineClient("http://test", transport=httpx.ASGITransport(app=app), max_retries=0)
    with pytest.raises(EngineError, match="401"):
        await keyless.generate([5, 6, 7], GREEDY)
    assert await keyless.health()   # /health is open
    await keyless.aclose()


def test_server_config_flags_env_and_validation(qwen3_model, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    _, server, _ = parse_configs(["--model-path", str(qwen3_model)])
    assert server.host == "127.0.0.1" and server.api_key is None and not server.admin_routes
    _, server, _ = parse_configs(["--model-path", str(qwen3_model), "--enable-admin-routes", "--max-n", "8"])
    assert server.admin_routes and server.max_n == 8 and server.api_key is None
    monkeypatch.setenv(API_KEY_ENV, KEY)
    _, server, _ = parse_configs(["--model-path", str(qwen3_model)])
    assert server.api_key == KEY and server.admin_routes
    _, server, _ = parse_configs(["--model-path", str(qwen3_model), "--api-key", "flag-key-0123456789"])
    assert server.api_key == "flag-key-0123456789"
    for bad in ({"api_key": "short"}, {"api_key": "has a space in it"}, {"max_n": 0}, {"max_request_bytes": 10},
                {"port": 70000}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad)


def test_engine_actors_bind_the_nodes_own_address():
    assert http_host("127.0.1.1") == "127.0.0.1" and http_host("::1") == "127.0.0.1"
    assert http_host("10.1.2.3") == "10.1.2.3"
