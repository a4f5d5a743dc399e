"""EngineConfig: every knob of the engine, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULE_POLICIES = ("fcfs", "lpm")
DECODE_ATTENTION = ("flashinfer", "triton", "auto")
WEIGHT_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


@dataclass
class EngineConfig:
    """Configuration of one Engine (field names follow SGLang's server arguments)."""

    model_path: str  # a local HF model folder (config.json, weights, tokenizer)
    tokenizer_path: str | None = None  # None: the tokenizer lives in model_path
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # weights and KV cache: float32, bfloat16 or float16
    page_size: int = 1  # KV slots per page; radix matches are page-aligned
    max_total_tokens: int | None = None  # KV pool size in tokens; None: sized from free memory (GPU) or 16384 (CPU)
    mem_fraction_static: float = 0.85  # share of free GPU memory given to the KV pool when max_total_tokens is None
    context_length: int | None = None  # longest prompt + output; None: the model's max_position_embeddings
    max_running_requests: int = 256  # requests running at once at most (prefill or decode); the rest wait queued
    chunked_prefill_size: int = 2048  # prompt tokens computed per scheduler step, over all requests
    schedule_policy: str = "fcfs"  # "fcfs" or "lpm" (longest cached prefix first)
    disable_radix_cache: bool = False  # recompute every prompt (no prefix reuse across requests)
    disable_prefix_sharing: bool = False  # off: running prefills are cached only when they finish, no admission dedup
    prefix_sharing_min_tokens: int = 32  # a waiting request waits for a running prefill that covers all of its
    # uncached prefix or at least this many tokens of it
    attention_backend: str = "torch"  # "torch" (any device), "triton" (CUDA; torch reference on CPU),
    # "flashinfer" (CUDA)
    decode_attention: str = "auto"  # flashinfer backend's decode kernel: auto, flashinfer or triton (split-KV)
    # "auto": Kiln's triton kernel for decode batches of up to decode_attention_auto_max_bs requests, flashinfer's
    # above; with the other backends there is nothing to choose and only "auto" is accepted
    decode_attention_auto_max_bs: int = 64  # "auto" sends decode batches up to this size to the triton kernel
    # on an H100 (8B shape, 160 tokens of context) triton was faster at batch 1 and 64, the sizes measured
    # (docs/benchmarks.md); under graphs the captured size decides
    decode_tensor_cores: str = "auto"  # flashinfer decode on tensor cores: on, off, auto (on for an e4m3 KV cache)
    # "auto": on with an e4m3 KV cache, as SGLang does (the CUDA-core decode kernel is the likely reason the 0.6B RL
    # rollout ran 7% slower with FP8 KV than with bf16 on 2026-12-06, before this existed; not measured yet), off for
    # bf16 / fp16 caches (SGLang also turns it on for GQA groups of 4 or more; not measured here)
    shared_prefix_decode: bool = False  # decode requests that share a cached prefix (GRPO's samples of one prompt)
    # read it once per chunk of up to 8 of them instead of once each (attention/shared_prefix.py; triton and
    # flashinfer backends); off by default: on an H100 it made W1's GRPO batch 5.9% faster in the engine alone and the
    # RL step no faster (docs/benchmarks.md), not yet profiled
    cuda_graph_max_bs: int = 256  # decode batches up to this size replay CUDA graphs (padded to a captured size)
    disable_cuda_graph: bool = False  # run every step eagerly (graphs are only ever used on CUDA)
    disable_memory_saver: bool = False  # CUDA: KV pool in ordinary allocations, decode graphs recaptured on resume
    # default: the KV pool is virtual memory whose physical pages release_memory gives back and resume_memory maps
    # again at the same addresses, so the decode graphs survive a release (no recapture)
    disable_overlap_schedule: bool = False  # read each step's sampled tokens before scheduling the next
    # (default: the host schedules and launches step k+1 while the device runs step k, and reads k's tokens after)
    tp_size: int = 1  # tensor-parallel ranks: rank 0 in the Engine's process, the others in worker processes
    base_gpu_id: int = 0  # with device "cuda", tp rank r runs on cuda:(base_gpu_id + r); "cuda:N" starts at N
    ep_size: int = 1  # MoE models: expert parallelism inside the tp group (SGLang's --ep-size), a divisor of
    # tp_size; the tp ranks form ep_size groups, each holding num_experts / ep_size whole experts (their width split
    # over the group's tp_size / ep_size ranks) instead of a 1/tp_size slice of every expert; 1: experts sliced by tp
    random_seed: int = 0  # seeds the sampling of requests that set no seed of their own
    served_model_name: str | None = None  # the name /v1/models reports; None: the folder name
    weight_dtype: str = field(default="auto", metadata={"flag": "rollout-dtype"})  # "auto": linears in `dtype`;
    # "fp8": every linear (qkv, o, gate_up, down) held as e4m3 with a float32 scale per fp8_block_size^2 block,
    # activations quantised per token and fp8_block_size group (docs/engine.md "FP8 rollout"); CUDA sm_89+ or CPU
    fp8_block_size: int = 128  # weight blocks are this square, activation groups this wide (16, 32, 64 or 128)
    fp8_lm_head: bool = False  # with weight_dtype "fp8": the (untied) LM head in FP8 too; default: kept in `dtype`
    fp8_kernel_configs: str | None = None  # with weight_dtype "fp8": a JSON of tuned FP8 kernels per linear shape
    # (benchmarks/fp8_linear.py --write-configs), used on the GPU model it names; None: the built-in choices
    kv_cache_dtype: str = "auto"  # "auto": the KV cache in `dtype`; "fp8_e4m3": e4m3 with a float32 scale per
    # (layer, kv head) derived from the weights, ~2x the tokens in the same memory (docs/engine.md "FP8 KV cache");
    # CUDA sm_89+ or CPU
    stall_timeout_s: float = 60.0  # health() is not ok (HTTP /health 503) once the scheduler has had work but
    # made no step for this many seconds (stuck in a step, e.g. a collective whose peer is gone)

    def __post_init__(self):
        from inference_engine.attention import available_backends

        if not Path(self.model_path, "config.json").is_file():
            raise ValueError(f"model_path {self.model_path!r} has no config.json; expected a local HF model folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; expected one of {DTYPES}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device {self.device!r} is not supported; expected 'cpu', 'cuda' or 'cuda:N'")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2 * self.page_size:
            raise ValueError(f"max_total_tokens {self.max_total_tokens} must hold at least two pages "
                             f"of page_size {self.page_size}")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        if self.prefix_sharing_min_tokens < 1:
            raise ValueError(f"prefix_sharing_min_tokens must be >= 1, got {self.prefix_sharing_min_tokens}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy {self.schedule_policy!r} is unknown; "
                             f"expected one of {SCHEDULE_POLICIES}")
        if self.attention_backend not in available_backends():
            raise ValueError(f"attention_backend {self.attention_backend!r} is unknown; "
                             f"expected one of {available_backends()}")
        if self.attention_backend == "flashinfer" and self.device == "cpu":
            raise ValueError("attention_backend 'flashinfer' needs device 'cuda'; on CPU use 'torch' or 'triton'")
        if self.attention_backend == "flashinfer" and self.dtype == "float32":
            raise ValueError("attention_backend 'flashinfer' supports dtype bfloat16 or float16, not float32")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention {self.decode_attention!r} is unknown; "
                             f"expected one of {DECODE_ATTENTION}")
        if self.decode_attention != "auto" and self.attention_backend != "flashinfer":
            raise ValueError(f"decode_attention {self.decode_attention!r} chooses among the flashinfer backend's "
                             f"decode kernels; attention_backend {self.attention_backend!r} takes only 'auto' "
                             "(the default)")
        if self.shared_prefix_decode and self.attention_backend not in ("triton", "flashinfer"):
            raise ValueError(f"shared_prefix_decode needs attention_backend 'triton' or 'flashinfer', got "
                             f"{self.attention_backend!r}")
        if self.decode_tensor_cores not in ("auto", "on", "off"):
            raise ValueError(f"decode_tensor_cores {self.decode_tensor_cores!r} is unknown; expected auto, on or off")
        if self.decode_attention_auto_max_bs < 1:
            raise ValueError(f"decode_attention_auto_max_bs must be >= 1, got {self.decode_attention_auto_max_bs}")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.ep_size != 1:
            self._check_ep()
        if self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if not (isinstance(self.stall_timeout_s, (int, float)) and self.stall_timeout_s > 0):
            raise ValueError(f"stall_timeout_s must be a number of seconds > 0, got {self.stall_timeout_s!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype (--rollout-dtype) {self.weight_dtype!r} is not supported; "
                             f"expected one of {WEIGHT_DTYPES}")
        if self.fp8_block_size not in (16, 32, 64, 128):
            raise ValueError(f"fp8_block_size {self.fp8_block_size!r} is not supported; expected 16, 32, 64 or 128")
        if self.fp8_lm_head and self.weight_dtype != "fp8":
            raise ValueError("fp8_lm_head applies to weight_dtype 'fp8' (--rollout-dtype fp8) only")
        if self.fp8_kernel_configs is not None:
            if self.weight_dtype != "fp8":
                raise ValueError("fp8_kernel_configs applies to weight_dtype 'fp8' (--rollout-dtype fp8) only")
            from inference_engine.models.fp8 import KernelTable

            KernelTable.load(self.fp8_kernel_configs)  # ValueError naming the file and what is wrong, before loading
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; expected one of "
                             f"{KV_CACHE_DTYPES}")
        if self.kv_cache_dtype != "auto":
            from inference_engine.attention import get_backend_class

            if not get_backend_class(self.attention_backend).supports_fp8_kv:
                raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r}: attention_backend "
                                 f"{self.attention_backend!r} cannot read an fp8 KV cache; use 'torch', 'triton' or "
                                 "'flashinfer'")
        if self.base_gpu_id and self.device != "cuda":
            raise ValueError(f"base_gpu_id {self.base_gpu_id} applies to device 'cuda' only, not {self.device!r} "
                             "(with 'cuda:N' the ranks start at N)")

    def _check_ep(self) -> None:
        """ep_size > 1: a mixture-of-experts model whose experts (and expert width) split over the ranks."""
        import json

        from kiln_common.model_spec import ModelSpec

        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise ValueError(f"ep_size must be an integer >= 1, got {self.ep_size!r}")
        if self.tp_size % self.ep_size:
            raise ValueError(f"ep_size {self.ep_size} must divide tp_size {self.tp_size}: experts are split over "
                             "the engine's tensor-parallel ranks (raise --tp-size or lower --ep-size)")
        spec = ModelSpec.from_hf_config(json.loads(Path(self.model_path, "config.json").read_text()))
        if not spec.num_experts:
            raise ValueError(f"ep_size {self.ep_size} needs a mixture-of-experts model; {self.model_path!r} is a "
                             f"dense {spec.family} model (use ep_size 1)")
        from inference_engine.parallel import check_ep_shape

        check_ep_shape(spec.num_experts, spec.moe_intermediate_size, self.tp_size, self.ep_size)

    @property
    def triton_decode_max_bs(self) -> int:
        """Decode batches of at most this many requests run the triton split-KV kernel (0: none, the backend's own)."""
        if self.attention_backend != "flashinfer":
            return 0
        return {"flashinfer": 0, "triton": self.max_running_requests,
                "auto": self.decode_attention_auto_max_bs}[self.decode_attention]

    @property
    def use_decode_tensor_cores(self) -> bool:
        """Whether the flashinfer backend's decode wrappers use its tensor-core kernels (see decode_tensor_cores)."""
        if self.decode_tensor_cores != "auto":
            return self.decode_tensor_cores == "on"
        return self.kv_cache_dtype != "auto"   # an e4m3 cache

    @property
    def fp8_layout(self):
        """The weight_sync.fp8.Fp8Layout of this engine's weights; None unless weight_dtype is "fp8"."""
        from weight_sync.fp8 import Fp8Layout

        return Fp8Layout(self.fp8_block_size, self.fp8_lm_head) if self.weight_dtype == "fp8" else None

    @property
    def torch_dtype(self):
        """The torch dtype of weights and activations (and of the KV cache unless kv_cache_dtype says otherwise)."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def kv_torch_dtype(self):
        """The torch dtype the KV cache stores: `torch_dtype`, or float8_e4m3fn with kv_cache_dtype "fp8_e4m3"."""
        from inference_engine.kv_cache import KV_CACHE_DTYPES as STORAGE

        return STORAGE.get(self.kv_cache_dtype, self.torch_dtype)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all fields, for CLI generation and keyword validation."""
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class ServerConfig:
    """The HTTP server's own settings (`python -m inference_engine.serve`; `create_app(engine, config)`)."""

    host: str = "127.0.0.1"  # bind address; loopback unless said otherwise
    port: int = 30000  # TCP port of the HTTP server
    api_key: str | None = None  # Bearer token required on every route but /health (also env KILN_API_KEY)
    enable_admin_routes: bool = False  # serve the routes that change the engine's weights or state without an
    # api_key (with one they are always on): weight updates, groups, pause / continue, release / resume, flush,
    # abort-all
    max_request_bytes: int = 16 << 20  # larger request bodies are refused (413) before they are read to the end
    max_n: int = 64  # largest n (samples per prompt) one request may ask for
    disconnect_poll_s: float = 0.25  # a non-streaming request checks this often whether its client left (abort)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and (len(self.api_key) < 8 or any(c.isspace() for c in self.api_key)):
            raise ValueError("api_key must be at least 8 characters without whitespace (e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if not self.disconnect_poll_s > 0:
            raise ValueError(f"disconnect_poll_s must be > 0, got {self.disconnect_poll_s}")

    @property
    def admin_routes(self) -> bool:
        """Whether the admin routes are served: with an api_key, or when enabled explicitly."""
        return self.api_key is not None or self.enable_admin_routes
