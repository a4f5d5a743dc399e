"""FP8 rollout (CPU): the quantisation numerics against float64, the FP8-reference engine against a fake-quantised HF
model, and weight pushes into an FP8 engine (weights and scales, checksums over what the engine holds)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from inference_engine import Engine
from inference_engine.config import EngineConfig
from inference_engine.models import fp8 as engine_fp8
from inference_engine.testing import make_tiny_model
from weight_sync import WeightSender, WeightSyncConfig, bucket_named_tensors, push_weights
from weight_sync.errors import WeightChecksumError
from weight_sync.fp8 import (FP8_DTYPE, FP8_MAX, Fp8Layout, dequantize_weight, fake_quantize_activation,
                             quantize_activation, quantize_weight)

BLOCK = 32  # the tiny models' projections (q 64, k / v 32 rows, hidden 64, intermediate 128) are multiples of 32
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[5, 17, 99, 230, 41, 7], [300, 2, 2, 45], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
# e4m3 has 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself; below the smallest
# normal (2^-6) the spacing is the subnormal step 2^-9, so the error is at most 2^-10 (both in units of the scale)
REL, ABS = 2.0 ** -4, 2.0 ** -10


def _blockwise_reference(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """float64 [N, K]: each element's block scale amax / 448, computed in float64."""
    w64 = w.double()
    scale = torch.empty_like(w64)
    for i in range(0, w.shape[0], rows):
        for j in range(0, w.shape[1], cols):
            block = w64[i:i + rows, j:j + cols]
            amax = block.abs().max()
            scale[i:i + rows, j:j + cols] = amax / FP8_MAX if amax > 0 else 1.0
    return scale


@pytest.mark.parametrize("block,shape", [(128, (300, 200)), (32, (64, 96)), (16, (5, 40))])
def test_weight_quantisation_round_trip_within_e4m3_precision(block, shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) * torch.logspace(-3, 2, shape[1])[None, :]  # blocks of unequal range
    w[:block, :block] = 0.0  # an all-zero block: scale 1, all zeros
    q, s = quantize_weight(w, block)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // block), -(-shape[1] // block))
    scale64 = _blockwise_reference(w, block, block)
    assert torch.allclose(s.double().repeat_interleave(block, 0)[:shape[0]].repeat_interleave(block, 1)[:, :shape[1]],
                          scale64, rtol=1e-7, atol=0)
    assert s[0, 0] == 1.0 and not q[:block, :block].float().any()
    err = (dequantize_weight(q, s, block).double() - w.double()).abs()
    bound = torch.maximum(REL * w.double().abs(), ABS * scale64) * (1 + 1e-6)
    assert (err <= bound).all(), (err / bound).max()
    # each nonzero block's largest magnitude lands on +-448 exactly
    qf = q.float().abs()
    for i in range(0, shape[0], block):
        for j in range(0, shape[1], block):
            if w[i:i + block, j:j + block].abs().max() > 0:
                assert qf[i:i + block, j:j + block].max() == FP8_MAX
    assert torch.equal(dequantize_weight(q, s, block, torch.bfloat16), dequantize_weight(q, s, block).bfloat16())


def test_activation_quantisation_is_per_row_and_group():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 200, generator=gen) * torch.logspace(-2, 1, 7)[:, None]
    q, s = quantize_activation(x, 64)
    assert s.shape == (7, 4)
    for r in range(7):  # a row is a 1 x 64 block grid: the same numerics as a one-row weight
        qr, sr = quantize_weight(x[r:r + 1], 64)
        assert torch.equal(q[r:r + 1].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s[r], sr[0])
    err = (fake_quantize_activation(x, 64).double() - x.double()).abs()
    assert (err <= torch.maximum(REL * x.double().abs(), ABS * _blockwise_reference(x, 1, 64)) * (1 + 1e-6)).all()


def test_reference_linear_is_the_dequantised_product():
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 96, generator=gen), torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
    q, s = quantize_weight(w, BLOCK)
    out = engine_fp8.reference_linear(x, q, s, BLOCK, b)
    want = fake_quantize_activation(x, BLOCK).double() @ dequantize_weight(q, s, BLOCK).double().T + b.double()
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-4)
    gate_up = torch.randn(3, 192, generator=gen)  # silu_mul: the input is silu(gate) * up
    fused = engine_fp8.reference_linear(gate_up, q, s, BLOCK, silu_mul=True)
    act = torch.nn.functional.silu(gate_up[:, :96]) * gate_up[:, 96:]
    assert torch.allclose(fused, engine_fp8.reference_linear(act, q, s, BLOCK), rtol=1e-6, atol=1e-6)


def _fake_quant_hf(path, block: int, lm_head: bool = False):
    """The HF model with every FP8 linear's weight replaced by dequant(quant(w)) and its input fake-quantised."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layout = Fp8Layout(block, lm_head)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and layout.quantized(f"{name}.weight", module.weight):
                module.weight.copy_(dequantize_weight(*quantize_weight(module.weight, block), block))
                module.register_forward_pre_hook(lambda _, args: (fake_quantize_activation(args[0], block),))
    return model


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family,lm_head", [("qwen3", False), ("llama", True), ("qwen2", False)])
def test_fp8_engine_greedy_matches_fake_quantised_hf(tiny_models, family, lm_head):
    path = tiny_models[family]
    ref = _fake_quant_hf(path, BLOCK, lm_head)
    refs = [_hf_greedy(ref, ids, GREEDY["max_new_tokens"]) for ids in PROMPTS]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert [_hf_greedy(plain, ids, GREEDY["max_new_tokens"]) for ids in PROMPTS] != refs  # FP8 changes the output
    with Engine(model_path=str(path), max_total_tokens=2048, chunked_prefill_size=5, weight_dtype="fp8",
                fp8_block_size=BLOCK, fp8_lm_head=lm_head) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        held = dict(engine.named_hf_tensors())
    assert [o["output_ids"] for o in outs] == refs
    sent = load_file(path / "model.safetensors")
    layout = Fp8Layout(BLOCK, lm_head)
    for name, tensor in sent.items():  # the engine holds exactly what the shared quantiser makes of the checkpoint
        if layout.quantized(name, tensor):
            q, s = quantize_weight(tensor, BLOCK)
            assert torch.equal(held[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(held[name + "_scale_inv"], s), name
        elif name in held:
            assert torch.equal(held[name], tensor), name
    # teacher-forced log-probs of the engine's tokens against the fake-quantised reference (float32 order only)
    ids = PROMPTS[0] + outs[0]["output_ids"]
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(PROMPTS[0]) - 1:-1].gather(
        -1, torch.tensor(outs[0]["output_ids"])[:, None])[:, 0]
    got = torch.tensor([lp for lp, _, _ in outs[0]["meta_info"]["output_token_logprobs"]])
    assert torch.allclose(got, want, atol=2e-3)


def test_fp8_config_and_alignment_errors(qwen3_model):
    with pytest.raises(ValueError, match="weight_dtype .*'fp16'.*expected one of"):
        EngineConfig(model_path=str(qwen3_model), weight_dtype="fp16")
    with pytest.raises(ValueError, match="fp8_block_size 48"):
        EngineConfig(model_path=str(qwen3_model), weight_dtype="fp8", fp8_block_size=48)
    with pytest.raises(ValueError, match="fp8_lm_head applies to weight_dtype 'fp8'"):
        EngineConfig(model_path=str(qwen3_model), fp8_lm_head=True)
    with pytest.raises(ValueError, match=r"qkv_proj has parts of \[64, 32, 32\] rows.*multiple of fp8_block_size 128"):
        Engine(model_path=str(qwen3_model), max_total_tokens=256, weight_dtype="fp8")


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("fp8_other_llama"), "llama", seed=7, tokenizer_dir=tokenizer_dir)


def _trainer_buckets(path, dtype=torch.float32):
    return list(bucket_named_tensors(sorted((n, t.to(dtype)) for n, t in load_file(path / "model.safetensors").items()),
                                     20_000))


@pytest.mark.parametrize("transport,quantize_on", [("colocated", "auto"), ("colocated", "sender"),
                                                   ("distributed", "auto"), ("distributed", "engine")])
def test_push_into_fp8_engine_updates_weights_and_scales(tiny_models, other_llama, transport, quantize_on):
    layout = Fp8Layout(BLOCK, lm_head=True)
    new = load_file(other_llama / "model.safetensors")
    with Engine(model_path=str(tiny_models["llama"]), max_total_tokens=1024, weight_dtype="fp8",
                fp8_block_size=BLOCK, fp8_lm_head=True) as engine:
        before = {n: t.clone() for n, t in engine.named_hf_tensors()}
        config = WeightSyncConfig(transport=transport, backend="gloo", bucket_bytes=20_000, check_weight_update=True,
                                  fp8=layout, fp8_quantize_on=quantize_on, timeout_s=60)
        sender = WeightSender(config)
        sender.connect([engine])
        try:
            stats = push_weights(_trainer_buckets(other_llama), [engine], sender, 3)
        finally:
            sender.close([engine])
        held = dict(engine.named_hf_tensors())
        assert engine.weight_version == 3
        with Engine(model_path=str(other_llama), max_total_tokens=1024, weight_dtype="fp8", fp8_block_size=BLOCK,
                    fp8_lm_head=True) as fresh:
            want = fresh.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)] == \
            [o["output_ids"] for o in want]
    assert set(sender.sent_checksums) == set(held)  # verified over every tensor the engine holds, scales included
    changed_scales = 0
    for name, tensor in new.items():
        if layout.quantized(name, tensor):
            q, s = quantize_weight(tensor, BLOCK)
            assert torch.equal(held[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(held[name + "_scale_inv"], s), name
            changed_scales += not torch.equal(before[name + "_scale_inv"], s)
        else:
            assert torch.equal(held[name], tensor), name
    assert changed_scales == sum(layout.quantized(n, t) for n, t in new.items())
    full_bytes = sum(t.numel() * t.element_size() for t in new.values())
    on_sender = quantize_on == "sender" or (quantize_on == "auto" and transport == "distributed")
    assert (stats.bytes < 0.5 * full_bytes) == on_sender  # float32 -> e4m3: a quarter of the linears' bytes


def test_push_checksums_catch_an_engine_that_quantises_differently(tiny_models, other_llama):
    """The sender's expected checksums are over the FP8 layout it was told; an engine with other blocks fails."""
    with Engine(model_path=str(tiny_models["llama"]), max_total_tokens=1024, weight_dtype="fp8",
                fp8_block_size=16) as engine:
        sender = WeightSender(WeightSyncConfig(transport="colocated", check_weight_update=True,
                                               fp8=Fp8Layout(BLOCK)))
        try:
            with pytest.raises(WeightChecksumError, match="weights differ"):
                push_weights(_trainer_buckets(other_llama), [engine], sender, 1)
        finally:
            sender.close([engine])


def test_train_rollout_mismatch_metrics_against_float64():
    """Every step reports the engine-vs-trainer gap on the rollout tokens: mean |diff| and KL(engine || trainer)."""
    from trainer.losses import LossConfig, compute_policy_loss

    old = torch.tensor([-1.0, -0.5, -2.0, -0.1, -3.0], dtype=torch.float64)
    rollout = torch.tensor([-1.2, -0.5, -1.0, -0.3, -9.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.float64)
    _, metrics = compute_policy_loss(old.clone(), old, torch.ones(5, dtype=torch.float64), mask,
                                     torch.tensor([3, 2]), LossConfig(), rollout_logp=rollout,
                                     global_num_tokens=4, global_num_seqs=2)
    kept = [(o, r) for o, r, m in zip(old.tolist(), rollout.tolist(), mask.tolist()) if m]
    assert metrics["train_rollout_logp_absdiff"].item() == pytest.approx(sum(abs(o - r) for o, r in kept) / 4)
    # k3 with samples from the engine: E[exp(old - rollout) - 1 - (old - rollout)] = KL(engine || trainer)
    want = sum(math.exp(o - r) - 1 - (o - r) for o, r in kept) / 4
    assert metrics["train_rollout_kl"].item() == pytest.approx(want, rel=1e-12)


def test_fp8_rollout_turns_tis_and_mis_on_unless_disabled(qwen3_model, caplog):
    from orchestrator.driver import parse_args

    base = ["--hf-checkpoint", str(qwen3_model), "--prompt-data", "x.jsonl"]
    with caplog.at_level("INFO", logger="kiln.driver"):
        cfg = parse_args(base + ["--rollout-dtype", "fp8"])
    assert cfg.engine.weight_dtype == "fp8" and cfg.trainer.loss.use_tis and cfg.trainer.loss.use_mis
    assert [r.getMessage() for r in caplog.records if "--rollout-dtype fp8" in r.getMessage()] == [
        "--rollout-dtype fp8: --use-tis and --use-mis turned on (importance correction of the FP8 engine's log-probs)"]
    cfg = parse_args(base + ["--rollout-dtype", "fp8", "--no-use-mis"])
    assert cfg.trainer.loss.use_tis and not cfg.trainer.loss.use_mis
    cfg = parse_args(base)
    assert cfg.engine.weight_dtype == "auto" and not cfg.trainer.loss.use_tis and not cfg.trainer.loss.use_mis
    caplog.clear()
    with caplog.at_level("INFO", logger="kiln.driver"):  # an FP8 KV cache moves the engine's log-probs too
        cfg = parse_args(base + ["--kv-cache-dtype", "fp8_e4m3", "--no-use-tis"])
    assert cfg.engine.kv_cache_dtype == "fp8_e4m3" and not cfg.trainer.loss.use_tis and cfg.trainer.loss.use_mis
    assert [r.getMessage() for r in caplog.records if "fp8" in r.getMessage()] == [
        "--kv-cache-dtype fp8_e4m3: --use-mis turned on (importance correction of the FP8 engine's log-probs); "
        "kept as set: --use-tis False"]


@pytest.mark.parametrize("quantize_on", ["engine", "sender"])
def test_fp8_tensor_parallel_engine_holds_the_full_quantisation(tiny_models, other_llama, quantize_on):
    """tp=2: each rank quantises (or takes) its shard; gathered back, weights and scales are the full tensors'."""
    block, path = 16, tiny_models["llama"]  # per rank: q 32 rows, k / v 16, gate / up 64; o / down inputs 32 / 64
    layout = Fp8Layout(block, lm_head=True)
    with Engine(model_path=str(path), max_total_tokens=1024, weight_dtype="fp8", fp8_block_size=block,
                fp8_lm_head=True) as one:
        want = [o["output_ids"] for o in one.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    with Engine(model_path=str(path), max_total_tokens=1024, weight_dtype="fp8", fp8_block_size=block,
                fp8_lm_head=True, tp_size=2) as engine:
        assert [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)] == want
        sender = WeightSender(WeightSyncConfig(transport="colocated", check_weight_update=True, fp8=layout,
                                               fp8_quantize_on=quantize_on))
        try:
            push_weights(_trainer_buckets(other_llama), [engine], sender, 2)
        finally:
            sender.close([engine])
        held = dict(engine.named_hf_tensors())
    for name, tensor in load_file(other_llama / "model.safetensors").items():
        if layout.quantized(name, tensor):
            q, s = quantize_weight(tensor, block)
            assert torch.equal(held[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(held[name + "_scale_inv"], s), name
        else:
            assert torch.equal(held[name], tensor), name


def _write_table(path, device="NVIDIA H100 80GB HBM3", block=128, linears=None):
    path.write_text(json.dumps({"device": device, "block": block, "linears": linears if linears is not None else [
        {"n": 6144, "k": 4096, "gemv": {"kernel": "prequant", "config": [1, 8, 8, 4]},
         "gemm": [{"rows": 256, "kernel": "gemm", "config": [64, 128, 4, 3]}, {"rows": 64, "kernel": "scaled_mm",
                                                                                "config": None}]},
        {"n": 4096, "k": 4096, "gemv": {"kernel": "gemv", "config": [1, 4, 8, 4]}}]}))
    return path


def test_kernel_table_reads_choices_per_shape_and_rows(tmp_path):
    table = engine_fp8.KernelTable.load(_write_table(tmp_path / "t.json"))
    assert table.device == "NVIDIA H100 80GB HBM3" and table.block == 128
    qkv = table.choices[(6144, 4096)]
    assert qkv.gemv == (1, 8, 8, 4) and qkv.prequant
    assert [qkv.for_rows(r) for r in (2, 64, 65, 256, 257)] == [
        ("scaled_mm", None), ("scaled_mm", None), ("gemm", (64, 128, 4, 3)), ("gemm", (64, 128, 4, 3)), None]
    o = table.choices[(4096, 4096)]
    assert o.gemv == (1, 4, 8, 4) and not o.prequant and o.for_rows(8) is None


@pytest.mark.parametrize("linears,match", [
    ([{"n": 1, "k": 1, "gemv": {"kernel": "fast", "config": [1, 8, 8, 4]}}], r"linears\[0\]\.gemv: expected"),
    ([{"n": 1, "k": 1, "gemv": {"kernel": "gemv", "config": [1, 8, 8]}}], "config must be 4 positive integers"),
    ([{"n": 1, "k": 1, "gemv": {"kernel": "gemv", "config": [1, 8, 3, 4]}}], "the first 4 powers of two"),
    ([{"n": 1, "k": 1, "gemm": [{"rows": 64, "kernel": "gemm", "config": [64, 96, 4, 3]}]}],
     "the first 3 powers of two"),
    ([{"n": 1, "k": 1, "gemv": {"kernel": "gemv", "config": [1, 256, 8, 4]}}], "BLOCK_N 256 must divide the block 128"),
    ([{"n": 1, "k": 1, "gemm": [{"rows": 64, "kernel": "cublas"}]}], r"gemm\[0\]: expected"),
    ([{"n": "1", "k": 1}], "integer 'n' and 'k'"),
])
def test_kernel_table_errors_name_the_file_and_the_entry(tmp_path, linears, match):
    path = _write_table(tmp_path / "bad.json", linears=linears)
    with pytest.raises(ValueError, match=f"fp8_kernel_configs {path}: .*{match}"):
        engine_fp8.KernelTable.load(path)


def test_kernel_configs_are_checked_before_the_engine_loads(qwen3_model, tmp_path):
    table = _write_table(tmp_path / "t.json")
    with pytest.raises(ValueError, match="fp8_kernel_configs applies to weight_dtype 'fp8'"):
        EngineConfig(model_path=str(qwen3_model), fp8_kernel_configs=str(table))
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        EngineConfig(model_path=str(qwen3_model), weight_dtype="fp8", fp8_kernel_configs=str(tmp_path / "none.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected an object with 'device'"):
        EngineConfig(model_path=str(qwen3_model), weight_dtype="fp8", fp8_kernel_configs=str(tmp_path / "list.json"))
    EngineConfig(model_path=str(qwen3_model), weight_dtype="fp8", fp8_kernel_configs=str(table))  # a good one


def test_convert_gives_each_linear_its_shapes_choice(other_llama, tmp_path, monkeypatch):
    """The linears whose (N, K) the table names get its choice, the others none; on the CPU (or another GPU model)
    the table is not used at all."""
    from inference_engine.model_runner import ModelRunner

    rows = {"q": 64 + 2 * 32}  # the tiny llama's fused qkv: 64 query rows + 2 x 32 key/value rows, K 64
    table = _write_table(tmp_path / "t.json", linears=[{"n": rows["q"], "k": 64, "gemv": {"kernel": "gemv",
                                                                                           "config": [1, 4, 2, 4]}}])
    cfg = EngineConfig(model_path=str(other_llama), weight_dtype="fp8", fp8_block_size=32,
                       fp8_kernel_configs=str(table), max_total_tokens=256, context_length=256)
    runner = ModelRunner(cfg)
    assert all(getattr(m, "fp8_kernels", None) is None for m in runner.model.modules())  # CPU: not used
    monkeypatch.setattr(engine_fp8, "_usable", lambda t, device, block: t)  # as on the GPU model it names
    runner = ModelRunner(cfg)
    chosen = {name: m.fp8_kernels for name, m in runner.model.named_modules() if getattr(m, "fp8_block", 0)}
    qkv = [name for name in chosen if name.endswith("qkv_proj")]
    assert qkv and all(chosen[name] == engine_fp8.KernelChoice(gemv=(1, 4, 2, 4)) for name in qkv)
    assert all(chosen[name] is None for name in chosen if name not in qkv)
