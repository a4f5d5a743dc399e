"""ModelRunner: owns the model, the KV pool and the attention backend; runs one ForwardBatch."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from inference_engine.attention import get_backend_class
from inference_engine.config import EngineConfig
from inference_engine.cuda_graph import CudaGraphRunner
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kv_cache import KVPool, ReqToTokenPool
from inference_engine.models import CausalLM, load_weights, named_hf_tensors, read_spec
from inference_engine.models.loader import expected_hf_names, iter_safetensors

log = logging.getLogger(__name__)
CPU_DEFAULT_KV_TOKENS = 16384


class ModelRunner:
    """Builds the model from a local HF folder and executes batches on the configured device."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available")
        self.dtype = config.torch_dtype
        self.spec = read_spec(config.model_path)
        self.context_length = config.context_length or self.spec.max_position_embeddings
        if self.context_length > self.spec.max_position_embeddings:
            raise ValueError(f"context_length {self.context_length} exceeds the model's max_position_embeddings "
                             f"{self.spec.max_position_embeddings}")
        with torch.device(self.device):
            self.model = CausalLM(self.spec)
        for p in self.model.parameters():  # buffers (RoPE tables) stay float32
            p.data = p.data.to(self.dtype)
        self.load_checkpoint(config.model_path)
        num_slots = self._kv_slots()
        self.kv_pool = KVPool(num_slots, config.page_size, self.spec.num_layers, self.spec.num_kv_heads,
                              self.spec.head_dim, self.dtype, self.device)
        if self.kv_pool.capacity < -(-self.context_length // config.page_size) * config.page_size:
            raise ValueError(f"KV pool of {self.kv_pool.capacity} tokens cannot hold one request of context_length "
                             f"{self.context_length}; raise max_total_tokens or lower context_length")
        self.req_to_token = ReqToTokenPool(config.max_running_requests, self.context_length + config.page_size,
                                           self.device)
        self.attn_backend = get_backend_class(config.attention_backend)(
            self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim, self.device,
            page_size=config.page_size, dtype=self.dtype)
        self.graph_runner: CudaGraphRunner | None = None
        self.capture_cuda_graphs()
        log.info("model %s (%s) on %s %s: KV pool %d tokens (%.1f MiB), page %d, context %d",
                 config.model_path, self.spec.family, self.device, config.dtype, self.kv_pool.capacity,
                 self.kv_pool.bytes / 2**20, config.page_size, self.context_length)

    def _kv_slots(self) -> int:
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens + self.config.page_size  # + the padding page
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = 2 * self.spec.num_layers * self.spec.num_kv_heads * self.spec.head_dim * self.dtype.itemsize
        return int(free * self.config.mem_fraction_static) // per_token

    def load_checkpoint(self, model_path: str) -> None:
        """Load every tensor of a HF folder whose config matches this model; a missing weight raises ValueError."""
        spec = read_spec(model_path)
        if spec != self.spec:
            raise ValueError(f"model at {model_path!r} does not match the running model: {spec} vs {self.spec}")
        loaded = set(self.load_weights(iter_safetensors(model_path)))
        missing = sorted(expected_hf_names(self.model) - loaded)
        if missing:
            raise ValueError(f"checkpoint {model_path!r} lacks {len(missing)} weight(s), e.g. {missing[:3]}")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load HF-named tensors through the per-layer weight loaders; returns names loaded."""
        return load_weights(self.model, named_tensors)

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Engine weights under HF names, unfused (views)."""
        return list(named_hf_tensors(self.model))

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of the batch (KV of its tokens written to the pool)."""
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.replay(fb)
        self.attn_backend.init_forward_metadata(fb)
        return self.model(fb)

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs (CUDA only, unless disable_cuda_graph); they hold the current weight and KV addresses."""
        self.graph_runner = None
        if self.device.type != "cuda" or self.config.disable_cuda_graph:
            return
        max_bs = min(self.config.cuda_graph_max_bs, self.config.max_running_requests)
        self.graph_runner = CudaGraphRunner(self.model, self.attn_backend, self.kv_pool, max_bs, self.context_length,
                                            self.device)

    def release_memory(self, weights: bool) -> None:
        """Free the KV pool and the graphs (and move weights to CPU when weights=True)."""
        self.graph_runner = None
        self.kv_pool.clear()
        self.kv_pool.free_buffers()
        if weights:
            self.model.to(torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, weights: bool, kv_cache: bool) -> None:
        """Bring weights back first (if they were released), then the KV pool, then recapture the graphs."""
        if weights:
            self.model.to(self.device)
        if kv_cache:
            self.kv_pool.allocate_buffers()
        self.capture_cuda_graphs()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden rows [N, hidden]."""
        return self.model.logits(hidden)
