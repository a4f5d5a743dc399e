"""Trainer step throughput: tokens/s, MFU and peak memory, Kiln's GPU path against megatron's local spec.

    python benchmarks/train_step.py --shape tiny                          # CPU smoke run
    python benchmarks/train_step.py --shape qwen3-0.6b --tokens 16384     # GPU
    python benchmarks/train_step.py --shape qwen3-8b --tokens 16384 --recompute full --no-optimizer --no-local

Both variants train on the same rollout of variable-length sequences (random tokens, 75% of each
sequence is response). A step is forward + backward over every micro-batch + the optimizer step:
- kiln: packed micro-batches (one row, varlen flash attention), log-probs of the response tokens
  only through the chunked fused output layer, bf16 parameters with fp32 main grads / master
  weights / AdamW (PolicyOptimizer);
- local: megatron's local layer spec (attention materialises the score matrix), one padded row per
  sequence, full-vocabulary logits softmaxed in fp32, fp32 parameters under bf16 autocast + AdamW
  (the trainer before this change).
MFU = counted model FLOPs (`step_flops`: dense matmuls, causal attention, logits of the response
tokens; recomputation not counted) per second over the bf16 matmul rate measured in the same run. The models are random and built in place (no
weights are written or read); only their shapes matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


def write_config(shape: str, out_dir: Path) -> Path:
    """An HF folder holding only the config of a Qwen3 model of `shape` (weights are made in place)."""
    from transformers import Qwen3Config

    Qwen3Config(**SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=shape != "qwen3-8b").save_pretrained(out_dir)
    return out_dir


def sample_lengths(total: int, min_len: int, max_len: int, seed: int = 0) -> list[int]:
    """Random sequence lengths in [min_len, max_len] adding up to about `total` tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) + min_len <= total:
        lengths.append(min(int(torch.randint(min_len, max_len + 1, (), generator=g)), total - sum(lengths)))
    return lengths


def step_flops(spec, lengths: list[int], response_lengths: list[int]) -> float:
    """Model FLOPs of forward + backward: dense matmuls, causal attention, logits of the response tokens."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    per_token = 6 * spec.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f)
    attention = 6 * spec.num_layers * sum(n * n for n in lengths) * d * spec.num_heads  # 3 x 2 matmuls x L^2/2
    return per_token * sum(lengths) + attention + 6 * h * spec.vocab_size * sum(response_lengths)


def bf16_matmul_rate(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (8192^3) on this device."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def random_init(model, std: float = 0.02) -> None:
    """Fill the model's parameters in place (norms 1, the rest normal(0, std))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, std)


def run_variant(variant: str, args, spec, cfg, samples, device) -> dict:
    """Time `args.steps` steps of `variant` (kiln / local) after one warm-up; tokens/s, peak memory."""
    from megatron.core.models.gpt import gpt_layer_specs

    from trainer import attention, bridge
    from trainer.batching import pack_micro_batches
    from trainer.logprobs import chunked_logprobs, vocab_parallel_logprobs
    from trainer.optimizer import PolicyOptimizer

    kiln = variant == "kiln"
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if kiln and on_gpu else torch.float32
    tconfig = bridge.build_transformer_config(spec, params_dtype=dtype, recompute=args.recompute if kiln else "none")
    layer_spec = None if kiln else gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm,
                                                                            normalization="RMSNorm")
    model = bridge.build_gpt_model(spec, tconfig, layer_spec=layer_spec)
    random_init(model)
    model.train()
    group = None
    optimizer = None if args.no_optimizer else PolicyOptimizer(model, cfg, dp_group=group, tp_group=group,
                                                               tp_rank=0)
    tokens = [s["tokens"] for s in samples]
    responses = [s["response_length"] for s in samples]
    batches = pack_micro_batches(list(range(len(samples))), tokens, responses, args.tokens, packed=kiln)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and not kiln else contextlib.nullcontext()
    vocab = spec.vocab_size

    def step() -> float:
        total = 0.0
        for mb in batches:
            toks, pos = mb.tokens.to(device), mb.position_ids().to(device)
            where, targets = mb.response_positions().to(device), mb.response_targets().to(device)
            if kiln:
                packed = attention.packed_seq_params(mb.lengths, device)
                hidden = bridge.final_hidden_states(model, toks, pos, packed)  # [T, 1, H]
                hidden = hidden.reshape(-1, hidden.shape[-1])[where]
                logp, _ = chunked_logprobs(hidden, bridge.output_weight(model), targets, vocab_start=0,
                                           vocab_size=vocab, with_entropy=True, chunk_tokens=cfg.logprob_chunk_tokens)
            else:
                with amp:
                    logits = model(toks, pos, None)  # [rows, width, V]
                rows = logits.reshape(-1, logits.shape[-1])[where]
                logp, _ = vocab_parallel_logprobs(rows, targets, vocab_start=0, vocab_size=vocab, with_entropy=True)
            loss = -logp.sum() / len(where)
            loss.backward()
            total += loss.item()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        else:
            model.zero_grad(set_to_none=True)
        return total

    step()  # warm-up (kernel selection, allocator)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return {"variant": variant, "micro_batches": len(batches), "step_s": round(elapsed, 4), "peak_gib": round(peak, 2),
            "padded_tokens": sum(b.padded_tokens for b in batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (padded for local)")
    parser.add_argument("--micro-batches", type=int, default=2, help="rollout size in micro-batches of --tokens")
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--no-optimizer", action="store_true", help="forward + backward only (model too big)")
    parser.add_argument("--no-local", action="store_true", help="skip megatron's local-spec baseline")
    parser.add_argument("--local-tokens", type=int, default=4096, help="micro-batch budget of the local baseline")
    args = parser.parse_args()

    from megatron.core import parallel_state

    from trainer import bridge, megatron_compat
    from trainer.config import TrainerConfig
    from weight_sync.group import free_port

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.min_len, args.max_len, args.tokens, args.local_tokens = 8, 64, 256, 256
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    megatron_compat.apply()
    parallel_state.initialize_model_parallel(1, 1)
    megatron_compat.model_parallel_manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(args.shape, Path(tmp))
        spec = bridge.load_spec(path)
        cfg = TrainerConfig(hf_checkpoint=str(path), lr=1e-6)
        lengths = sample_lengths(args.tokens * args.micro_batches, args.min_len, args.max_len)
        g = torch.Generator().manual_seed(1)
        samples = [{"tokens": torch.randint(0, spec.vocab_size, (n,), generator=g).tolist(),
                    "response_length": max(1, (3 * n) // 4)} for n in lengths]
        flops = step_flops(spec, lengths, [s["response_length"] for s in samples])
        rate = bf16_matmul_rate(device) if device.type == "cuda" else float("nan")
        rows = []
        for variant in ("kiln",) + (() if args.no_local else ("local",)):
            budget = args.tokens if variant == "kiln" else args.local_tokens
            run_args = argparse.Namespace(**{**vars(args), "tokens": budget})
            try:
                row = run_variant(variant, run_args, spec, cfg, samples, device)
            except torch.OutOfMemoryError as e:
                row = {"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            if "step_s" in row:
                row["tokens_per_s"] = round(sum(lengths) / row["step_s"], 1)
                row["mfu"] = round(flops / row["step_s"] / rate, 4) if rate == rate else None
            row.update(shape=args.shape, tokens_per_micro_batch=budget, sequences=len(lengths),
                       total_tokens=sum(lengths), recompute=args.recompute if variant == "kiln" else "none",
                       optimizer=not args.no_optimizer,
                       device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       bf16_matmul_tflops=round(rate / 1e12, 1) if rate == rate else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
