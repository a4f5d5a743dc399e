"""benchmarks/multi_gpu.py's pieces: pushes into an engine in another process (gloo on CPU, NCCL across 2 GPUs),
collective bandwidth ranks, the router item over two engine servers, and the set-up's errors."""

import shutil
import threading

import pytest
import torch

from benchmarks.multi_gpu import Report, Setup, bench_push, collective_rank, folder_shapes, make_engine, router_item
from benchmarks.processes import RemoteObject, RemoteWeightEndpoint, make_tensor_receiver
from trainer.testing import run_ranks


def _weights(shapes, dtype, device, seed=0):
    torch.manual_seed(seed)
    return [(name, 0.02 * torch.randn(shape, dtype=dtype, device=device)) for name, shape in shapes]


def _assert_engine_holds(endpoint, weights):
    held = dict(endpoint.named_hf_tensors())
    assert sorted(held) == sorted(name for name, _ in weights)
    for name, tensor in weights:
        assert torch.equal(held[name].cpu(), tensor.cpu()), name


def test_distributed_push_into_an_engine_process_over_gloo(qwen3_model, tmp_path):
    setup = Setup(tmp_path, cpu=True)
    shapes = folder_shapes(qwen3_model)
    weights = _weights(shapes, torch.float32, "cpu")
    endpoint = RemoteWeightEndpoint(make_engine, str(qwen3_model), {"max_total_tokens": 1024, "page_size": 4},
                                    name="engine")
    try:
        result = bench_push(weights, endpoint, setup, bucket_bytes=20_000, repeats=1)  # several buckets
        _assert_engine_holds(endpoint, weights)
        assert endpoint.weight_version == 2 and result["verified_version"] == 1 and result["buckets"] > 1
        assert result["tensors"] == len(shapes) and result["gb"] == pytest.approx(
            sum(t.numel() * 4 for _, t in weights) / 1e9)
    finally:
        endpoint.close()


def test_receiver_errors_come_back_with_the_child_traceback():
    with pytest.raises(RuntimeError,
                       match="(?s)receiver process:.*AttributeError: module .torch. has no attribute .no_such_dtype."):
        RemoteWeightEndpoint(make_tensor_receiver, [("w", (2, 2))], "no_such_dtype", "cpu", name="receiver")
    endpoint = RemoteWeightEndpoint(make_tensor_receiver, [("w", (2, 2))], "float32", "cpu", name="receiver")
    try:
        with pytest.raises(RuntimeError, match="KeyError: \"load_weights: unknown tensor 'x'"):
            endpoint.update_weights_from_tensor([("x", torch.zeros(2, 2))], 1)
        assert endpoint.weight_version == 0  # nothing was loaded
    finally:
        endpoint.close()


def test_a_stuck_remote_call_times_out_and_the_process_is_killed():
    remote = RemoteObject(threading.Event, name="waiter")
    assert remote.is_set() is False
    remote.timeout_s = 2  # Event.wait() without a timeout never returns
    with pytest.raises(RuntimeError, match="waiter process did not answer call 'wait' within 2 s"):
        remote.wait()
    assert not remote._proc.is_alive()
    with pytest.raises(RuntimeError, match="waiter process is not running"):
        remote.is_set()
    remote.close()  # nothing left to stop
    closed = RemoteObject(threading.Event, name="event")
    closed.set()
    closed.close()
    assert closed._proc.exitcode == 0


def test_collective_ranks_sum_correctly_over_gloo():
    results = run_ranks(collective_rank, 2, 1 << 20, 1, True, timeout_s=120)
    assert all(r["correct"] for r in results)
    assert all(r["allreduce_busbw"] > 0 and r["broadcast_busbw"] > 0 for r in results)


def test_router_item_spreads_groups_over_two_engine_servers(qwen3_model, tmp_path):
    shutil.copytree(qwen3_model, tmp_path / "tiny-qwen3")
    report = Report("router")
    router_item(Setup(tmp_path, cpu=True), report)
    rows = dict(report.rows)
    assert report.failed == []
    balance = next(v for k, v in rows.items() if k.endswith("requests per engine"))
    assert balance.startswith("8 (50%) / 8 (50%)")
    assert "engine 0 radix cache hit rate" in rows and "engine 1 radix cache hit rate" in rows


def test_setup_names_what_is_missing(tmp_path):
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=r"needs 2 CUDA devices, this machine has \d; pass --cpu"):
            Setup(tmp_path, cpu=False)
    with pytest.raises(FileNotFoundError, match="tiny-qwen3 does not exist; run .*prepare --work .* --cpu"):
        Setup(tmp_path, cpu=True).check_ready()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_push_from_gpu0_into_an_engine_on_gpu1(qwen3_model, tmp_path):
    setup = Setup(tmp_path, cpu=False)
    weights = _weights(folder_shapes(qwen3_model), torch.float32, "cuda:0")
    endpoint = RemoteWeightEndpoint(make_engine, str(qwen3_model), {"device": "cuda", "max_total_tokens": 1024,
                                                                    "page_size": 4}, gpu=1, name="engine")
    try:
        result = bench_push(weights, endpoint, setup, bucket_bytes=20_000, repeats=1)
        _assert_engine_holds(endpoint, weights)
        assert endpoint.weight_version == 2 and result["buckets"] > 1
    finally:
        endpoint.close()
