"""Routing replay and the engine-vs-trainer log-prob mismatch of a MoE policy, on one batch (issue #21).

    python -m benchmarks.moe_replay_mismatch                 # GPU, bf16: 30B-A3B widths, 4 layers
    python -m benchmarks.moe_replay_mismatch --smoke         # CPU, fp32, tiny (checks the script only)

A random Qwen3-MoE HF folder is written (30B-A3B widths: hidden 2048, 32 heads of 128, 4 KV heads,
128 experts, top-8 renormalised, expert width 768; `--layers` of them; a 512-token tokenizer made
on the spot: the vocabulary does not touch routing). Kiln's engine samples the batch with
`return_routed_experts` (the production rollout path: `rollout.generate.append_response`), then one
trainer rank computes the same response tokens' log-probs twice: with its routers' own top-k
(replay off) and with the engine's experts (`--use-routing-replay`, on). Reported per setting: mean
and max |trainer - engine| log-prob over the response tokens and the k3 estimate of KL(engine ||
trainer); the ratio off/on of the mean (issue target: >= 5); and the share of replayed (token,
layer, slot) the trainer's own router would have chosen differently. Weights are random, so the
router's margins are not a trained model's: the figure is for this shape and seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

WIDTHS = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def write_model(out_dir: Path, layers: int, widths: dict, device: str, seed: int, std: float) -> Path:
    """A random Qwen3-MoE HF folder (bf16 on GPU, fp32 on CPU) with a locally trained tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from inference_engine.testing import make_tokenizer

    tok = make_tokenizer(out_dir)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), num_hidden_layers=layers, norm_topk_prob=True, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=8192, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         initializer_range=std, **widths)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def sample_batch(path: Path, args, device: str) -> list:
    """The engine's rollout of `args.prompts` random prompts: Samples with rollout log-probs and routed experts."""
    from inference_engine.engine import Engine
    from kiln_common.sample import Sample
    from rollout.generate import append_response

    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(10, 500, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    params = {"max_new_tokens": args.response_len, "temperature": 1.0, "ignore_eos": True,
              "return_routed_experts": True}
    dtype = "bfloat16" if device == "cuda" else "float32"
    with Engine(model_path=str(path), device=device, dtype=dtype, disable_cuda_graph=not args.cuda_graph,
                max_total_tokens=args.prompts * (args.prompt_len + args.response_len) + 1024,
                context_length=args.prompt_len + args.response_len + 16) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    samples = []
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        samples.append(append_response(Sample(index=i, group_index=i, tokens=list(prompt)), out))
    return samples


def mismatch(trainer_logp: list[torch.Tensor], samples: list) -> dict:
    """mean / max |trainer - engine| and k3 KL(engine || trainer) over every response token."""
    train = torch.cat(trainer_logp).double()
    engine = torch.cat([torch.tensor(s.rollout_logprobs, dtype=torch.float64) for s in samples])
    diff = train - engine  # log(p_trainer / p_engine)
    return {"mean_abs": diff.abs().mean().item(), "max_abs": diff.abs().max().item(),
            "k3_kl": (diff.exp() - 1 - diff).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine decodes through CUDA graphs, as in a rollout")
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, a tiny shape: checks the script")
    parser.add_argument("--out", default=None, help="write the result row as JSON here")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    widths = TINY if args.smoke else WIDTHS
    if args.smoke:
        args.layers, args.prompts, args.prompt_len, args.response_len = 2, 4, 8, 8
        args.init_std = 0.1

    from kiln_common.net import free_port
    from trainer.actor import TrainerActor
    from trainer.config import TrainerConfig

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp), args.layers, widths, device, args.seed, args.init_std)
        samples = sample_batch(path, args, device)
        for s in samples:
            s.reward = 0.0
        tokens = max(len(s.tokens) for s in samples) * 8
        cfg = TrainerConfig(hf_checkpoint=str(path), use_routing_replay=True, temperature=1.0,
                            max_tokens_per_gpu=max(tokens, 4096), logprob_chunk_tokens=1024)
        trainer = TrainerActor(cfg, 0, 1, "127.0.0.1", free_port())
        trainer.init()
        try:
            own = copy.deepcopy(samples)
            for s in own:
                s.routed_experts = None  # the trainer's own routing
            off = mismatch(trainer.compute_log_probs(own), samples)
            trainer.replay.reset_counts()
            on = mismatch(trainer.compute_log_probs(samples), samples)
            disagreement, replayed = trainer._routing_disagreement()
        finally:
            trainer.shutdown()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    row = {"device": name, "dtype": "bfloat16" if device == "cuda" else "float32", "layers": args.layers,
           **{k: v for k, v in widths.items() if k in ("hidden_size", "num_experts", "num_experts_per_tok")},
           "samples": len(samples), "response_tokens": sum(s.response_length for s in samples),
           "replay_off": off, "replay_on": on, "ratio_mean_abs": off["mean_abs"] / max(on["mean_abs"], 1e-30),
           "routing_disagreement": disagreement, "replayed_slots": replayed,
           "seconds": round(time.perf_counter() - start, 1)}
    print(f"| replay | mean abs dlogp | max abs dlogp | k3 KL |\n|---|---|---|---|\n"
          f"| off | {off['mean_abs']:.3e} | {off['max_abs']:.3e} | {off['k3_kl']:.3e} |\n"
          f"| on | {on['mean_abs']:.3e} | {on['max_abs']:.3e} | {on['k3_kl']:.3e} |\n"
          f"ratio off/on (mean abs) {row['ratio_mean_abs']:.2f}; routing_disagreement {disagreement:.4f} "
          f"of {int(replayed)} replayed slots; {name}")
    print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
