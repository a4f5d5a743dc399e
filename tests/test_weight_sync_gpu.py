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
