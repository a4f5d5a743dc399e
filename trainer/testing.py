"""Test helpers for the trainer: run a function on N spawned (gloo) ranks, make synthetic RL samples, HF references."""

from __future__ import annotations

import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from kiln_common.sample import Sample
from kiln_common.net import free_port


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, replies, collected,
               timeout_s: float) -> None:
    try:
        replies.put((rank, "ok", fn(rank, world_size, port, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        replies.put((rank, "error", traceback.format_exc()))
    collected.wait(timeout_s)  # tensors in the result are shared from this process: live until the parent has them


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """Run fn(rank, world_size, port, *args) in `world_size` spawned processes; results by rank.

    `port` is a free localhost port for the ranks' rendezvous; `fn` must be importable (module level)
    and sets up its own process group. A rank's exception is raised here with its traceback; a rank
    that hangs or dies without reporting is reported instead of waited for.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    replies, collected = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, replies, collected, timeout_s))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    error = None
    try:
        for _ in range(world_size):
            try:
                rank, status, value = replies.get(timeout=timeout_s)
            except queue.Empty:  # a rank hung or died without reporting
                codes = [p.exitcode for p in procs]
                error = f"ranks did not all report within {timeout_s:g}s (exit codes {codes})"
                break
            if status == "error":
                error = f"rank {rank} failed:\n{value}"
                break
            results[rank] = value
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=10 if error else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if error:
        raise RuntimeError(error)
    return [results[r] for r in range(world_size)]


def _gloo_rank(rank: int, world_size: int, port: int, fn: Callable, *args: Any) -> Any:
    """One single-threaded rank of `run_distributed`: fn(rank, world_size, *args) inside a gloo process group."""
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return results by rank.

    `fn` must be importable (module level). A rank's exception is re-raised here with its traceback.
    """
    return run_ranks(_gloo_rank, world_size, fn, *args, timeout_s=timeout)


def hf_weights(actor) -> dict[str, torch.Tensor]:
    """A copy of every weight of a TrainerActor, by HF name (what export and the weight push send)."""
    out = {}
    for bucket in actor.iter_hf_weight_buckets(1 << 20):
        out.update({k: v.clone() for k, v in bucket})
    return out


def without_timings(metrics: dict) -> dict:
    """A train step's metrics without its timings (`time_*`: how long, not what): what two equal steps share."""
    return {k: v for k, v in metrics.items() if not k.startswith("time_")}


def make_samples(num: int, *, vocab_size: int, seed: int = 0, min_len: int = 6, max_len: int = 24,
                 group_size: int = 2) -> list[Sample]:
    """Random prompt+response samples with rewards, loss masks (some 0s) and rollout log-probs."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        n = int(torch.randint(min_len, max_len + 1, (), generator=g))
        response = int(torch.randint(2, n - 1, (), generator=g))
        tokens = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        mask = [1] * response
        if response > 3:
            mask[1] = 0  # an environment token inside the response
        samples.append(Sample(index=i, group_index=i // group_size, tokens=tokens, response_length=response,
                              loss_mask=mask, rollout_logprobs=[-2.0] * response,
                              reward=float(torch.rand((), generator=g))))
    return samples


def _hf_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of an HF Qwen3-MoE block on rows x: a ModuleList of MLPs (transformers 4.x) or stacked weights (5.x)."""
    if isinstance(experts, torch.nn.ModuleList):
        return experts[e](x)
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@torch.no_grad()
def hf_moe_response_logprobs(hf_model, sample: Sample, temperature: float, experts=None
                             ) -> tuple[torch.Tensor, "np.ndarray"]:
    """Response log-probs of an HF Qwen3-MoE in its own dtype, routers forced to `experts` where given.

    `experts`: [rows < len(tokens), moe_layers, top_k] expert ids for the first rows tokens (as
    `Sample.routed_experts`), or None. The combine weights are the softmax over all experts at the
    chosen ones, renormalised when the config says `norm_topk_prob`. Returns (log-probs [response],
    the routers' own top-k [len(tokens), moe_layers, top_k] as int64 numpy).
    """
    import numpy as np
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    blocks = [m for m in hf_model.modules() if isinstance(m, Qwen3MoeSparseMoeBlock)]
    own: list[torch.Tensor] = []

    def forced(block: Qwen3MoeSparseMoeBlock, index: int, hidden: torch.Tensor):
        # transformers 4.x: the gate is an nn.Linear, the block holds top_k / norm_topk_prob, experts are a
        # ModuleList of MLPs and the block returns (out, router logits); 5.x: the gate is a top-k router holding
        # them, the experts one module of stacked [E, 2I, H] / [E, H, I] weights, and the block returns out only.
        hf4 = isinstance(block.gate, torch.nn.Linear)
        router = block if hf4 else block.gate
        batch, seq, width = hidden.shape
        x = hidden.view(-1, width)  # [n, H]
        logits = torch.nn.functional.linear(x, block.gate.weight)  # [n, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        chosen = torch.topk(probs, router.top_k, dim=-1).indices  # [n, k]
        own.append(chosen)
        if experts is not None:
            chosen = chosen.clone()
            chosen[:len(experts)] = torch.as_tensor(np.asarray(experts[:, index], dtype=np.int64))
        weights = probs.gather(1, chosen)
        if router.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(logits.shape[-1]):
            token, slot = torch.where(chosen == e)
            if len(token):
                expert = _hf_expert(block.experts, e, x[token])
                out.index_add_(0, token, expert * weights[token, slot, None].to(x.dtype))
        out = out.view(batch, seq, width)
        return (out, logits) if hf4 else out

    for i, b in enumerate(blocks):  # an instance attribute shadows the class's forward until deleted
        b.forward = lambda hidden, b=b, i=i: forced(b, i, hidden)
    try:
        logits = hf_model(torch.tensor([sample.tokens])).logits[0].double() / temperature  # [n, V]
    finally:
        for b in blocks:
            del b.forward
    logp = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(sample.tokens[1:]).unsqueeze(-1))
    return logp.squeeze(-1)[-sample.response_length:], torch.stack(own, dim=1).numpy()


@torch.no_grad()
def hf_response_logprobs(hf_model, sample: Sample, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log_softmax(logits / T) of the response tokens and the entropy, from an HF model."""
    logits = hf_model(torch.tensor([sample.tokens])).logits[0].double() / temperature  # [n, V]
    logp_all = torch.log_softmax(logits, dim=-1)[:-1]  # [n-1, V] predicting tokens 1..n-1
    targets = torch.tensor(sample.tokens[1:]).unsqueeze(-1)
    logp = logp_all.gather(-1, targets).squeeze(-1)[-sample.response_length:]
    entropy = -(logp_all.exp() * logp_all).sum(-1)[-sample.response_length:]
    return logp, entropy
