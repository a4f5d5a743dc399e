"""Shared-prefix decode: requests of one group attend to their common prefix once, merged with their own suffix.

The split (decode over the slots after the prefix with its log-sum-exp, then `shared_prefix_attention`) must equal
attention over each request's whole context: checked against a float64 naive softmax(QK^T)V, through the torch
reference on CPU, the triton kernels under the interpreter (one subprocess: this file is its script, as in
test_triton_kernels.py) and compiled on CUDA (`gpu`). Then the grouping (`prefix_chunks`) and whole engines: GRPO
traffic decodes the same greedy tokens with it on as off, with chunks actually formed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference_engine.attention.shared_prefix import chunk_members, prefix_chunks
from inference_engine.kernels import decode_attention, runs_triton, shared_prefix_attention
from inference_engine.kv_cache import quantize_kv

HEADS, KV_HEADS, DIM, PAGE = 4, 2, 32, 4
# name -> (seed, [(group, suffix_len) per request], {group: prefix_len}, fp8)
CASES = {
    "two_groups": (0, [(0, 5), (1, 9), (0, 1), (0, 13), (1, 3), (2, 7)], {0: 24, 1: 40, 2: 0}, False),
    "one_long_prefix": (1, [(0, 2), (0, 67), (0, 1)], {0: 96}, False),
    "fp8": (2, [(0, 6), (0, 11), (1, 4), (1, 1)], {0: 32, 1: 20}, True),
}


def make_case(seed, reqs, prefixes, fp8, dtype=torch.float32, device="cpu"):
    """Random q / KV; each group's prefix in its own pages, each request's suffix after it in pages of its own."""
    gen = torch.Generator().manual_seed(seed)
    next_page = 1  # page 0 unused: a slot index 0 would hide indexing mistakes
    prefix_slots = {}
    for g, n in prefixes.items():
        pages = -(-n // PAGE)
        prefix_slots[g] = torch.arange(next_page * PAGE, (next_page + pages) * PAGE)[:n]
        next_page += pages
    indices, lens = [], []
    for g, suffix in reqs:
        pages = -(-suffix // PAGE)
        own = torch.arange(next_page * PAGE, (next_page + pages) * PAGE)[:suffix]
        next_page += pages
        indices.append(torch.cat([prefix_slots[g], own]))
        lens.append(len(indices[-1]))
    slots = next_page * PAGE
    case = {"q": torch.randn(len(reqs), HEADS, DIM, generator=gen),
            "k": torch.randn(slots, KV_HEADS, DIM, generator=gen),
            "v": torch.randn(slots, KV_HEADS, DIM, generator=gen),
            "kv_indptr": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
            "kv_indices": torch.cat(indices).to(torch.int32), "kv_scale": None}
    if fp8:
        scale = (torch.rand(2, KV_HEADS, generator=gen) + 0.5).float()
        case["k"] = quantize_kv(case["k"], 1 / scale[0])
        case["v"] = quantize_kv(case["v"], 1 / scale[1])
        case["kv_scale"] = (scale[0], scale[1])
    # the grouping an engine would build: key = group, length = prefix
    chunks = prefix_chunks([g for g, _ in reqs], [prefixes[g] for g, _ in reqs], members=2, min_tokens=1)
    case.update(members=chunks.members, lens=chunks.lens, skip=chunks.skip)
    out = {}
    for name, t in case.items():
        if isinstance(t, torch.Tensor):
            out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() and t.element_size() > 1 else t.dtype)
        elif isinstance(t, tuple):
            out[name] = tuple(s.to(device) for s in t)
        else:
            out[name] = t
    return out


def naive(case) -> torch.Tensor:
    """float64 attention of each request's one query over its whole context."""
    k, v = case["k"].double().cpu(), case["v"].double().cpu()
    if case["kv_scale"] is not None:
        k, v = k * case["kv_scale"][0].double().cpu()[:, None], v * case["kv_scale"][1].double().cpu()[:, None]
    q, ptr, idx = case["q"].double().cpu(), case["kv_indptr"].tolist(), case["kv_indices"].long().cpu()
    group = HEADS // KV_HEADS
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        slots = idx[ptr[b]:ptr[b + 1]]
        for h in range(HEADS):
            weights = torch.softmax(k[slots, h // group] @ q[b, h] / math.sqrt(DIM), dim=0)
            out[b, h] = weights @ v[slots, h // group]
    return out


def split_attention(case, splits=2) -> torch.Tensor:
    """The suffixes (decode with kv_skip, lse), then the chunks' prefixes merged in, as the backends run it."""
    q = case["q"]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    common = dict(kv_indptr=case["kv_indptr"], kv_indices=case["kv_indices"], sm_scale=1 / math.sqrt(DIM),
                  kv_scale=case["kv_scale"])
    decode_attention(q, case["k"], case["v"], out=out, num_kv_splits=splits, kv_skip=case["skip"], lse=lse, **common)
    return shared_prefix_attention(q, case["k"], case["v"], members=case["members"], prefix_lens=case["lens"], out=out,
                                   lse=lse, **common)


def test_prefix_chunks_group_by_node_and_cut_into_chunks():
    keys = [7, 3, 7, 9, 7, 7, 3, 5, 7]
    lens = [64, 32, 64, 64, 64, 64, 32, 8, 64]
    chunks = prefix_chunks(keys, lens, members=2, min_tokens=16)
    # key 7: requests 0 2 4 5 8 -> (0, 2), (4, 5), lone tail 8 reads its own prefix; key 3: (1, 6); 9 alone; 5 short
    assert chunks.members.tolist() == [[0, 2], [4, 5], [1, 6]]
    assert chunks.lens.tolist() == [64, 64, 32]
    assert chunks.skip.tolist() == [64, 32, 64, 0, 64, 64, 32, 0, 0]
    wide = prefix_chunks(keys, lens, members=8, min_tokens=16)
    assert wide.members.tolist() == [[0, 2, 4, 5, 8, -1, -1, -1], [1, 6, -1, -1, -1, -1, -1, -1]]
    assert prefix_chunks([1, 2, 3], [64, 64, 64], members=8) is None  # nothing shared
    assert prefix_chunks([1, 1], [16, 16], members=8, min_tokens=32) is None  # too short to be worth it
    assert prefix_chunks([1, 1], [64, 48], members=8) is None  # one node, two lengths: never grouped
    assert chunk_members(16, 8) == 8 and chunk_members(32, 8) == 8 and chunk_members(64, 4) == 4


@pytest.mark.parametrize("name", CASES)
def test_split_equals_whole_context_attention_reference(name):
    case = make_case(*CASES[name])
    assert not runs_triton("cpu") or os.environ.get("TRITON_INTERPRET")
    torch.testing.assert_close(split_attention(case).double(), naive(case), atol=1e-5, rtol=0)


def test_padding_chunks_change_nothing():
    case = make_case(*CASES["two_groups"])
    case["lens"] = torch.zeros_like(case["lens"])  # every chunk padding, nothing skipped: plain decode
    case["skip"] = torch.zeros_like(case["skip"])
    torch.testing.assert_close(split_attention(case).double(), naive(case), atol=1e-5, rtol=0)


# ---- the triton kernels under the interpreter (one subprocess) ----------------------------------------------------


def _interpreter_worker(inputs_path: str, outputs_path: str) -> None:
    assert runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect"
    cases = torch.load(inputs_path, weights_only=False)
    torch.save({f"{name}/{splits}": split_attention(case, splits) for name, case in cases.items() for splits in (1, 3)},
               outputs_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("shared_prefix_interpret")
    cases = {name: make_case(*spec) for name, spec in CASES.items()}
    torch.save(cases, folder / "inputs.pt")
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
                          env=env, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return cases, torch.load(folder / "outputs.pt")


@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("name", CASES)
def test_split_equals_whole_context_attention_interpreted(interpreted, name, splits):
    cases, outputs = interpreted
    torch.testing.assert_close(outputs[f"{name}/{splits}"].double(), naive(cases[name]), atol=1e-4, rtol=0)


# ---- engines: GRPO traffic, shared-prefix decode on vs off --------------------------------------------------------


def grpo_prompts(groups=3, n=4, prompt_len=37):
    gen = torch.Generator().manual_seed(1)
    return [p for p in (torch.randint(10, 500, (prompt_len,), generator=gen).tolist() for _ in range(groups))
            for _ in range(n)]


def run_engine(model, shared: bool, monkeypatch=None, graph_max_bs=None, **options):
    """Greedy GRPO traffic's tokens and log-probs, and the requests in chunks at each decode step (with monkeypatch).
    graph_max_bs: decode through a CudaGraphRunner of that size (on CPU: replayed eagerly on its static buffers)."""
    from inference_engine import Engine
    from inference_engine.cuda_graph import CudaGraphRunner

    formed = []
    if monkeypatch is not None:  # count the chunks each decode batch formed
        import inference_engine.attention.shared_prefix as sp

        original = sp.prefix_chunks

        def spy(*args, **kwargs):
            chunks = original(*args, **kwargs)
            formed.append(0 if chunks is None else int((chunks.members >= 0).sum()))
            return chunks

        monkeypatch.setattr(sp, "prefix_chunks", spy)
    params = {"max_new_tokens": 12, "ignore_eos": True, "temperature": 0}
    with Engine(model_path=str(model), max_total_tokens=4096, shared_prefix_decode=shared, **options) as engine:
        if graph_max_bs is not None:
            runner = engine.runner
            runner.graph_runner = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_pool, graph_max_bs,
                                                  runner.context_length, runner.device)
        outs = engine.generate(input_ids=grpo_prompts(), sampling_params=params, return_logprob=True)
        metrics = engine.metrics()
    if not shared:
        assert metrics["shared_prefix_decode_requests_total"] == metrics["shared_prefix_grouped_requests_total"] == 0
    elif monkeypatch is not None and options.get("tp_size", 1) == 1:  # counted where chunks were formed: rank 0
        # 12 requests x at least 11 decode steps (the first token comes from the prefill; overlap scheduling adds a
        # step a request turns out not to need), every chunked request counted (a flashinfer graph step that keeps its
        # plan counts its chunks again without forming them)
        assert 12 * 11 <= metrics["shared_prefix_decode_requests_total"] <= 12 * 12
        assert sum(formed) <= metrics["shared_prefix_grouped_requests_total"] <= metrics[
            "shared_prefix_decode_requests_total"]
    return [o["output_ids"] for o in outs], [o["meta_info"]["output_token_logprobs"] for o in outs], formed


@pytest.mark.parametrize("graph_max_bs", [None, 16])
def test_engine_decodes_the_same_tokens_with_shared_prefixes(qwen3_model, monkeypatch, graph_max_bs):
    options = dict(attention_backend="triton", page_size=4)  # on CPU: the kernels' torch references
    tokens_off, logprobs_off, _ = run_engine(qwen3_model, False, **options)
    tokens_on, logprobs_on, formed = run_engine(qwen3_model, True, monkeypatch, graph_max_bs, **options)
    assert tokens_on == tokens_off
    for on, off in zip(logprobs_on, logprobs_off):
        torch.testing.assert_close(torch.tensor([x[0] for x in on]), torch.tensor([x[0] for x in off]),
                                   atol=1e-4, rtol=0)
    assert max(formed) == 12  # a decode step had every request of the three groups of four in a chunk


def test_tp2_workers_group_the_same_way(qwen3_model, monkeypatch):
    """The groups travel with the batch to the tp worker (its own process: its chunks are not counted here), so both
    ranks take the shared-prefix path; tp 2 with it on decodes what tp 1 without it does."""
    options = dict(attention_backend="triton", page_size=4)
    tokens_off, logprobs_off, _ = run_engine(qwen3_model, False, **options)
    tokens_on, logprobs_on, formed = run_engine(qwen3_model, True, monkeypatch, tp_size=2, **options)
    assert tokens_on == tokens_off and max(formed) == 12
    for on, off in zip(logprobs_on, logprobs_off):
        torch.testing.assert_close(torch.tensor([x[0] for x in on]), torch.tensor([x[0] for x in off]),
                                   atol=1e-4, rtol=0)


def test_worker_batches_carry_the_groups():
    from inference_engine.tp_worker import receive_batch

    class Group:  # stands in for the broadcast of the packed device tensors
        def broadcast(self, t):
            return t.zero_()

    class Runner:
        device, kv_pool, attn_backend = torch.device("cpu"), None, None

    fb = receive_batch(Group(), Runner(), [1, 1], [40, 41], 81, False, [7, 7], [36, 36])
    assert fb.prefix_keys == [7, 7] and fb.prefix_lens == [36, 36]


def test_the_rl_step_decodes_grpo_groups_through_shared_prefixes(tmp_path):
    """benchmarks/rl_step.py on CPU (the real driver, engines in Ray actors, the triton backend's references) with
    it on: the rollout's GRPO groups are grouped (the engine's counters, reported per rollout), and the prompt's
    copies hit the radix cache."""
    import json
    import subprocess
    import sys

    out = tmp_path / "rl_step.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", RAY_AUTH_MODE="disabled",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rl_step", "--shape", "tiny", "--prompts", "4", "--samples",
                           "4", "--prompt-len", "64", "--response-len", "16", "--warmup", "1", "--steps", "1",
                           "--set", "attention-backend=triton", "--set", "shared-prefix-decode=true",
                           "--out", str(out)], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mean = json.loads(out.read_text())["mean"]
    assert mean["rollout_cache_hit_rate"] == pytest.approx(3 / 4 * 63 / 64)  # 3 of 4 copies: all but the last token
    assert mean["rollout_shared_prefix_share"] > 0.9
    assert "| - decode requests reading a shared prefix once |" in proc.stdout


def test_config_refuses_a_backend_without_it(qwen3_model):
    from inference_engine.config import EngineConfig

    with pytest.raises(ValueError, match="shared_prefix_decode needs attention_backend"):
        EngineConfig(model_path=str(qwen3_model), shared_prefix_decode=True)


def test_attention_benchmark_smoke():
    """benchmarks/shared_prefix_attention.py's code path on CPU: its W1-shaped batch forms chunks, and the backend's
    shared-prefix decode equals its whole-context decode on it."""
    from benchmarks.shared_prefix_attention import main

    assert main(["--smoke"]) == []  # no timing rows on CPU


# ---- GPU: compiled kernels, flashinfer and graphs -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_split_equals_whole_context_attention_cuda_bf16(name):
    case = make_case(*CASES[name], dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(split_attention(case, splits=4).double().cpu(), naive(case), atol=2e-2, rtol=0)


@pytest.fixture(scope="module")
def head_dim_128_model(tmp_path_factory, tokenizer_dir):
    """Head dim 128, what flashinfer's kernels are built for (the tiny models' 16 is not), as in test_engine_gpu.py."""
    from inference_engine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpu_qwen3"), "qwen3", seed=7, init_std=0.02,
                           tokenizer_dir=tokenizer_dir, hidden_size=512, num_heads=4, num_kv_heads=2,
                           intermediate_size=1024, num_layers=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flashinfer", "flashinfer+triton", "triton"])
@pytest.mark.parametrize("graphs", [True, False])
def test_engine_cuda_decodes_the_same_tokens_with_shared_prefixes(head_dim_128_model, monkeypatch, backend, graphs):
    """flashinfer+triton: the flashinfer backend's decode through the triton kernels (decode_attention="triton")."""
    backend, _, decode = backend.partition("+")
    pytest.importorskip(backend)
    qwen3_model = head_dim_128_model
    options = dict(device="cuda", dtype="bfloat16", attention_backend=backend, page_size=16,
                   disable_cuda_graph=not graphs,
                   decode_attention=(decode or "flashinfer") if backend == "flashinfer" else "auto")
    tokens_off, logprobs_off, _ = run_engine(qwen3_model, False, **options)
    tokens_on, logprobs_on, formed = run_engine(qwen3_model, True, monkeypatch, **options)
    assert max(formed) == 12  # the graph of 16 requests: 12 real ones in chunks, 4 padding ones in none
    same = sum(a == b for a, b in zip(tokens_on, tokens_off))
    assert same >= len(tokens_off) - 1, f"only {same} of {len(tokens_off)} greedy sequences agree"
    first = [(on[0][0], off[0][0]) for on, off in zip(logprobs_on, logprobs_off)]
    assert max(abs(a - b) for a, b in first) < 0.05  # the first decode step: same inputs, bf16 rounding apart


if __name__ == "__main__":
    _interpreter_worker(sys.argv[1], sys.argv[2])

