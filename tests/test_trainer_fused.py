"""The trainer's fused parts against references: Kiln's layer spec vs megatron's local layers (fp32, CPU), the
log-prob and fused-layer triton kernels vs float64 math (triton interpreter on CPU, compiled on GPU), and the
compiled fused ops vs their eager torch form (`-m gpu`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from trainer.testing import run_distributed


def _layer_worker(rank, world, path):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs

    from trainer import attention, bridge, megatron_compat

    megatron_compat.apply()
    parallel_state.initialize_model_parallel(1, 1)
    megatron_compat.model_parallel_manual_seed(0)
    spec = bridge.load_spec(path)
    tconfig = bridge.build_transformer_config(spec)
    local = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    local.submodules.self_attention.submodules.core_attention = attention._core_attention_class()
    torch.manual_seed(0)
    models = {name: bridge.build_gpt_model(spec, tconfig, layer_spec=layer_spec)
              for name, layer_spec in (("kiln", None), ("local", local))}
    for model in models.values():
        bridge.load_hf_checkpoint(model, spec, path)
    lengths = [7, 3, 12]
    tokens = torch.randint(0, 500, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = {}
    for name, model in models.items():
        hidden = bridge.final_hidden_states(model, tokens, positions, attention.packed_seq_params(lengths, "cpu"))
        hidden.square().sum().backward()
        out[name] = (hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        padded = bridge.final_hidden_states(model, tokens[:, :7], positions[:, :7])  # one row, SBHD path
        out[name + "_padded"] = padded.detach()
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_kiln_layers_equal_megatron_local_layers(tiny_models, family):
    out = run_distributed(_layer_worker, 1, tiny_models[family])[0]
    (kiln, kiln_grads), (local, local_grads) = out["kiln"], out["local"]
    assert (kiln - local).abs().max() < 1e-4 * local.abs().max()
    assert (out["kiln_padded"] - out["local_padded"]).abs().max() < 1e-4 * out["local_padded"].abs().max()
    assert (out["kiln_padded"][:, 0] - kiln[:7, 0]).abs().max() < 1e-4 * kiln.abs().max()  # first sequence alone
    assert kiln_grads.keys() == local_grads.keys()
    for name, grad in local_grads.items():
        assert (kiln_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-8, name


def _kernel_case(device: str, seed: int):
    """logits [c, n] in bf16, targets, and float64 references of the stats and the logit gradients."""
    g = torch.Generator().manual_seed(seed)
    c, n, temperature = 6, 2500 + 37 * seed, 0.7
    logits = (3 * torch.randn(c, n, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    ids = torch.randint(0, n, (c,), generator=g)
    z = logits.double() / temperature
    z_max = z.max(-1).values
    ex = (z - z_max[:, None]).exp()
    lse = z_max + ex.sum(-1).log()
    log_p = z - lse[:, None]
    entropy = -(log_p.exp() * log_p).sum(-1)
    g_logp = torch.randn(c, generator=g, dtype=torch.float64)
    g_entropy = torch.randn(c, generator=g, dtype=torch.float64)
    g_target = g_logp.clone()
    g_target[0] = 0.0  # row 0's target lives on another rank
    grads = -log_p.exp() * (g_logp[:, None] + g_entropy[:, None] * (log_p + entropy[:, None]))
    grads.scatter_add_(-1, ids[:, None], g_target[:, None])
    stats = (z_max, ex.sum(-1), (ex * z).sum(-1), z.gather(-1, ids[:, None]).squeeze(-1))
    inputs = [t.to(device) for t in (logits, ids)] + [t.float().to(device) for t in
                                                      (lse, entropy, g_logp, g_target, g_entropy)]
    return inputs, temperature, stats, grads / temperature


def _check_kernels(device: str) -> None:
    from trainer import logprob_kernels

    for seed in range(3):
        (logits, ids, lse, entropy, g_logp, g_target, g_entropy), temperature, stats, grads = _kernel_case(device, seed)
        got = logprob_kernels.softmax_stats(logits, ids, temperature)
        for value, ref in zip(got, stats):
            assert (value.cpu().double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (seed, value, ref)
        out = logprob_kernels.logit_grads_(logits.clone(), ids, lse, entropy, g_logp, g_target, g_entropy, temperature)
        assert out.dtype == torch.bfloat16
        assert (out.cpu().double() - grads).abs().max() <= 1e-2 * grads.abs().max(), seed  # bf16 output


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 on the CPU."""
    return float((x.detach().cpu().double() - ref.cpu()).norm() / ref.norm())


def _check_layer_kernels(device: str) -> None:
    """q/k norm + RoPE and SwiGLU triton kernels (fp32 and bf16) against float64 eager math, values and grads."""
    from trainer import fused, fused_kernels

    g = torch.Generator().manual_seed(0)
    cases = [(37, 1, 2, 2, 16, True), (29, 3, 2, 2, 16, False), (21, 1, 1, 3, 32, True)]  # s, b, groups, q/group, hn
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for s, b, groups, q_per_group, dim, norm in cases:
            mixed = torch.randn(s, b, groups, (q_per_group + 2) * dim, generator=g, dtype=torch.float64)
            freqs = (torch.arange(64)[:, None] * 0.1 * torch.arange(dim)[None]).double()[:, None, None, :]
            positions = torch.randint(0, 64, (s,), generator=g)
            cos, sin = torch.cos(freqs[positions]), torch.sin(freqs[positions])
            weights = [None, None]
            if norm:
                weights = [torch.rand(dim, generator=g, dtype=torch.float64) + 0.5 for _ in range(2)]
            ref_in = [mixed.requires_grad_(True)] + [w.requires_grad_(True) for w in weights if w is not None]
            ref = fused.qkv_norm_rope(mixed, q_per_group, dim, cos, sin, *weights, 1e-6)
            upstream = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
            ref_grads = torch.autograd.grad(ref, ref_in, upstream)
            ins = [t.detach().to(device, dtype).requires_grad_(True) for t in ref_in]
            w_in = ins[1:] if norm else [None, None]
            out = fused_kernels.QKNormRoPE.apply(ins[0], q_per_group, dim, cos.to(device).float(),
                                                 sin.to(device).float(), *w_in, 1e-6)
            grads = torch.autograd.grad(out, ins, [u.to(device, dtype) for u in upstream])
            assert [t.dtype for t in out] == [dtype] * 3
            for got, want in zip(list(out) + list(grads), list(ref) + list(ref_grads)):
                assert got.shape == want.shape and _rel(got, want) < tol, (dtype, s, b, norm, _rel(got, want))
        gate_up = torch.randn(5, 2, 2 * 1100, generator=g, dtype=torch.float64).requires_grad_(True)
        ref = fused.swiglu(gate_up)
        upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ref.backward(upstream)
        x = gate_up.detach().to(device, dtype).requires_grad_(True)
        out = fused_kernels.SwiGLU.apply(x)
        out.backward(upstream.to(device, dtype))
        assert out.dtype == dtype and _rel(out, ref) < tol and _rel(x.grad, gate_up.grad) < tol


def _under_triton_interpreter(check: str) -> None:
    """Run tests.test_trainer_fused.<check>('cpu') with TRITON_INTERPRET=1 in a fresh process."""
    if os.environ.get("TRITON_INTERPRET"):
        globals()[check]("cpu")
        return
    script = f"import sys; sys.path.insert(0, {os.getcwd()!r}); import tests.test_trainer_fused as t; t.{check}('cpu')"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_logprob_kernels_match_float64_under_the_triton_interpreter():
    _under_triton_interpreter("_check_kernels")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_layer_kernels_match_float64_under_the_triton_interpreter():
    _under_triton_interpreter("_check_layer_kernels")


@pytest.mark.gpu
def test_logprob_kernels_match_float64_on_gpu():
    _check_kernels("cuda")


@pytest.mark.gpu
def test_layer_kernels_match_float64_on_gpu():
    _check_layer_kernels("cuda")


@pytest.mark.gpu
def test_compiled_fused_ops_match_eager_on_gpu():
    from trainer import fused

    g = torch.Generator().manual_seed(0)
    s, groups, q_per_group, head_dim = 300, 4, 2, 64
    mixed = torch.randn(s, 1, groups, (q_per_group + 2) * head_dim, generator=g).cuda().bfloat16().requires_grad_(True)
    positions = torch.cat([torch.arange(100), torch.arange(200)]).cuda()
    freqs = (torch.arange(512)[:, None] * 0.01 * torch.arange(head_dim)[None]).float().cuda()[:, None, None, :]
    cos, sin = fused.rope_cos_sin(freqs, positions, s)
    weights = [torch.rand(head_dim, generator=g).cuda().bfloat16().requires_grad_(True) for _ in range(2)]
    args = (q_per_group, head_dim, cos, sin, *weights, 1e-6)
    eager = fused.qkv_norm_rope(mixed, *args)
    compiled = fused.run(fused.qkv_norm_rope, mixed, *args)
    upstream = [torch.randn(t.shape, generator=g).cuda().bfloat16() for t in eager]
    grads_e = torch.autograd.grad(eager, [mixed, *weights], upstream)
    grads_c = torch.autograd.grad(compiled, [mixed, *weights], upstream)
    for a, b in zip(list(compiled) + list(grads_c), list(eager) + list(grads_e)):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    gate_up = torch.randn(s, 1, 256, generator=g).cuda().bfloat16()
    assert (fused.run(fused.swiglu, gate_up).float() - fused.swiglu(gate_up).float()).abs().max() < 2e-2
