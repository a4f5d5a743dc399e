"""The Engine's own weight-sync surface (SGLang names), in-process and over HTTP, fed by a stand-in trainer process.

The stand-in sender is a spawned process that is rank 0 of a gloo weight-update group and broadcasts
the buckets of another model's checkpoint; afterwards the engine must hold exactly those tensors and
report the new weight version in later responses.
"""

import multiprocessing

import httpx
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("fastapi", reason="the HTTP server needs fastapi (the GPU machine has none)")

from inference_engine import Engine
from inference_engine.config import ServerConfig
from inference_engine.server import create_app
from inference_engine.testing import make_tiny_model
from weight_sync import (FlatLayout, WeightSender, WeightSyncConfig, WeightUpdateGroup, bucket_named_tensors,
                         compare_checksums, push_weights, share_bucket)
from weight_sync.checksum import TensorChecksum, checksums
from kiln_common.net import free_port

BUCKET_BYTES = 20_000  # smaller than the embedding (512 x 64 fp32): several buckets, one tensor alone
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPT = [5, 17, 99, 230, 41, 7]


@pytest.fixture(scope="module")
def other_qwen3(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("sync_other_qwen3"), "qwen3", seed=42, tokenizer_dir=tokenizer_dir)


def _buckets(model_path) -> list[list[tuple[str, torch.Tensor]]]:
    return list(bucket_named_tensors(sorted(load_file(model_path / "model.safetensors").items()), BUCKET_BYTES))


def _send(port: int, world_size: int, group_name: str, model_path, done) -> None:
    """The stand-in trainer: rank 0 of the update group, broadcasting each bucket as one flat buffer per dtype."""
    group = WeightUpdateGroup("127.0.0.1", port, 0, world_size, group_name, backend="gloo", timeout_s=60)
    for bucket in _buckets(model_path):
        for buf in FlatLayout.of(bucket).flatten(bucket):
            group.broadcast(buf, src=0)
    done.wait(60)  # the engine has taken every bucket before the group goes away
    group.close()


def _start_sender(world_size: int, group_name: str, model_path):
    ctx = multiprocessing.get_context("spawn")
    port, done = free_port(), ctx.Event()
    proc = ctx.Process(target=_send, args=(port, world_size, group_name, model_path, done), daemon=True)
    proc.start()
    return proc, port, done


def _finish_sender(proc, done) -> None:
    done.set()
    proc.join(60)
    assert proc.exitcode == 0


def _assert_holds(engine: Engine, model_path) -> None:
    sent = load_file(model_path / "model.safetensors")
    held = dict(engine.named_hf_tensors())
    assert sorted(held) == sorted(sent)
    for name, tensor in held.items():
        assert torch.equal(tensor, sent[name]), name


@pytest.mark.parametrize("tp_size", [1, 2])
def test_distributed_push_in_process_loads_the_sent_weights(qwen3_model, other_qwen3, tp_size):
    with Engine(model_path=str(other_qwen3), max_total_tokens=1024) as fresh:
        expected = fresh.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024, tp_size=tp_size) as engine:
        assert engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"] != expected
        proc, port, done = _start_sender(1 + tp_size, "push", other_qwen3)
        engine.init_weights_update_group("127.0.0.1", port, 1, 1 + tp_size, "push", "gloo", 60)  # tp rank r: 1 + r
        for bucket in _buckets(other_qwen3):
            meta = FlatLayout.of(bucket).metadata()
            assert engine.update_weights_from_distributed(meta["names"], meta["dtypes"], meta["shapes"], "push",
                                                          weight_version=5) == 5
        engine.destroy_weights_update_group("push")
        _finish_sender(proc, done)
        _assert_holds(engine, other_qwen3)
        out = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)
        assert out["output_ids"] == expected and out["meta_info"]["weight_version"] == 5
        with pytest.raises(RuntimeError, match="no weight-update group 'push'"):
            engine.destroy_weights_update_group("push")


async def test_http_routes_push_weights_and_report_versions(qwen3_model, other_qwen3):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        transport = httpx.ASGITransport(app=create_app(engine, ServerConfig(enable_admin_routes=True)))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            proc, port, done = _start_sender(2, "http_push", other_qwen3)
            r = await client.post("/init_weights_update_group", json={
                "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                "group_name": "http_push", "backend": "gloo"})
            assert r.status_code == 200 and r.json()["success"]
            for bucket in _buckets(other_qwen3):
                r = await client.post("/update_weights_from_distributed", json={
                    **FlatLayout.of(bucket).metadata(), "group_name": "http_push", "weight_version": 3})
                assert r.status_code == 200 and r.json()["weight_version"] == 3
            r = await client.post("/destroy_weights_update_group", json={"group_name": "http_push"})
            assert r.status_code == 200
            _finish_sender(proc, done)
            _assert_holds(engine, other_qwen3)
            sent = checksums(load_file(other_qwen3 / "model.safetensors").items())
            r = await client.get("/weights_checksum")
            reported = {k: TensorChecksum.from_dict(v) for k, v in r.json()["checksums"].items()}
            compare_checksums(sent, reported)
            assert r.json()["weight_version"] == 3
            r = await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY})
            assert r.json()["meta_info"]["weight_version"] == 3
            assert (await client.get("/get_weight_version")).json() == {"weight_version": 3}

            original = sorted(load_file(qwen3_model / "model.safetensors").items())
            for payload, version in ((original, 4), (share_bucket(original), 5)):  # pairs, then a shared bucket
                assert engine.update_weights_from_tensor(payload, version) == version   # in-process (or Ray) only
                _assert_holds(engine, qwen3_model)
            r = await client.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["eA=="],
                                                                       "weight_version": 9})
            assert r.status_code == 400 and "not accepted over HTTP" in r.json()["error"]["message"]
            assert (await client.get("/get_weight_version")).json() == {"weight_version": 5}
            r = await client.post("/update_weights_from_disk", json={"model_path": str(other_qwen3)})
            assert r.status_code == 400 and "needs field(s) ['weight_version']" in r.json()["error"]["message"]
            r = await client.post("/update_weights_from_disk", json={"model_path": str(other_qwen3),
                                                                     "weight_version": 6})
            assert r.json()["weight_version"] == 6
            assert (await client.post("/pause_generation", json={"mode": "drain"})).status_code == 200
            assert engine.metrics()["paused"]
            assert (await client.post("/continue_generation")).status_code == 200
            r = await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY})
            assert r.json()["meta_info"]["weight_version"] == 6

            bad = [("/update_weights_from_distributed", {"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                         "shapes": [[64]], "group_name": "nope", "weight_version": 7},
                    409, "no weight"),
                   ("/update_weights_from_distributed", {"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                         "shapes": [[64]], "group_name": "nope",
                                                         "weight_version": "7"}, 400, "'weight_version' = '7'"),
                   ("/update_weights_from_distributed", {"names": []}, 400, "dtypes"),
                   ("/pause_generation", {"mode": "later"}, 400, "pause mode 'later'")]
            for route, body, status, message in bad:
                r = await client.post(route, json=body)
                assert r.status_code == status and message in r.json()["error"]["message"], (route, r.json())
            assert engine.weight_version == 6 and not engine.metrics()["paused"]


def test_engine_is_a_push_weights_endpoint_itself(qwen3_model, other_qwen3):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=BUCKET_BYTES,
                                               check_weight_update=True, pause_mode="drain"))
        stats = push_weights(_buckets(other_qwen3), [engine], sender, 1)
        assert stats.weight_version == 1 and stats.buckets > 1 and engine.weight_version == 1
        _assert_holds(engine, other_qwen3)
        assert not engine.metrics()["paused"]
