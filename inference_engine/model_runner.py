"""ModelRunner: owns the model, the KV pool and the attention backend; runs one ForwardBatch.

With tp_size > 1 the Engine's runner is tp rank 0: it starts the worker processes of ranks
1..tp-1 (`tp_worker.TPWorkers`) and sends them every model operation before running it itself,
so each rank computes the same batch on its own shard of the weights and of the KV heads.
"""

from __future__ import annotations

import gc
import logging
from typing import Iterable

import torch

from inference_engine import ops
from inference_engine.attention import get_backend_class
from inference_engine.config import EngineConfig
from inference_engine.cuda_graph import CudaGraphRunner, ForwardOutput
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kv_cache import KVPool, ReqToTokenPool, is_fp8, kv_slots_for_memory
from inference_engine.models import CausalLM, fp8, named_hf_tensors, read_spec
from inference_engine.models.kv_scales import compute_kv_scales, layers_touched
from inference_engine.models.loader import WeightPlan, expected_hf_names, iter_safetensors
from inference_engine.models.moe import routed_experts_dtype, stacked_expert_names
from inference_engine.parallel import TPGroup, check_tp_shape, rank_device
from inference_engine.tp_worker import TPWorkers
from inference_engine.vmm import ParamStore

log = logging.getLogger(__name__)
CPU_DEFAULT_KV_TOKENS = 16384


def check_fp8_kv_device(device: torch.device) -> None:
    """ValueError unless an fp8 KV cache works on device: any CPU (dequantised in torch), CUDA of compute capability
    8.9 or later with triton (the store kernel converts to e4m3)."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or not ops.runs_triton(device) or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"kv_cache_dtype 'fp8_e4m3' needs a CUDA GPU of compute capability 8.9 or later with triton "
                         f"(or device 'cpu'); {device} is not one")


class ModelRunner:
    """Builds the model (this tp rank's shard) from a local HF folder and executes batches on the rank's device.

    `tp` is given on worker ranks; on rank 0 (tp=None) a tp_size > 1 starts the workers and the group.
    """

    def __init__(self, config: EngineConfig, tp: TPGroup | None = None):
        self.config = config
        self.spec = read_spec(config.model_path)
        self.tp_rank = 0 if tp is None else tp.rank
        self.device = (torch.device(config.device) if config.tp_size == 1
                       else rank_device(config.device, config.base_gpu_id, self.tp_rank))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available")
        if self.device.type == "cuda" and self.device.index is not None and \
                self.device.index + config.tp_size - self.tp_rank > torch.cuda.device_count():
            raise ValueError(f"tp_size {config.tp_size} from {self.device} needs GPUs up to "
                             f"cuda:{self.device.index + config.tp_size - self.tp_rank - 1}; "
                             f"{torch.cuda.device_count()} are visible")
        check_tp_shape(self.spec.num_heads, self.spec.num_kv_heads, config.tp_size)
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_torch_dtype
        if is_fp8(self.kv_dtype):
            check_fp8_kv_device(self.device)
        self.kv_pool: KVPool | None = None
        self.param_store: ParamStore | None = None  # the weights in one releasable buffer, from their first release
        self.unfilled: set[str] = set()  # HF names not loaded since the weights were discarded (rank 0 tracks)
        self.context_length = config.context_length or self.spec.max_position_embeddings
        if self.context_length > self.spec.max_position_embeddings:
            raise ValueError(f"context_length {self.context_length} exceeds the model's max_position_embeddings "
                             f"{self.spec.max_position_embeddings}")
        self.workers: TPWorkers | None = None  # rank 0 of tp_size > 1 only
        self._read_stream: torch.cuda.Stream | None = None  # routed-experts reads beside the step in flight
        if tp is None and config.tp_size > 1:
            self.workers = TPWorkers(config)
            tp = self.workers.group
        self.tp = tp
        try:
            self._build(config)
        except BaseException:
            if self.workers is not None:  # they may be blocked in a collective of the failed build: no stop command
                self.workers.shutdown(graceful=False)
            raise

    def _build(self, config: EngineConfig) -> None:
        if self.device.type == "cuda":  # an engine dropped before this one (its runner, pool and scheduler hold one
            gc.collect()                # another in reference cycles) returns its memory before the weights load
            torch.cuda.empty_cache()    # and the KV pool is sized from what is free
        with torch.device(self.device):
            self.model = CausalLM(self.spec, self.tp, config.ep_size)
        for p in self.model.parameters():  # buffers (RoPE tables) stay float32
            p.data = p.data.to(self.dtype)
        if config.fp8_layout is not None:
            fp8.check_device(self.device)
            kernels = fp8.KernelTable.load(config.fp8_kernel_configs) if config.fp8_kernel_configs else None
            fp8.convert(self.model, config.fp8_layout, kernels)
        self.weight_plan = WeightPlan(self.model)  # name -> parameter slice, resolved once for every later load
        self._load_checkpoint(config.model_path)
        if config.fp8_layout is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # quantisation scratch and the bf16 weights freed before the KV pool is sized
        attn = self.model.model.layers[0].self_attn  # this rank's heads
        num_slots = self._kv_slots(attn.num_kv_heads)
        if self.tp is not None:  # every rank's pool must hold the slots rank 0 hands out
            num_slots = self.tp.min_int(num_slots)
        routed = ((self.spec.num_moe_layers, self.spec.num_experts_per_tok, routed_experts_dtype(self.spec.num_experts))
                  if self.spec.num_moe_layers else None)
        self.kv_pool = KVPool(num_slots, config.page_size, self.spec.num_layers, attn.num_kv_heads,
                              self.spec.head_dim, self.kv_dtype, self.device, routed,
                              use_vmm=not config.disable_memory_saver)
        self._refresh_kv_scales(list(range(self.spec.num_layers)))
        if self.kv_pool.capacity < -(-self.context_length // config.page_size) * config.page_size:
            raise ValueError(f"KV pool of {self.kv_pool.capacity} tokens cannot hold one request of context_length "
                             f"{self.context_length}; raise max_total_tokens or lower context_length")
        self.req_to_token = ReqToTokenPool(config.max_running_requests, self.context_length + config.page_size,
                                           self.device)
        self.attn_backend = get_backend_class(config.attention_backend)(
            attn.num_heads, attn.num_kv_heads, self.spec.head_dim, self.device,
            page_size=config.page_size, dtype=self.dtype, triton_decode_max_bs=config.triton_decode_max_bs,
            decode_tensor_cores=config.use_decode_tensor_cores, shared_prefix_decode=config.shared_prefix_decode)
        self.graph_runner: CudaGraphRunner | None = None
        self.capture_cuda_graphs()
        if self.tp is not None:  # ranks that differ here would issue different collectives for one batch and hang
            self.tp.check_same("KV pool tokens, context length and decode graph batch sizes",
                               (self.kv_pool.capacity, self.context_length,
                                None if self.graph_runner is None else self.graph_runner.batch_sizes))
        log.info("model %s (%s) on %s %s, tp rank %d of %d%s: KV pool %d tokens (%.1f MiB, %s), page %d, context %d",
                 config.model_path, self.spec.family, self.device, config.dtype, self.tp_rank, config.tp_size,
                 f" (ep {config.ep_size})" if config.ep_size > 1 else "",
                 self.kv_pool.capacity, self.kv_pool.bytes / 2**20,
                 "fp8 e4m3, per-head scales" if self.kv_pool.quantized else config.dtype, config.page_size,
                 self.context_length)

    def _kv_slots(self, num_kv_heads: int) -> int:
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens + self.config.page_size  # + the padding page
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_TOKENS
        free, _ = torch.cuda.mem_get_info(self.device)
        return kv_slots_for_memory(free, self.config.mem_fraction_static, self.spec.num_layers, num_kv_heads,
                                   self.spec.head_dim, self.kv_dtype)

    def _refresh_kv_scales(self, layer_ids: list[int]) -> None:
        """Recompute the fp8 KV scales of these layers from their weights (nothing for an unscaled cache)."""
        if layer_ids and self.kv_pool is not None and self.kv_pool.quantized:
            self.kv_pool.set_scales(layer_ids, *compute_kv_scales(self.model, layer_ids))

    def tell_workers(self, name: str, *args) -> None:
        """Have the tp workers run operation `name` (see tp_worker); nothing with one rank or on a worker."""
        if self.workers is not None:
            self.workers.command(name, *args)

    def load_checkpoint(self, model_path: str) -> None:
        """Load every tensor of a HF folder whose config matches this model (every rank reads its shard).

        A missing weight raises ValueError."""
        spec = read_spec(model_path)
        if spec != self.spec:
            raise ValueError(f"model at {model_path!r} does not match the running model: {spec} vs {self.spec}")
        self.tell_workers("load_checkpoint", model_path)
        self._load_checkpoint(model_path)

    def _load_checkpoint(self, model_path: str) -> None:
        loaded = self._per_expert_names(self.load_weights_local(iter_safetensors(model_path)))
        missing = sorted(expected_hf_names(self.model) - loaded)
        if missing:
            raise ValueError(f"checkpoint {model_path!r} lacks {len(missing)} weight(s), e.g. {missing[:3]}")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load full HF-named tensors into their parameter slices (sent to every tp rank); returns names loaded."""
        if self.workers is not None:
            named_tensors = list(named_tensors)
            self.weight_plan.check(named_tensors)  # a bad name raises before any rank loads anything
            self.workers.send_weights(named_tensors)
        return self.load_weights_local(named_tensors)

    def load_weights_local(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load this rank's shard of full HF-named tensors (each rank got them on its own); returns names loaded.

        An fp8 KV cache's scales follow the weights they are derived from (every update also drops all KV)."""
        names = self.weight_plan.load(named_tensors)
        self._refresh_kv_scales(layers_touched(names, self.spec.num_layers))
        if self.unfilled:
            self.unfilled -= self._per_expert_names(names)
        return names

    def _per_expert_names(self, names: list[str]) -> set[str]:
        """Loaded HF names with each stacked expert tensor as the per-expert names it covers (`expected_hf_names`'
        terms)."""
        return {name for stacked in names for name in stacked_expert_names(stacked, self.spec.num_experts)}

    def routed_experts(self, slots: list[int], forward_done: bool = True) -> torch.Tensor:
        """The experts recorded for the tokens in these KV slots, [len(slots), moe layers, top_k], on the host.

        forward_done: the steps that forwarded these tokens have completed (their tokens were read back), so on
        CUDA the read runs on a side stream and does not wait for the step in flight (overlap scheduling), which
        writes other slots only; else it waits for the device like any read."""
        buffer = self.kv_pool.routed_experts
        if buffer is None:
            raise ValueError(f"routed experts were asked for, but {self.config.model_path!r} is a dense "
                             f"{self.spec.family} model (no mixture-of-experts layers)")
        index = torch.tensor(slots, dtype=torch.int64)
        if self.device.type != "cuda" or not forward_done:
            return buffer[index.to(self.device)].cpu()
        if self._read_stream is None:
            self._read_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._read_stream):
            return buffer[index.to(self.device)].cpu()

    def named_hf_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Engine weights under HF names, unfused (views with one rank; full tensors gathered from every tp rank)."""
        self.tell_workers("named_hf_tensors")
        return list(named_hf_tensors(self.model, self.tp))

    def forward(self, fb: ForwardBatch) -> ForwardOutput:
        """Hidden states [T, hidden] of the batch (KV of its tokens written to the pool), on every tp rank.

        A decode batch run by a CUDA graph also comes with every row's logits and greedy pick."""
        if self.workers is not None:
            self.workers.send_batch(fb)
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.replay(fb)
        self.attn_backend.init_forward_metadata(fb)
        return ForwardOutput(self.model(fb))

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs (CUDA only, unless disable_cuda_graph); they hold the weight and KV addresses."""
        self.graph_runner = None
        if self.device.type != "cuda" or self.config.disable_cuda_graph:
            return
        max_bs = min(self.config.cuda_graph_max_bs, self.config.max_running_requests)
        self.graph_runner = CudaGraphRunner(self.model, self.attn_backend, self.kv_pool, max_bs, self.context_length,
                                            self.device)

    def release_memory(self, weights: bool, keep_weights: bool = True) -> None:
        """Free the KV pool (and with weights=True the weights' device memory), on every tp rank.

        The weights live in one `ParamStore` from their first release on: their contents go to pinned host memory
        (`keep_weights`) or are discarded (the caller loads every weight before generating again: the RL loop's
        push). Decode graphs are kept when what is released comes back at the same addresses (CUDA virtual memory,
        `KVPool.stable_addresses`, `ParamStore.stable`); otherwise they are freed and captured again on resume.
        The first weights release moves the parameters (one copy on the device) and so captures once more.
        """
        self.tell_workers("release_memory", weights, keep_weights)
        moving = weights and self.param_store is None   # the graphs hold the parameters' addresses from before
        if moving or not self.kv_pool.stable_addresses or (weights and not self.param_store.stable):
            self.drop_cuda_graphs()
        self.kv_pool.clear()
        self.kv_pool.free_buffers()
        if moving:   # after the KV pool is gone: the move needs room for a second copy of the weights
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.param_store = ParamStore(list(self.model.parameters()), self.device,
                                          use_vmm=not self.config.disable_memory_saver)
        if weights:
            if not keep_weights and not self.param_store.released:
                self.unfilled = expected_hf_names(self.model)
            self.param_store.release(keep=keep_weights)
            if moving or not self.param_store.stable:   # the plan's views point at storage that moved or is freed
                self.weight_plan = WeightPlan(self.model)   # (they would also keep a freed buffer alive); it
                # resolves its views again at the next load, after resume_memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, weights: bool, kv_cache: bool) -> None:
        """Take the weights' memory back (if released; their kept contents or zeros), then the KV pool, on every tp
        rank; the decode graphs are captured again once both are back, if they were freed."""
        self.tell_workers("resume_memory", weights, kv_cache)
        if weights:
            self.param_store.resume()
        if kv_cache:
            self.kv_pool.allocate_buffers()
        if self.graph_runner is None and self.kv_pool.k_buffer and not self.weights_released:
            self.capture_cuda_graphs()

    @property
    def weights_released(self) -> bool:
        return self.param_store is not None and self.param_store.released

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden rows [N, hidden] (each tp rank computes its vocabulary share)."""
        if self.workers is not None:
            self.workers.send_hidden(hidden)
        return self.model.logits(hidden)

    def check_alive(self) -> None:
        """Raise RuntimeError if a tp worker process has exited (rank 0 of tp_size > 1; nothing otherwise)."""
        if self.workers is not None:
            self.workers.check_alive()

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the tp workers (rank 0 of tp_size > 1; nothing otherwise); graceful=False kills them at once."""
        workers, self.workers = self.workers, None
        if workers is not None:
            self.drop_cuda_graphs()  # graphs hold NCCL work: tearing down the communicator under them hangs
            workers.shutdown(graceful)

    def drop_cuda_graphs(self) -> None:
        """Free the captured decode graphs (and their NCCL work) once the device has finished with them.

        Each graph is reset explicitly: a graph executable that is still alive holds the communicator's
        resources, and NCCL's teardown then never returns (pytorch/pytorch#115388).
        """
        runner, self.graph_runner = self.graph_runner, None
        if runner is not None and runner.graphs:
            torch.cuda.synchronize(self.device)
            for graph in runner.graphs.values():
                graph.reset()
            runner.graphs.clear()
