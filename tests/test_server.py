"""HTTP endpoints through httpx.ASGITransport: SGLang /generate (+ SSE), OpenAI APIs, RL endpoints, errors, metrics."""

import json

import httpx
import pytest
from transformers import AutoTokenizer

pytest.importorskip("fastapi", reason="the HTTP server needs fastapi (the GPU machine has none)")

from inference_engine import Engine
from inference_engine.config import ServerConfig
from inference_engine.serve import build_parser
from inference_engine.server import create_app

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024, context_length=128) as eng:
        yield eng


@pytest.fixture
async def client(engine):
    transport = httpx.ASGITransport(app=create_app(engine, ServerConfig(enable_admin_routes=True)))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def sse_events(body: str) -> list:
    lines = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_generate_single_batch_and_logprobs(client, engine):
    expected = engine.generate("the doctor", sampling_params=GREEDY)
    r = await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY})
    assert r.status_code == 200 and r.json()["output_ids"] == expected["output_ids"]
    r = await client.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": GREEDY,
                                             "return_logprob": True})
    outs = r.json()
    assert len(outs) == 2 and all(len(o["meta_info"]["output_token_logprobs"]) == 6 for o in outs)


async def test_generate_streams_sse(client, engine):
    expected = engine.generate("the doctor", sampling_params=GREEDY)
    r = await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len(events) == 6 and events[-1]["output_ids"] == expected["output_ids"]
    assert events[-1]["text"] == expected["text"] and events[-1]["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("body, message", [
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "unknown sampling parameter"),
    ({"input_ids": [1, 99999]}, "outside the vocabulary"),
    ({"text": ""}, "empty"),
    ({"text": "hi", "temperature": 0}, "unknown field"),
])
async def test_bad_requests_get_400_json_errors(client, body, message):
    r = await client.post("/generate", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert (await client.post("/generate", json={"text": "hi", "sampling_params": GREEDY})).status_code == 200


async def test_openai_completions(client, engine):
    expected = engine.generate("the doctor", sampling_params=GREEDY)
    r = await client.post("/v1/completions", json={"model": "x", "prompt": "the doctor", "max_tokens": 6,
                                                   "temperature": 0, "ignore_eos": True, "logprobs": 2})
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected["text"]
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 6
    assert len(body["choices"][0]["logprobs"]["top_logprobs"][0]) <= 2
    r = await client.post("/v1/completions", json={"prompt": "the doctor", "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True, "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == expected["text"]


async def test_openai_chat_completions_with_template_n_stop_and_stream(client, engine, qwen3_model):
    tok = AutoTokenizer.from_pretrained(qwen3_model)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    expected = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12})
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0,
                                                        "ignore_eos": True, "logprobs": True, "top_logprobs": 2})
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected["text"]}
    assert len(body["choices"][0]["logprobs"]["content"]) == 12
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "n": 3, "seed": 1})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    stop = expected["text"][4:7]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0,
                                                        "ignore_eos": True, "stop": [stop], "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"]["content"] for e in events)
    assert text == expected["text"][:expected["text"].find(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    r = await client.post("/v1/chat/completions", json={"messages": "hello"})
    assert r.status_code == 400


async def test_info_health_models_metrics(client, engine):
    health = (await client.get("/health")).json()
    assert health["ok"] is True and health["status"] == "ok" and health["memory_released"] is False
    assert (await client.get("/get_model_info")).json()["family"] == "qwen3"
    assert (await client.get("/v1/models")).json()["data"][0]["object"] == "model"
    await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY})
    text = (await client.get("/metrics")).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["kiln_num_running_requests"] == 0 and values["kiln_generated_tokens_total"] > 0
    assert 0 <= values["kiln_cache_hit_rate"] <= 1 and "kiln_kv_cache_usage" in values
    assert (await client.post("/flush_cache")).json()["success"]


async def test_rl_endpoints(client, engine, qwen3_model):
    before = (await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY})).json()
    assert (await client.post("/pause_generation")).json()["success"]
    assert (await client.post("/continue_generation")).json()["success"]
    r = await client.post("/update_weights_from_disk", json={"model_path": str(qwen3_model), "weight_version": 3})
    assert r.json()["weight_version"] == 3
    metrics = (await client.get("/metrics")).text  # a dict metric: one labelled sample per key
    assert any(line.startswith('kiln_weight_update_phases_s{part="total"} ') for line in metrics.splitlines())
    assert (await client.get("/get_weight_version")).json() == {"weight_version": 3}
    assert (await client.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]})).json()["success"]
    assert (await client.post("/resume_memory_occupation")).json()["success"]
    after = (await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY})).json()
    assert after["output_ids"] == before["output_ids"] and after["meta_info"]["weight_version"] == 3
    # the RL loop's hand-over over HTTP: weights discarded, taken back alone, refilled from disk, then the KV pool
    body = {"weights": True, "keep_weights": False}
    assert (await client.post("/release_memory_occupation", json=body)).json()["success"]
    assert (await client.post("/resume_memory_occupation", json={"tags": ["weights"]})).json()["success"]
    assert engine.health()["memory_released"] and not engine.health()["weights_released"]
    r = await client.post("/update_weights_from_disk", json={"model_path": str(qwen3_model), "weight_version": 3})
    assert r.json()["weight_version"] == 3 and engine.health()["weights_missing"] == 0
    assert (await client.post("/resume_memory_occupation", json={"tags": ["kv_cache"]})).json()["success"]
    again = (await client.post("/generate", json={"text": "the doctor", "sampling_params": GREEDY})).json()
    assert again["output_ids"] == before["output_ids"]
    r = await client.post("/update_weights_from_disk", json={"model_path": "/nonexistent", "weight_version": 4})
    assert r.status_code == 400 and "/nonexistent" in r.json()["error"]["message"]
    assert (await client.post("/abort_request", json={"rid": "nothing-running"})).json()["success"]


def test_cli_flags_mirror_engine_config(qwen3_model):
    args = build_parser().parse_args(["--model-path", str(qwen3_model), "--page-size", "4", "--disable-radix-cache"])
    assert args.page_size == 4 and args.disable_radix_cache and args.host == "127.0.0.1" and args.port == 30000


CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4}


@pytest.mark.parametrize("route, body, message", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "temprature": 0}, "unknown field(s) ['temprature']"),
    ("/v1/completions", {"prompt": "hi", "max_completion_tokens": 2}, "unknown field(s) ['max_completion_tokens']"),
    ("/v1/chat/completions", {**CHAT, "sampling_params": {"temperature": 0}}, "unknown field(s) ['sampling_params']"),
    ("/v1/chat/completions", {**CHAT, "tools": [], "tool_choice": "auto"}, "['tool_choice', 'tools'] of the OpenAI"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "field(s) ['echo'] of the OpenAI API are not supported"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "['response_format']"),
])
async def test_openai_routes_refuse_unknown_fields(client, route, body, message):
    r = await client.post(route, json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


async def test_openai_routes_ignore_the_documented_fields_they_list(client):
    from inference_engine.server import OPENAI_IGNORED

    extra = {"model": "gpt-4o", "user": "u1", "safety_identifier": "s", "store": False, "metadata": {"a": "b"},
             "service_tier": "auto", "prompt_cache_key": "k", "stream_options": {"include_usage": True}}
    assert set(extra) == set(OPENAI_IGNORED)
    for route, body in (("/v1/completions", {"prompt": "the doctor", "max_tokens": 4}), ("/v1/chat/completions", CHAT)):
        body = {**body, "temperature": 0, "ignore_eos": True}
        plain = await client.post(route, json=body)
        with_extra = await client.post(route, json={**body, **extra})
        assert plain.status_code == with_extra.status_code == 200, with_extra.text
        assert plain.json()["choices"] == with_extra.json()["choices"]


def test_serve_help_describes_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            text = (action.help or "").split("(default:")[0].replace("(required)", "").strip()
            assert len(text) > 10, f"{action.option_strings[0]} has no description"
    text = " ".join(parser.format_help().split())
    assert "--prefix-sharing-min-tokens PREFIX_SHARING_MIN_TOKENS a waiting request waits for a running prefill " \
           "that covers all of its uncached prefix or at least this many tokens of it (default: 32)" in text


def test_field_docs_reads_docstrings_comments_and_wrapped_comments():
    import dataclasses

    from kiln_common.dataclass_docs import field_docs

    @dataclasses.dataclass
    class Example:
        a: int = 1  # first line of a long comment
        # that goes on here
        b: int = 2
        """b's docstring"""
        # a heading, not part of b
        c: int = 3

    assert field_docs(Example) == {"a": "first line of a long comment", "b": "b's docstring"}
    assert field_docs(Example, wrapped_comments=True)["a"] == "first line of a long comment that goes on here"
