"""Colocated weight sync on one GPU: a trainer-side process shares bf16 buckets by CUDA IPC handle and a
real Engine in this process loads them (no copy through the host)."""

import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_engine import Engine
from weight_sync.buckets import bucket_named_tensors
from weight_sync.ipc import share_bucket

pytestmark = pytest.mark.gpu


def _sender(model_dir: str, out_file: str, bucket_bytes: int, queue, done) -> None:
    """Perturb the checkpoint on cuda:0, save the expected tensors, share them bucket by bucket, wait for the ack."""
    torch.manual_seed(123)
    tensors = {n: (t.float() + 0.01 * torch.randn_like(t.float())).to(torch.bfloat16).cuda()
               for n, t in sorted(load_file(f"{model_dir}/model.safetensors").items())}
    save_file({n: t.cpu() for n, t in tensors.items()}, out_file)
    buckets = [share_bucket(b) for b in bucket_named_tensors(tensors.items(), bucket_bytes)]
    for b in buckets:
        queue.put(b)
    queue.put(None)
    done.wait(120)   # the buffers must outlive the receiver's load


def test_cuda_ipc_push_into_an_engine_equals_the_sent_weights(qwen3_model, tmp_path):
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    expected_file = tmp_path / "expected.safetensors"
    bucket_bytes = 64 << 10   # several buckets; the embedding alone is over one bucket
    sender = ctx.Process(target=_sender, args=(str(qwen3_model), str(expected_file), bucket_bytes, queue, done))
    sender.start()
    engine = Engine(model_path=str(qwen3_model), device="cuda", dtype="bfloat16", disable_cuda_graph=True)
    try:
        n_buckets = 0
        while (bucket := queue.get(timeout=120)) is not None:
            assert engine.update_weights_from_tensor(bucket, weight_version=1) == 1
            n_buckets += 1
        done.set()
        expected = load_file(str(expected_file))
        got = {n: t.detach().cpu() for n, t in engine.named_hf_tensors()}
        assert n_buckets > 1
        assert set(got) == set(expected)
        for name, t in expected.items():
            assert torch.equal(got[name], t), name
        out = engine.generate(input_ids=[5, 17, 42, 9], sampling_params={"max_new_tokens": 8, "temperature": 0})
        assert out["meta_info"]["weight_version"] == 1
    finally:
        done.set()
        engine.shutdown()
        sender.join(60)
    assert sender.exitcode == 0


def test_persistent_push_into_an_engine_process_in_place_then_packed(qwen3_model):
    """The trainer's bf16 weights in one device buffer; a real Engine in another process reads them in place
    (steps 1, 2: the buffer's CUDA IPC mapping kept open, opened once), then through the persistent staging
    buffers after a release / resume (step 3); bit-exact each time."""
    from benchmarks.processes import RemoteWeightEndpoint
    from weight_sync import WeightSender, WeightSyncConfig, push_weights
    from inference_engine.testing import make_engine

    engine = RemoteWeightEndpoint(make_engine, str(qwen3_model), "cuda", "bfloat16", name="engine")
    try:
        tensors = sorted(load_file(f"{qwen3_model}/model.safetensors").items())
        flat = torch.cat([t.reshape(-1) for _, t in tensors]).to(torch.bfloat16).cuda()   # [all weights]
        named, offset = [], 0
        for name, t in tensors:
            named.append((name, flat[offset:offset + t.numel()].view(t.shape)))
            offset += t.numel()
        sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=64 << 10, check_weight_update=True))
        open_storages, opened = [], []
        for step, resident in ((1, [flat]), (2, [flat]), (3, [])):
            flat.add_(0.01 * torch.randn_like(flat))
            if step == 3:
                engine.release_memory(weights=True)
                engine.resume_memory()
            stats = push_weights(bucket_named_tensors(iter(named), 64 << 10), [engine], sender, step,
                                 resident=resident)
            assert stats.weight_version == step and stats.buckets > 1   # checksums verified bit-exact inside
            open_storages.append(engine.metrics()["weight_sync_storages_open"])
            opened.append(engine.metrics()["weight_sync_handles_opened_total"])
        out = engine.generate(input_ids=[5, 17, 42, 9], sampling_params={"max_new_tokens": 8, "temperature": 0})
        assert out["meta_info"]["weight_version"] == 3
        sender.close([engine])
        # the trainer's buffer stays mapped while it lives (opened once); step 3 adds the two staging buffers
        assert open_storages == [1, 1, 3] and opened == [1, 1, 3]
        assert engine.metrics()["weight_sync_storages_open"] == 0
    finally:
        engine.close()
