"""The colocated transport's persistent path into a real Engine in another process (shared memory on CPU, as
CUDA IPC on GPU).

The stand-in trainer is an HF model whose parameters live in one flat buffer (a contiguous parameter
buffer): tensors that view it are read by the engine in place, copies of them go through the sender's
persistent staging buffers. After every push the engine must hold exactly the trainer's weights and
generate what HF generates from them, while the staging handles are opened once and the in-place ones
stay open between pushes while the trainer's buffer lives (or, with keep_resident_open=False, are
closed after each push).

The RL loop's own path comes last: a TP=1 megatron trainer (`orchestrator.trainer_group.TrainerWorker`, two data-
parallel ranks) pushes after each training step with its parameters resident, so the engine reads
every tensor but q/k/v (which Megatron interleaves) straight out of the trainer's memory.
"""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from benchmarks.processes import RemoteWeightEndpoint
from trainer.testing import make_samples, run_distributed
from weight_sync import WeightSender, WeightSyncConfig, WeightSyncError, bucket_named_tensors, push_weights
from trainer.actor import flatten_parameters
from inference_engine.testing import make_engine
from weight_sync.testing import TensorDictEngine

PROMPT = [5, 17, 99, 230, 41, 7]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
CPU = torch.device("cpu")
BUCKET_BYTES = 40_000   # several buckets; the embedding (512 x 64 fp32) travels alone


@pytest.fixture(scope="module")
def engine(qwen3_model):
    remote = RemoteWeightEndpoint(make_engine, str(qwen3_model), "cpu", "float32", name="engine")
    yield remote
    remote.close()


def _trainer(path, seed):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _step(model, seed)
    return model


def _step(model, seed):
    """A training step: every weight moves, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _buckets(model, bucket_bytes):
    """HF-named tensors: views of the parameters, and every third one a copy (as a TP gather yields)."""
    named = ((n, p.detach().clone() if i % 3 == 2 else p.detach()) for i, (n, p) in enumerate(model.named_parameters()))
    return bucket_named_tensors(named, bucket_bytes)


def _hf_greedy(model, prompt):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY["max_new_tokens"], do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _assert_engine_equals(engine, trainer, version):
    held = dict(engine.named_hf_tensors())
    params = dict(trainer.named_parameters())
    assert sorted(held) == sorted(params)
    for name, p in params.items():
        assert torch.equal(held[name], p.detach()), name
    out = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)
    assert out["output_ids"] == _hf_greedy(trainer, PROMPT)
    assert out["meta_info"]["weight_version"] == version


def _storage(model) -> set[int]:
    """The storages (data pointers) that hold the model's parameters."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}

@pytest.mark.parametrize("keep", [True, False], ids=["kept-open", "per-push"])
def test_pushes_with_engine_release_resume_and_trainer_offload(engine, qwen3_model, keep):
    """Step 2 repeats step 1's layout (kept: nothing opened, the engine's views and copy lists reused), step 3
    follows an engine release / resume (new parameters, same trainer storage), step 4 a trainer move."""
    trainer = _trainer(qwen3_model, seed=1)
    flatten_parameters(trainer, CPU)
    config = WeightSyncConfig(transport="colocated", bucket_bytes=BUCKET_BYTES, check_weight_update=True,
                              keep_resident_open=keep)
    sender = WeightSender(config)
    opened, storages_open = [], []
    try:
        for step in (1, 2, 3, 4):
            _step(trainer, seed=step + 1)
            if step == 3:
                engine.release_memory(weights=True)
                engine.resume_memory()
            if step == 4:   # the trainer offloads and comes back elsewhere
                old = _storage(trainer)
                for p in trainer.parameters():
                    p.data = p.data.clone()
                flatten_parameters(trainer, CPU)
                assert _storage(trainer) != old
            stats = push_weights(_buckets(trainer, BUCKET_BYTES), [engine], sender, weight_version=step,
                                 resident=list(trainer.parameters()))
            assert stats.weight_version == step and stats.buckets > 1
            copies = sum(1 for i, _ in enumerate(trainer.named_parameters()) if i % 3 == 2)
            assert stats.in_place_tensors == stats.tensors - copies
            _assert_engine_equals(engine, trainer, step)
            metrics = engine.metrics()
            storages_open.append(metrics["weight_sync_storages_open"])
            opened.append(metrics["weight_sync_handles_opened_total"])
        if keep:
            sender.release([engine])   # as the trainer does before it offloads
            assert engine.metrics()["weight_sync_storages_open"] == 2
            assert engine.weight_version == 4   # a release loads nothing
    finally:
        sender.close([engine])
    assert engine.metrics()["weight_sync_storages_open"] == 0
    deltas = [b - a for a, b in zip(opened, opened[1:])]
    if keep:   # the trainer's buffer stays open beside the two staging buffers; opened again only after it moved
        assert storages_open == [3, 3, 3, 3] and deltas == [0, 0, 1]
    else:      # the staging buffers stay open; the trainer's buffer is opened and closed within every push
        assert storages_open == [2, 2, 2, 2] and deltas == [1, 1, 1]


def test_bucket_smaller_than_one_tensor_in_bf16(engine, qwen3_model):
    """bucket_bytes=1: each tensor alone, all packed; staging buffers grow during the first push only."""
    trainer = _trainer(qwen3_model, seed=4)
    sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=1))
    named = lambda: ((n, p.detach().bfloat16()) for n, p in trainer.named_parameters())   # noqa: E731
    try:
        version = engine.weight_version + 1
        first = push_weights(bucket_named_tensors(named(), 1), [engine], sender, version)
        opened = engine.metrics()["weight_sync_handles_opened_total"]
        second = push_weights(bucket_named_tensors(named(), 1), [engine], sender, version + 1)
    finally:
        sender.close()
    assert first.buckets == first.tensors == len(list(trainer.named_parameters()))
    assert second.weight_version == first.weight_version + 1
    assert engine.metrics()["weight_sync_handles_opened_total"] == opened   # nothing re-opened
    held = dict(engine.named_hf_tensors())
    for name, p in trainer.named_parameters():
        assert torch.equal(held[name], p.detach().bfloat16().float()), name


def test_receiver_that_lost_its_handles_gets_a_clear_error_then_fresh_ones(qwen3_model):
    trainer = _trainer(qwen3_model, seed=5)
    target = TensorDictEngine({n: torch.zeros_like(p) for n, p in trainer.named_parameters()})
    sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=BUCKET_BYTES))
    try:
        push_weights(_buckets(trainer, BUCKET_BYTES), [target], sender, 1)
        target.receiver.shared.close()   # e.g. the engine restarted behind the same endpoint
        with pytest.raises(WeightSyncError, match="engine 0: .*shared storage \\d+ .*never opened"):
            push_weights(_buckets(trainer, BUCKET_BYTES), [target], sender, 2)
        assert not target.paused and target.weight_version == 1
        _step(trainer, seed=6)
        assert push_weights(_buckets(trainer, BUCKET_BYTES), [target], sender, 2).weight_version == 2
    finally:
        sender.close()
    for name, p in trainer.named_parameters():
        assert torch.equal(target.tensors[name], p.detach()), name


def _trainer_push_worker(rank, world, model_path, out_dir):
    """Two TP=1 trainer ranks, as the RL loop drives them: train, push (rank 0 into an Engine process), export."""
    from trainer.config import TrainerConfig
    from orchestrator.trainer_group import TrainerWorker

    cfg = TrainerConfig(hf_checkpoint=str(model_path), lr=1e-2, global_batch_size=8, max_tokens_per_gpu=256,
                        vocab_pad_multiple=96, clip_grad=10.0)   # padded vocab 576: the exported embedding is a slice
    worker = TrainerWorker(cfg, rank, world, "127.0.0.1", 0)
    worker.init()
    engine = RemoteWeightEndpoint(make_engine, str(model_path), name="engine") if rank == 0 else None
    sync = WeightSyncConfig(transport="colocated", bucket_bytes=BUCKET_BYTES, check_weight_update=True)
    samples = make_samples(8, vocab_size=500, seed=5)
    out = {}
    try:
        worker.connect_engines([engine] if engine else [], sync)
        worker.export_hf(out_dir / "step0")
        for step in (1, 2):
            worker.train_step(samples)
            stats = worker.push_weights(step)
            worker.export_hf(out_dir / f"step{step}")
            if engine is not None:
                out[step] = {"stats": stats, "engine": {n: t.clone() for n, t in engine.named_hf_tensors()},
                             "greedy": engine.generate(input_ids=PROMPT, sampling_params=GREEDY),
                             "storages_open": engine.metrics()["weight_sync_storages_open"]}
            worker.offload()   # as the colocated loop does for the rollout: the engine lets go of the parameters first
            if engine is not None:
                out[step]["storages_open_offloaded"] = engine.metrics()["weight_sync_storages_open"]
            worker.onload()
        worker.disconnect_engines()
        if engine is not None:
            out["storages_open_disconnected"] = engine.metrics()["weight_sync_storages_open"]
    finally:
        if engine is not None:
            engine.close()
        worker.shutdown()
    return out


@pytest.fixture(scope="module")
def trainer_pushes(qwen3_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trainer_push")
    return run_distributed(_trainer_push_worker, 2, qwen3_model, out_dir, timeout=300)[0], out_dir


def test_trainer_export_is_unchanged_by_in_place_views(trainer_pushes, qwen3_model):
    """Before any step the export is the original checkpoint bit for bit (views are copied before saving)."""
    _, out_dir = trainer_pushes
    original = load_file(qwen3_model / "model.safetensors")
    original.pop("lm_head.weight", None)   # tied to the embedding
    exported = load_file(out_dir / "step0" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("step", [1, 2])
def test_trainer_push_reads_all_but_qkv_in_place(trainer_pushes, step):
    results, out_dir = trainer_pushes
    stats = results[step]["stats"]
    exported = load_file(out_dir / f"step{step}" / "model.safetensors")
    qkv = [t for name, t in exported.items() if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    assert len(qkv) == 6 and stats["tensors"] == len(exported)
    assert stats["in_place_tensors"] == len(exported) - len(qkv)
    assert stats["bytes"] - stats["in_place_bytes"] == sum(t.numel() * t.element_size() for t in qkv)
    assert stats["in_place_bytes"] > 0.6 * stats["bytes"]
    # the trainer's one parameter buffer stays open beside the staging buffers until the trainer offloads
    assert results[step]["storages_open"] == results[step]["storages_open_offloaded"] + 1 <= 3
    assert results["storages_open_disconnected"] == 0


@pytest.mark.parametrize("step", [1, 2])
def test_engine_after_trainer_push_equals_hf_from_the_export(trainer_pushes, step):
    results, out_dir = trainer_pushes
    exported = load_file(out_dir / f"step{step}" / "model.safetensors")
    before = load_file(out_dir / f"step{step - 1}" / "model.safetensors")
    assert not torch.equal(exported["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    held = results[step]["engine"]
    assert sorted(held) == sorted(exported)
    for name, tensor in exported.items():
        assert torch.equal(held[name], tensor), name
    hf = AutoModelForCausalLM.from_pretrained(out_dir / f"step{step}", dtype=torch.float32).eval()
    out = results[step]["greedy"]
    assert out["output_ids"] == _hf_greedy(hf, PROMPT)
    assert out["meta_info"]["weight_version"] == step


def test_one_call_push_into_a_generating_engine_loses_nothing(qwen3_model):
    """Pause, load, flush, version and continue as one engine call while 16 requests decode: with the weights
    unchanged every request's tokens are those of a run without the push; the engine reports its phases."""
    trainer = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()
    flatten_parameters(trainer, CPU)
    engine = make_engine(str(qwen3_model), max_total_tokens=8192)
    prompts = [[i + 3, 40, 41, i + 100] for i in range(16)]
    params = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    sender = WeightSender(WeightSyncConfig(transport="colocated"))
    try:
        reference = engine.generate(input_ids=prompts, sampling_params=params)
        results = []
        thread = threading.Thread(target=lambda: results.extend(engine.generate(input_ids=prompts,
                                                                                sampling_params=params)))
        thread.start()
        deadline = time.monotonic() + 60
        while engine.metrics()["num_running_requests"] < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.001)
        stats = push_weights(bucket_named_tensors(((n, p.detach()) for n, p in trainer.named_parameters()), 1 << 30),
                             [engine], sender, weight_version=7, resident=list(trainer.parameters()))
        metrics = engine.metrics()
        thread.join()
    finally:
        sender.close()
        engine.shutdown()
    assert stats.messages == 1 and stats.in_place_tensors == stats.tensors
    assert not metrics["paused"] and metrics["weight_version"] == 7
    phases = metrics["weight_update_phases_s"]
    assert set(phases) >= {"drain", "open", "queue", "load", "flush", "close", "total"}
    assert phases["total"] >= phases["open"] + phases["load"] + phases["flush"] > 0
    assert [r["output_ids"] for r in results] == [r["output_ids"] for r in reference]
    assert {r["meta_info"]["weight_version"] for r in results} == {7}
