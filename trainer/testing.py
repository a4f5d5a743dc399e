"""Test helpers for the trainer: run a function on N gloo ranks, make synthetic RL samples, HF references."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

import torch

from rollout.sample import Sample


def free_port() -> int:
    """A TCP port that is free right now on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return results by rank.

    `fn` must be importable (module level). A rank's exception is re-raised here with its traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


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


@torch.no_grad()
def hf_response_logprobs(hf_model, sample: Sample, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log_softmax(logits / T) of the response tokens and the entropy, from an HF model."""
    logits = hf_model(torch.tensor([sample.tokens])).logits[0].double() / temperature  # [n, V]
    logp_all = torch.log_softmax(logits, dim=-1)[:-1]  # [n-1, V] predicting tokens 1..n-1
    targets = torch.tensor(sample.tokens[1:]).unsqueeze(-1)
    logp = logp_all.gather(-1, targets).squeeze(-1)[-sample.response_length:]
    entropy = -(logp_all.exp() * logp_all).sum(-1)[-sample.response_length:]
    return logp, entropy
