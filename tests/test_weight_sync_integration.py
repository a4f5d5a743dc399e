"""Weight sync between the real megatron trainer (TP=2, two gloo ranks) and the real inference engine.

One spawn of two trainer ranks runs everything, so process start and the megatron import are paid
once: step 1 is pushed over the distributed transport (gloo group), step 2 over the colocated one
while 32 requests are generating, then again with pause_mode "drain"; after each push the engine must hold
exactly the weights the trainer exports and generate what HF transformers generates from that export.
"""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer.testing import make_samples, run_distributed
from weight_sync import ColocatedBucket, WeightChecksumError, WeightSender, WeightSyncConfig, push_weights
from weight_sync.checksum import TensorChecksum, compare_checksums

PROMPTS = [[5, 17, 99, 230, 41, 7], [300, 2, 2, 64], [77, 401, 12, 9, 150, 151, 152]]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
IN_FLIGHT = 32
BUCKET_BYTES = 20_000   # smaller than the embedding (512 x 64 fp32): that tensor travels alone


class _RecordingEndpoint:
    """An Engine as a push endpoint that records how many requests were in flight when it paused for the update."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def pause_generation(self, mode="pause"):
        self.engine.pause_generation(mode)
        self.running_at_pause = self.engine.metrics()["num_running_requests"]

    def update_weights_from_tensor(self, named_tensors, weight_version):
        if isinstance(named_tensors, ColocatedBucket) and named_tensors.pause is not None:   # the push's first
            self.pause_generation(named_tensors.pause)   # message pauses: pause here to look (the engine's is a no-op)
        return self.engine.update_weights_from_tensor(named_tensors, weight_version)


def _sync_worker(rank, world, model_path, out_dir):
    from inference_engine import Engine
    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    cfg = TrainerConfig(hf_checkpoint=str(model_path), tensor_parallel_size=2, lr=1e-2, global_batch_size=8,
                        max_tokens_per_gpu=256, vocab_pad_multiple=96, clip_grad=10.0)
    actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
    actor.init()
    samples = make_samples(8, vocab_size=500, seed=5)
    engine = Engine(model_path=str(model_path), max_total_tokens=8192) if rank == 0 else None
    endpoints = [_RecordingEndpoint(engine)] if rank == 0 else []
    out = {}
    for step, transport, pause_mode in ((1, "distributed", "pause"), (2, "colocated", "pause"),
                                        (3, "colocated", "drain")):
        if step < 3:   # step 3 pushes the same weights again, draining instead of pausing
            actor.train_step(samples)
        sender = None
        if rank == 0:
            sender = WeightSender(WeightSyncConfig(transport=transport, bucket_bytes=BUCKET_BYTES, backend="gloo",
                                                   timeout_s=60, check_weight_update=True, pause_mode=pause_mode))
            sender.connect(endpoints)
        thread, results = None, []
        if rank == 0 and step > 1:   # 32 long requests running while the weights change
            thread = threading.Thread(target=lambda: results.extend(engine.generate(
                input_ids=[[i + 3, 40, 41, i + 100] for i in range(IN_FLIGHT)],
                sampling_params={"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}, return_logprob=True)))
            thread.start()
            deadline = time.monotonic() + 60
            while engine.metrics()["num_running_requests"] < IN_FLIGHT and time.monotonic() < deadline:
                time.sleep(0.005)
        stats = push_weights(actor.iter_hf_weight_buckets(BUCKET_BYTES), endpoints, sender, step)
        export = out_dir / f"step{step}"
        actor.export_hf(export)
        if rank == 0:
            rec = {"stats": stats, "running_at_pause": endpoints[0].running_at_pause, "export": export,
                   "engine": {k: v.clone() for k, v in engine.named_hf_tensors()},
                   "greedy": engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)}
            if thread is not None:
                thread.join()
                rec["in_flight"] = results
            if step == 2:   # corrupt one engine tensor behind the engine's back: verification must name it
                name = "model.layers.1.mlp.up_proj.weight"
                dict(engine.named_hf_tensors())[name].view(-1)[5] += 1e-3
                try:
                    reported = {k: TensorChecksum.from_dict(v) for k, v in endpoints[0].weight_checksums().items()}
                    compare_checksums(sender.sent_checksums, reported, where="engine 0")
                except WeightChecksumError as e:
                    rec["corrupted"] = (name, e.names, str(e))
            sender.close(endpoints)
            out[step] = rec
    if engine is not None:
        engine.shutdown()
    actor.shutdown()
    return out


@pytest.fixture(scope="module")
def synced(qwen3_model, tmp_path_factory):
    return run_distributed(_sync_worker, 2, qwen3_model, tmp_path_factory.mktemp("sync"))[0]


def _hf_greedy_with_logprobs(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        logp = torch.log_softmax(model(out).logits[0].double(), dim=-1)   # [len, vocab]
    new = out[0, len(prompt):]
    return new.tolist(), logp[len(prompt) - 1:-1].gather(-1, new.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("step", [1, 2, 3], ids=["distributed-gloo", "colocated", "colocated-drain"])
def test_engine_holds_exactly_the_trainers_weights(synced, qwen3_model, step):
    rec = synced[step]
    exported = load_file(rec["export"] / "model.safetensors")
    assert sorted(rec["engine"]) == sorted(exported)
    for name, tensor in exported.items():
        assert torch.equal(rec["engine"][name], tensor), name
    original = load_file(qwen3_model / "model.safetensors")
    assert not torch.equal(exported["model.norm.weight"], original["model.norm.weight"])   # the step moved them
    assert rec["stats"].weight_version == step and rec["stats"].buckets > 1


@pytest.mark.parametrize("step", [1, 2, 3], ids=["distributed-gloo", "colocated", "colocated-drain"])
def test_engine_generates_what_hf_generates_from_the_export(synced, step):
    rec = synced[step]
    hf = AutoModelForCausalLM.from_pretrained(rec["export"], dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, rec["greedy"]):
        ids, ref_logp = _hf_greedy_with_logprobs(hf, prompt, GREEDY["max_new_tokens"])
        assert out["output_ids"] == ids
        assert out["meta_info"]["weight_version"] == step
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
        assert torch.allclose(got, ref_logp, atol=1e-4), (got - ref_logp).abs().max()


def test_update_while_32_requests_run(synced):
    rec = synced[2]
    assert rec["running_at_pause"] == IN_FLIGHT   # the update really happened mid-generation
    assert len(rec["in_flight"]) == IN_FLIGHT
    for out in rec["in_flight"]:
        meta = out["meta_info"]
        assert "error" not in meta and meta["finish_reason"]["type"] == "length"
        assert meta["completion_tokens"] == 64 and meta["weight_version"] == 2


def test_drain_finishes_in_flight_requests_on_the_old_weights(synced):
    rec = synced[3]
    assert rec["running_at_pause"] == 0 and rec["stats"].weight_version == 3
    assert len(rec["in_flight"]) == IN_FLIGHT
    for out in rec["in_flight"]:
        meta = out["meta_info"]
        assert "error" not in meta and meta["completion_tokens"] == 64 and meta["weight_version"] == 2


def test_corrupted_engine_tensor_is_named(synced):
    name, names, message = synced[2]["corrupted"]
    assert names == [name] and name in message
