"""Tiny random HF model folders and a locally trained BPE tokenizer, for tests, examples and benchmarks.

Nothing is downloaded: the tokenizer is trained on the spot by `tokenizers` on a small
generated corpus, and the models are random-initialised transformers models saved as
ordinary HF folders (config.json, model.safetensors, tokenizer files, chat template).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

_WORDS = (
    "the a of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take get place "
    "made live where after back little only round man year came show every good me give our under "
    "name very through just form sentence great think say help low line differ turn cause much mean "
    "before move right boy old too same tell does set three want air well also play small end put "
    "doctor patient pain fever cough headache chest nausea days weeks test blood diagnosis symptom "
    "question answer what is plus minus times equals calculator tool result error"
).split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.35:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice(["+", "-", "*"])
            lines.append(f"What is {a} {op} {b}? The answer is {eval(f'{a}{op}{b}')}.")
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0, split_digits: bool = False):
    """Train a byte-level BPE tokenizer on a generated corpus and save it as a HF fast tokenizer.

    With `split_digits` every digit is its own token (numbers are never merged), as in Qwen and Llama 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<tool_call>", "</tool_call>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


FAMILIES = ("llama", "qwen2", "qwen3")  # the dense families every family-parametrised test runs
MOE_FAMILIES = ("qwen3_moe",)


def tiny_config(family: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                tie_word_embeddings: bool | None = None, max_position_embeddings: int = 1024,
                eos_token_id: int | None = None, pad_token_id: int | None = None, num_experts: int = 8,
                num_experts_per_tok: int = 2, moe_intermediate_size: int = 32, norm_topk_prob: bool = True,
                mlp_only_layers: tuple[int, ...] = ()):
    """A transformers config of the given family at a tiny size (the MoE arguments apply to qwen3_moe)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=bool(tie_word_embeddings), attention_bias=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=bool(tie_word_embeddings), use_sliding_window=False)
    if family == "qwen3":
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        return Qwen3Config(**common, tie_word_embeddings=tie, head_dim=hidden_size // num_heads,
                           use_sliding_window=False, attention_bias=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, tie_word_embeddings=bool(tie_word_embeddings),
                              head_dim=hidden_size // num_heads, use_sliding_window=False, attention_bias=False,
                              num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                              moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob,
                              decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + MOE_FAMILIES}")


def make_tiny_model(out_dir: str | Path, family: str = "qwen3", *, seed: int = 0, vocab_size: int = 512,
                    init_std: float = 0.1, tokenizer_dir: str | Path | None = None, split_digits: bool = False,
                    **config_kwargs) -> Path:
    """Write a random tiny HF model folder (weights, config, tokenizer, chat template) and return its path.

    `init_std` is larger than HF's default so that random models produce varied, non-degenerate
    distributions (greedy outputs that differ between prompts). `split_digits` is an option of the
    tokenizer made here, so it cannot go with `tokenizer_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if split_digits and tokenizer_dir is not None:
        raise ValueError(f"split_digits=True with tokenizer_dir={str(tokenizer_dir)!r}: the tokenizer is copied as it "
                         f"is; pass one or the other")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = make_tokenizer(out_dir, vocab_size=vocab_size, split_digits=split_digits)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out_dir)
    cfg = tiny_config(family, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **config_kwargs)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # norms at 1 +- noise so that every weight matters in the tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    return out_dir


def make_engine(model_path: str, device: str = "cpu", dtype: str = "float32", max_total_tokens: int = 1024,
                context_length: int | None = None):
    """An `inference_engine.Engine` with a small KV pool and no CUDA graphs.

    A weight-sync receiver for tests and benchmarks.
    """
    from inference_engine.engine import Engine

    return Engine(model_path=model_path, device=device, dtype=dtype, max_total_tokens=max_total_tokens,
                  context_length=context_length, disable_cuda_graph=True)


def greedy_and_prompt_logprobs(engine, prompts: list[list[int]], params: dict) -> tuple[list[dict], dict]:
    """The engine's outputs (with log-probs) for `prompts` under sampling `params`, and the first prompt's
    prompt log-probs over 2 new tokens: what the tp / ep equivalence tests compare between engines."""
    outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    prompt_lp = engine.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 2,
                                                                       "return_prompt_logprobs": True},
                                return_logprob=True)
    return outs, prompt_lp


def run_under_triton_interpreter(argv: list[str], timeout: float = 600):
    """`python *argv` with TRITON_INTERPRET=1 (triton kernels run on CPU), one OpenMP thread and the repository
    on PYTHONPATH, from the repository root; the CompletedProcess (text output captured)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *argv], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=timeout)


def exact_e4m3_under_interpreter() -> None:
    """Under TRITON_INTERPRET: convert to and from e4m3 with torch. The interpreter's own conversion (triton 3.x)
    rounds ties away from zero and drops the carry of a mantissa that rounds up into the exponent (126.95 becomes
    64, not 128), which no GPU does."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    torch_dtypes = {tl.float8e4nv: torch.float8_e4m3fn, tl.float32: torch.float32, tl.bfloat16: torch.bfloat16,
                    tl.float16: torch.float16}
    bits = {8: (torch.uint8, np.uint8), 16: (torch.int16, np.uint16), 32: (torch.int32, np.uint32)}
    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if tl.float8e4nv not in (src, dst) or src not in torch_dtypes or dst not in torch_dtypes:
            return original(data, src, dst, rounding_mode)
        as_torch = torch.from_numpy(np.ascontiguousarray(data).copy()).view(torch_dtypes[src])
        as_int, as_np = bits[dst.primitive_bitwidth]
        return as_torch.to(torch_dtypes[dst]).view(as_int).numpy().view(as_np).reshape(data.shape)

    interpreter._convert_float = convert
