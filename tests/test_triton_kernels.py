"""Paged attention kernels (decode split-KV, extend) against a float64 naive softmax(QK^T)V per request.

On CPU the triton kernels run under the triton interpreter in ONE subprocess started with
TRITON_INTERPRET=1 (the variable must be set before triton builds the kernels, which an
earlier test module may already have done in this process); this file is also that
subprocess's script. The `gpu` tests run the compiled kernels in bf16 on CUDA, including
CUDA-graph replay with changed lengths.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference_engine.kernels import attention_reference, decode_attention, extend_attention, runs_triton

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_VERSION = (
    tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("triton"))[:2]) if HAS_TRITON else ()
)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'kiln[test]' on Linux)")
needs_interpreter = pytest.mark.skipif(
    not HAS_TRITON or TRITON_VERSION < (3, 7),
    reason="triton < 3.7 (or missing): its interpreter cannot use loaded scalars as loop bounds under numpy 2",
)

NUM_HEADS, NUM_KV_HEADS = 4, 2
# name -> (seed, [(q_len, kv_len) per request], head_dim, page_size, sm_scale)
EXTEND_CASES = {
    "p1_d16": (0, [(1, 1), (5, 17), (37, 37)], 16, 1, None),
    "p4_d32": (1, [(2, 9), (1, 36), (20, 33)], 32, 4, 0.3),
    "p4_d16_block_edge": (2, [(16, 32)], 16, 4, None),
    "p1_d32_no_new_tokens": (3, [(0, 5), (3, 3), (17, 29)], 32, 1, None),
}
DECODE_CASES = {
    "p1_d16": (4, [(1, 1), (1, 2), (1, 37)], 16, 1, None),
    "p4_d32": (5, [(1, 36), (1, 5), (1, 17)], 32, 4, 0.3),
    "p4_d16_single": (6, [(1, 33)], 16, 4, None),
}
DECODE_SPLITS = (1, 3)


def make_case(seed, lens, head_dim, page_size, sm_scale, dtype=torch.float32, device="cpu", num_pages=None):
    """Random q and KV buffers; each request's slots are whole pages drawn from a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_request = [-(-kv_len // page_size) for _, kv_len in lens]
    num_pages = num_pages or sum(pages_per_request) + 3  # spare pages hold keys nobody may read
    page_order = torch.randperm(num_pages, generator=gen)
    kv_indices, used = [], 0
    for (_, kv_len), n_pages in zip(lens, pages_per_request):
        pages = page_order[used : used + n_pages]
        used += n_pages
        slots = (pages[:, None] * page_size + torch.arange(page_size)[None, :]).flatten()  # [n_pages * page_size]
        kv_indices.append(slots[:kv_len])
    num_slots = num_pages * page_size
    q_lens = torch.tensor([q_len for q_len, _ in lens])
    kv_lens = torch.tensor([kv_len for _, kv_len in lens])
    zero = torch.zeros(1, dtype=torch.int64)
    case = {
        "q": torch.randn(int(q_lens.sum()), NUM_HEADS, head_dim, generator=gen),
        "k_buffer": torch.randn(num_slots, NUM_KV_HEADS, head_dim, generator=gen),
        "v_buffer": torch.randn(num_slots, NUM_KV_HEADS, head_dim, generator=gen),
        "qo_indptr": torch.cat([zero, q_lens.cumsum(0)]).to(torch.int32),
        "kv_indptr": torch.cat([zero, kv_lens.cumsum(0)]).to(torch.int32),
        "kv_indices": torch.cat(kv_indices).to(torch.int64 if seed % 2 else torch.int32),
    }
    case = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in case.items()}
    case["sm_scale"] = sm_scale
    return case


def naive_attention(case) -> torch.Tensor:
    """float64 softmax(q k^T * scale) v, one query token and one head at a time, causal by position."""
    q, k, v = (case[name].double().cpu() for name in ("q", "k_buffer", "v_buffer"))
    qo, kvp, idx = (case[name].tolist() for name in ("qo_indptr", "kv_indptr", "kv_indices"))
    scale = case["sm_scale"] if case["sm_scale"] is not None else 1.0 / math.sqrt(q.shape[2])
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(len(qo) - 1):
        q_len, kv_len = qo[b + 1] - qo[b], kvp[b + 1] - kvp[b]
        for i in range(q_len):
            visible = idx[kvp[b] : kvp[b] + kv_len - q_len + i + 1]  # positions 0 .. own position
            for h in range(q.shape[1]):
                scores = k[visible, h // group] @ q[qo[b] + i, h] * scale  # [visible]
                weights = torch.exp(scores - scores.max())
                out[qo[b] + i, h] = (weights / weights.sum()) @ v[visible, h // group]
    return out


def run_kernel(kind, case, num_kv_splits=None, strided=True):
    """Call the public kernel on a strided view of q (as sliced from a fused qkv) into a NaN-filled out."""
    q = case["q"]
    if strided:
        wide = torch.zeros(q.shape[0], q.shape[1] + 2, q.shape[2], dtype=q.dtype, device=q.device)
        wide[:, : q.shape[1]] = q
        q = wide[:, : q.shape[1]]  # [tokens, H, D] with token stride (H + 2) * D
    out = torch.full_like(case["q"], float("nan"))
    common = dict(k_buffer=case["k_buffer"], v_buffer=case["v_buffer"], kv_indptr=case["kv_indptr"])
    common.update(kv_indices=case["kv_indices"], sm_scale=case["sm_scale"], out=out)
    if kind == "decode":
        result = decode_attention(q, num_kv_splits=num_kv_splits, **common)
    else:
        result = extend_attention(q, qo_indptr=case["qo_indptr"], **common)
    assert result is out
    return result


def _interpreter_worker(inputs_path: str, outputs_path: str) -> None:
    """Subprocess body: run every case through the interpreted triton kernels and save the outputs."""
    assert runs_triton("cpu"), "TRITON_INTERPRET=1 was not in effect: the kernels were compiled for a GPU"
    cases = torch.load(inputs_path)
    outputs = {}
    for name, case in cases["extend"].items():
        outputs[f"extend/{name}"] = run_kernel("extend", case)
    for name, case in cases["decode"].items():
        for splits in DECODE_SPLITS:
            outputs[f"decode/{name}/{splits}"] = run_kernel("decode", case, num_kv_splits=splits)
    torch.save(outputs, outputs_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """{"extend/<case>" | "decode/<case>/<splits>": output} from the kernels under the triton interpreter."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = {
        "extend": {name: make_case(*spec) for name, spec in EXTEND_CASES.items()},
        "decode": {name: make_case(*spec) for name, spec in DECODE_CASES.items()},
    }
    torch.save(cases, folder / "inputs.pt")
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
        env=env, cwd=repo_root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return cases, torch.load(folder / "outputs.pt")


@needs_interpreter
@pytest.mark.parametrize("name", EXTEND_CASES)
def test_extend_kernel_interpreted_matches_naive(interpreted, name):
    cases, outputs = interpreted
    expected = naive_attention(cases["extend"][name])
    torch.testing.assert_close(outputs[f"extend/{name}"].double(), expected, atol=1e-4, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("splits", DECODE_SPLITS)
@pytest.mark.parametrize("name", DECODE_CASES)
def test_decode_kernel_interpreted_matches_naive(interpreted, name, splits):
    cases, outputs = interpreted
    expected = naive_attention(cases["decode"][name])
    torch.testing.assert_close(outputs[f"decode/{name}/{splits}"].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", EXTEND_CASES)
def test_reference_matches_naive(name):
    case = make_case(*EXTEND_CASES[name])
    args = [case[k] for k in ("q", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices")]
    out = attention_reference(*args, sm_scale=case["sm_scale"])
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODE_CASES)
def test_cpu_decode_without_interpreter_falls_back_to_reference(name):
    case = make_case(*DECODE_CASES[name])
    torch.testing.assert_close(run_kernel("decode", case).double(), naive_attention(case), atol=1e-5, rtol=0)


def test_bad_arguments_raise_clear_errors():
    case = make_case(*EXTEND_CASES["p1_d16"])
    args = dict((k, case[k]) for k in ("q", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices"))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        extend_attention(**{**args, "q": case["q"][:, :3]})
    with pytest.raises(ValueError, match="dtype"):
        extend_attention(**{**args, "k_buffer": case["k_buffer"].double()})
    with pytest.raises(ValueError, match="write KV before attention"):
        extend_attention(**{**args, "qo_indptr": torch.tensor([0, 2, 6, 43], dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"valid is \[0, "):
        extend_attention(**{**args, "kv_indices": case["kv_indices"] + case["k_buffer"].shape[0]})
    with pytest.raises(ValueError, match="max_q_len"):
        extend_attention(**args, max_q_len=-1)
    decode_args = {k: v for k, v in args.items() if k != "qo_indptr"}
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention(**{**decode_args, "q": case["q"][:3]}, num_kv_splits=0)
    with pytest.raises(ValueError, match="kv_indptr has 4 entries"):
        decode_attention(**{**decode_args, "q": case["q"][:2]})


# ---- GPU: the compiled kernels in bf16, and in float32 (the engine's dtype for small models, e.g. the medical
# example's: tl.dot's "ieee" precision, no tf32) --------------------------------------------------------------------

CUDA_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # against the float64 reference


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_TOLERANCE, ids=["bf16", "float32"])
@pytest.mark.parametrize("name", EXTEND_CASES)
def test_extend_kernel_cuda_matches_naive(name, dtype):
    case = make_case(*EXTEND_CASES[name], dtype=dtype, device="cuda")
    assert runs_triton(case["q"].device)
    out = run_kernel("extend", case).double().cpu()
    torch.testing.assert_close(out, naive_attention(case), atol=CUDA_TOLERANCE[dtype], rtol=0)


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_TOLERANCE, ids=["bf16", "float32"])
@pytest.mark.parametrize("splits", DECODE_SPLITS + (None,))
@pytest.mark.parametrize("name", DECODE_CASES)
def test_decode_kernel_cuda_matches_naive(name, splits, dtype):
    case = make_case(*DECODE_CASES[name], dtype=dtype, device="cuda")
    out = run_kernel("decode", case, num_kv_splits=splits).double().cpu()
    torch.testing.assert_close(out, naive_attention(case), atol=CUDA_TOLERANCE[dtype], rtol=0)


def _load_batch(static, case):
    """Copy a batch into the captured tensors in place (same batch size, within their capacity)."""
    for name in ("k_buffer", "v_buffer", "qo_indptr", "kv_indptr"):
        static[name].copy_(case[name])
    for name in ("q", "kv_indices"):
        static[name][: case[name].shape[0]].copy_(case[name])


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decode", "extend"])
def test_cuda_graph_replay_follows_new_lengths(kind):
    if kind == "decode":
        first, second = [(1, 37), (1, 5), (1, 20)], [(1, 12), (1, 60), (1, 1)]
    else:
        first, second = [(9, 37), (16, 16), (1, 20)], [(16, 40), (2, 2), (7, 61)]
    case_a, case_b = (make_case(7, lens, 32, 4, None, torch.bfloat16, "cuda", num_pages=64) for lens in (first, second))
    q_capacity = 3 if kind == "decode" else 32
    static = {name: torch.zeros_like(case_a[name]) for name in ("k_buffer", "v_buffer", "qo_indptr", "kv_indptr")}
    static["q"] = torch.zeros(q_capacity, NUM_HEADS, 32, dtype=torch.bfloat16, device="cuda")
    static["kv_indices"] = torch.zeros(256, dtype=case_a["kv_indices"].dtype, device="cuda")
    static["out"] = torch.empty_like(static["q"])
    buffers = (static["q"], static["k_buffer"], static["v_buffer"])
    if kind == "decode":
        launch = lambda: decode_attention(  # noqa: E731
            *buffers, static["kv_indptr"], static["kv_indices"], out=static["out"], num_kv_splits=4
        )
    else:
        launch = lambda: extend_attention(  # noqa: E731
            *buffers, static["qo_indptr"], static["kv_indptr"], static["kv_indices"], out=static["out"], max_q_len=16
        )
    _load_batch(static, case_a)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        launch()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for case in (case_a, case_b):
        _load_batch(static, case)
        graph.replay()
        out = static["out"][: case["q"].shape[0]].double().cpu()
        torch.testing.assert_close(out, naive_attention(case), atol=2e-2, rtol=0)


if __name__ == "__main__":
    _interpreter_worker(sys.argv[1], sys.argv[2])
