"""The GPU trainer: bf16 parameters with fp32 master weights (checked on CPU too), and `-m gpu` end-to-end checks."""

import pytest
import torch
import torch.distributed as dist

from trainer.config import TrainerConfig
from trainer.optimizer import PolicyOptimizer
from trainer.testing import hf_response_logprobs, make_samples, run_distributed
from kiln_common.net import free_port


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_bf16_params_accumulate_fp32_main_grads_and_step_fp32_masters(world_of_one, qwen3_model):
    cfg = TrainerConfig(hf_checkpoint=str(qwen3_model), lr=1e-2, clip_grad=0.0, adam_eps=1e-3)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    opt = PolicyOptimizer(model, cfg, dp_group=world_of_one, tp_group=world_of_one, tp_rank=0)
    master = opt.params[0]
    assert master.dtype == torch.float32 and torch.equal(master, model.weight.float())
    xs = [torch.randn(3, 8, dtype=torch.bfloat16) for _ in range(2)]
    for x in xs:  # two micro-batches
        model(x).float().square().sum().backward()
        assert model.weight.grad is None  # moved into the fp32 main grad at once
    expected = sum((2 * (x.float() @ model.weight.float().t())).t() @ x.float() for x in xs)  # d/dW sum (xW^T)^2
    assert (master.grad - expected).abs().max() < 0.05 * expected.abs().max()
    reference = torch.optim.AdamW([master.detach().clone().requires_grad_(True)], lr=1e-2, betas=(0.9, 0.98),
                                  eps=1e-3, weight_decay=0.0)
    reference.param_groups[0]["params"][0].grad = master.grad.clone()
    opt.step()
    reference.step()
    assert torch.equal(master, reference.param_groups[0]["params"][0].detach())
    assert torch.equal(model.weight, master.to(torch.bfloat16))  # the bf16 copy follows its master
    state = opt.state_dict()
    assert len(state["master_weights"]) == 1
    with torch.no_grad():
        model.weight.zero_()
        master.zero_()
    opt.load_state_dict(state)
    assert torch.equal(master, state["master_weights"][0]) and torch.equal(model.weight, master.to(torch.bfloat16))


def _gpu_worker(rank, world, path, family):
    from transformers import AutoModelForCausalLM

    from trainer.actor import TrainerActor

    samples = make_samples(12, vocab_size=500, seed=3, min_len=8, max_len=200)
    out = {}
    for packed in (True, False):
        cfg = TrainerConfig(hf_checkpoint=str(path), lr=1e-3, global_batch_size=12, max_tokens_per_gpu=512,
                            temperature=0.8, pack_sequences=packed, logprob_chunk_tokens=64)
        actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
        actor.init()
        out[f"logp_{packed}"] = actor.compute_log_probs(samples)
        out[f"metrics_{packed}"] = actor.train_step(samples)
        out["dtypes"] = {p.dtype for p in actor.model.parameters() if p.dim() == 2}  # embeddings and linears
        out["master_dtypes"] = {p.dtype for p in actor.optimizer.params}
        out["offload"] = actor.offload()
        out["onload"] = actor.onload()
        actor.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out["hf"] = [hf_response_logprobs(hf, s, 0.8)[0] for s in samples]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_gpu_trainer_bf16_packed_matches_hf_and_padded(tiny_models, family):
    res = run_distributed(_gpu_worker, 1, tiny_models[family], family)[0]
    assert res["dtypes"] == {torch.bfloat16} and res["master_dtypes"] == {torch.float32}
    assert res["offload"] > 0 and res["onload"] == res["offload"]
    for packed, padded, ref in zip(res["logp_True"], res["logp_False"], res["hf"]):
        assert (packed.double() - ref).abs().mean() < 0.05  # bf16 model vs float64 HF
        assert (packed - padded).abs().mean() < 0.02  # flash varlen vs SDPA on padded rows
    for key in ("loss", "entropy"):
        assert res["metrics_True"][key] == pytest.approx(res["metrics_False"][key], rel=0.05, abs=1e-3), key
    assert res["metrics_True"]["padding_fraction"] == 0.0
