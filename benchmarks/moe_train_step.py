"""Trainer step of a Qwen3-MoE policy (issue #21): Qwen3-30B-A3B widths with fewer layers, routing replay off and on.

    python -m benchmarks.moe_train_step                    # GPU: 4 layers (fits one 80 GiB card), 4 x 8192 tokens
    python -m benchmarks.moe_train_step --layers 8         # a 141 GiB card
    python -m benchmarks.moe_train_step --smoke            # CPU, a tiny shape: checks the script

One TrainerActor rank (bf16 parameters, fp32 master weights / grads / AdamW), random weights made in
place (nothing is read from disk but config.json), a rollout of random sequences (75% response)
packed into micro-batches of --tokens. A step is `TrainerActor.train_step`: the old log-prob pass,
forward + backward over every micro-batch, one optimizer step. Timed after one warm-up step, first
with the routers' own top-k, then replaying random recorded experts (`--use-routing-replay`).
Reported: seconds per step, tokens/s, peak memory, and MFU of the training pass's model FLOPs
(attention and the router, the top-k experts each token reaches, logits of the response tokens; the
old log-prob forward is not counted) over the bf16 matmul rate measured in the same run. The
experts are megatron's SequentialMLP (one GEMM pair per expert, in a Python loop).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.train_step import bf16_matmul_rate, random_init, sample_lengths

WIDTHS = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512)


def training_flops(spec, lengths: list[int], response_lengths: list[int]) -> float:
    """Model FLOPs of one forward + backward: attention, router, the k experts per token, response logits."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    mlp = [3 * h * (spec.moe_top_k * spec.moe_ffn_hidden_size) + h * spec.num_experts if i in spec.moe_layers
           else 3 * h * spec.ffn_hidden_size for i in range(spec.num_layers)]
    per_token = 6 * sum(h * (q + 2 * kv) + q * h + m for m in mlp)
    attention = 6 * spec.num_layers * sum(n * n for n in lengths) * d * spec.num_heads
    return per_token * sum(lengths) + attention + 6 * h * spec.vocab_size * sum(response_lengths)


def make_samples(spec, lengths: list[int], seed: int) -> list:
    """Rollout samples of random tokens (75% response), rewards varying within groups of 4, random routed experts."""
    from kiln_common.sample import Sample

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    samples = []
    for i, n in enumerate(lengths):
        response = max(1, (3 * n) // 4)
        routed = np.argsort(rng.random((n - 1, spec.num_moe_layers, spec.num_experts)), axis=-1)
        samples.append(Sample(index=i, group_index=i // 4, tokens=torch.randint(0, spec.vocab_size, (n,),
                                                                                generator=g).tolist(),
                              response_length=response, loss_mask=[1] * response,
                              rollout_logprobs=[-1.0] * response, reward=float(i % 4),
                              routed_experts=routed[..., :spec.moe_top_k].astype(np.uint8)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=4, help="rollout size in micro-batches of --tokens")
    parser.add_argument("--min-len", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting, after one warm-up step")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny shape: checks the script")
    parser.add_argument("--out", default=None, help="write the result rows as JSON here")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    widths = TINY if device == "cpu" else WIDTHS
    if device == "cpu":
        args.layers, args.tokens, args.min_len, args.max_len, args.steps = 2, 256, 16, 64, 1

    from transformers import Qwen3MoeConfig

    from kiln_common.net import free_port
    from trainer import bridge
    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        Qwen3MoeConfig(num_hidden_layers=args.layers, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=False, **widths).save_pretrained(tmp)
        spec = bridge.load_spec(tmp)
        lengths = sample_lengths(args.tokens * args.micro_batches, args.min_len, args.max_len)
        samples = make_samples(spec, lengths, seed=1)
        cfg = TrainerConfig(hf_checkpoint=tmp, use_routing_replay=True, max_tokens_per_gpu=args.tokens,
                            global_batch_size=len(samples), lr=1e-6, recompute=args.recompute,
                            rollout_max_response_len=args.max_len)
        bridge.load_hf_checkpoint = lambda model, spec, hf_dir: random_init(model)  # random weights, made in place
        trainer = TrainerActor(cfg, 0, 1, "127.0.0.1", free_port())
        trainer.init()
        rate = bf16_matmul_rate(torch.device("cuda")) if device == "cuda" else float("nan")
        flops = training_flops(spec, lengths, [s.response_length for s in samples])
        own = copy.deepcopy(samples)
        for s in own:
            s.routed_experts = None
        trainer.train_step(copy.deepcopy(own))  # warm-up
        for replay, batch in (("off", own), ("on", samples)):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                metrics = trainer.train_step(copy.deepcopy(batch))
            if device == "cuda":
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - start) / args.steps
            row = {"routing_replay": replay, "step_s": round(step_s, 3),
                   "tokens_per_s": round(sum(lengths) / step_s, 1),
                   "mfu": round(flops / step_s / rate, 4) if rate == rate else None,
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                   "routing_disagreement": metrics.get("routing_disagreement"), "layers": args.layers,
                   "experts": spec.num_experts, "top_k": spec.moe_top_k, "sequences": len(lengths),
                   "total_tokens": sum(lengths), "tokens_per_micro_batch": args.tokens, "recompute": args.recompute,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "bf16_matmul_tflops": round(rate / 1e12, 1) if rate == rate else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
        trainer.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
