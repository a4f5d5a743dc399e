"""AdamW with data-parallel gradient reduction, global grad-norm clipping and the LR schedule.

Two optimizers with one interface (`build_optimizer` picks): `PolicyOptimizer` replicates the fp32
state on every DP rank; `ShardedOptimizer` (ZeRO-1, `use_distributed_optimizer`) shards it over DP
and can keep it in pinned host memory (`optimizer_cpu_offload`).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import TrainerConfig

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine decay."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.lr_warmup_steps) / cfg.lr_decay_steps)
    if cfg.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


class PolicyOptimizer:
    """AdamW over this rank's parameter shards; grads summed over DP, norm taken over TP and PP.

    With pipeline stages and tied embeddings the first stage's embedding and the last stage's
    output-layer copy are one weight: their gradients are summed over `embedding_group` so both
    copies take the same step, and the norm counts the weight once (on the first stage).

    With fp32 parameters (CPU, or GPU with bf16=False) AdamW updates them directly. With bf16
    parameters each one has an fp32 master copy: every micro-batch's bf16 gradient is added into the
    master's fp32 `.grad` as soon as autograd has it (and the bf16 one dropped), AdamW updates the
    masters, and the bf16 parameters are refreshed from them.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, *, dp_group, tp_group, tp_rank: int,
                 pp_group=None, embedding_group=None):
        self.cfg = cfg
        self.dp_group, self.tp_group, self.tp_rank = dp_group, tp_group, tp_rank
        self.pp_group, self.embedding_group = pp_group, embedding_group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        # fp32 tensors AdamW steps: the parameters themselves, or their master copies
        self.params = [p.detach().float().clone() for p in self.model_params] if self.mixed else self.model_params
        if self.mixed:
            for p, main in zip(self.model_params, self.params):
                p.register_post_accumulate_grad_hook(self._accumulate_into(main))
        self.sharded = [getattr(p, "tensor_model_parallel", False) for p in self.model_params]
        # megatron marks both copies of a tied embedding split over pipeline stages `shared_embedding`,
        # and the last stage's copy `shared` as well
        self.tied = [main for p, main in zip(self.model_params, self.params) if getattr(p, "shared_embedding", False)]
        self.counted = [not getattr(p, "shared", False) for p in self.model_params]
        # expert weights under expert parallelism (megatron marks them allreduce=False) differ per EP rank:
        # their grads are summed over the expert-data-parallel group and their norms over the EP group
        self.expert = [not getattr(p, "allreduce", True) for p in self.model_params]
        self.expert_dp_group = self.ep_group = None
        if any(self.expert):
            from megatron.core import parallel_state

            self.expert_dp_group = parallel_state.get_expert_data_parallel_group()
            self.ep_group = parallel_state.get_expert_model_parallel_group()
        if self.tied and embedding_group is None:
            raise ValueError("tied embeddings split over pipeline stages need the embedding group (first and last "
                             "stage) to sum their gradients; got embedding_group=None")
        # q/k norms are replicated but each TP rank only sees its own heads: their grads are partial sums.
        self.tp_partial = [main for (n, _), main in zip(named, self.params) if "q_layernorm" in n or "k_layernorm" in n]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, cfg), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            fused=True if self.params[0].is_cuda else None)
        self.step_count = 0

    @staticmethod
    def _accumulate_into(main: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            if main.grad is None:
                main.grad = param.grad.float()
            else:
                main.grad.add_(param.grad)
            param.grad = None

        return hook

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        for p in self.model_params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients, a 0-d device tensor (each TP shard, stage and tied weight counted once)."""
        grads = [p.grad for p, sharded, counted, expert in zip(self.params, self.sharded, self.counted, self.expert)
                 if p.grad is not None and counted and (sharded or self.tp_rank == 0) and not expert]
        sq = (torch.stack(torch._foreach_norm(grads)).square().sum() if grads
              else torch.zeros((), dtype=torch.float32, device=self.params[0].device))
        if self.ep_group is not None:  # each expert-parallel rank's own experts
            experts = [p.grad for p, expert in zip(self.params, self.expert) if expert and p.grad is not None]
            expert_sq = torch.stack(torch._foreach_norm(experts)).square().sum() if experts else torch.zeros_like(sq)
            dist.all_reduce(expert_sq, group=self.ep_group)
            sq = sq + expert_sq
        for group in (self.tp_group, self.pp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        return sq.sqrt()

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (TP shards counted once, replicated params once, every stage)."""
        return float(self._grad_norm())

    def step(self) -> tuple[float, float]:
        """Reduce grads over TP (partial ones), tied stages and DP, clip, apply AdamW at this step's LR.

        Returns (grad_norm, lr).
        """
        for p in self.params:
            if p.grad is None:  # a rank without samples in this batch still joins the reduction
                p.grad = torch.zeros_like(p)
        if dist.get_world_size(self.tp_group) > 1:
            for p in self.tp_partial:
                dist.all_reduce(p.grad, group=self.tp_group)
        for p in self.tied:
            dist.all_reduce(p.grad, group=self.embedding_group)
        if dist.get_world_size(self.dp_group) > 1:
            for p, expert in zip(self.params, self.expert):
                dist.all_reduce(p.grad, group=self.expert_dp_group if expert else self.dp_group)
        norm = self._grad_norm()
        if self.cfg.clip_grad > 0:  # scale min(1, clip / norm) on the device: no host sync before AdamW
            torch._foreach_mul_([p.grad for p in self.params], (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.model_params, self.params)  # bf16 <- fp32 masters, one call
        self.step_count += 1
        return float(norm), lr

    def move(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace master weights, their grads and AdamW state by `move(tensor)` (offload / onload)."""
        if self.mixed:
            for main in self.params:
                main.data = move(main.data)
                if main.grad is not None:
                    main.grad = move(main.grad)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = move(value)

    def state_dict(self) -> dict:
        """AdamW state, the step counter and (bf16 parameters) the fp32 master weights."""
        state = {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}
        if self.mixed:
            state["master_weights"] = [p.detach().cpu() for p in self.params]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        if state.get("sharded"):
            raise ValueError("checkpoint holds a sharded optimizer state (use_distributed_optimizer); resume with "
                             "--use-distributed-optimizer")
        if self.mixed != ("master_weights" in state):
            raise ValueError(f"checkpoint has{'' if 'master_weights' in state else ' no'} fp32 master weights but "
                             f"this run's parameters are {'bf16' if self.mixed else 'fp32'}; resume with the same bf16 "
                             "setting")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]
        if self.mixed:
            with torch.no_grad():
                for p, main, saved in zip(self.model_params, self.params, state["master_weights"]):
                    main.copy_(saved)
                    p.copy_(saved)


# ----------------------------------------------------------------------------------------------
# ZeRO-1: fp32 master weights and AdamW moments sharded over the data-parallel group
# ----------------------------------------------------------------------------------------------

DEFAULT_BUCKET_NUMEL = 1 << 25  # elements per rank per bucket (128 MiB of fp32): the unit of communication and offload


@dataclass(frozen=True)
class ShardLayout:
    """How a flat vector of `numel` elements is cut into buckets and each bucket split evenly over `dp_size` ranks.

    Bucket k covers global elements [start_k, start_k + dp_size * size_k); rank r owns
    [start_k + r * size_k, start_k + (r + 1) * size_k) of it, so a bucket is one contiguous
    reduce-scatter input and one contiguous all-gather output. Every bucket holds `bucket_numel`
    elements per rank except the last, which is just large enough (fewer than `dp_size` padding
    elements at the end). A rank's shard is its slices of all buckets, back to back.
    """

    numel: int
    dp_size: int
    bucket_numel: int = DEFAULT_BUCKET_NUMEL

    @functools.cached_property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        """(global start, elements per rank) of each bucket."""
        out, start = [], 0
        while start < self.numel:
            size = min(self.bucket_numel, -(-(self.numel - start) // self.dp_size))
            out.append((start, size))
            start += size * self.dp_size
        return tuple(out)

    @property
    def shard_numel(self) -> int:
        """Elements of each rank's shard (padding included)."""
        return sum(size for _, size in self.buckets)

    def ranges(self, rank: int) -> list[tuple[int, int, int]]:
        """(global start, shard start, length) of `rank`'s slice of each bucket, padding included."""
        out, shard = [], 0
        for start, size in self.buckets:
            out.append((start + rank * size, shard, size))
            shard += size
        return out

    def to_dict(self) -> dict[str, int]:
        return {"numel": self.numel, "dp_size": self.dp_size, "bucket_numel": self.bucket_numel}


def copy_between_layouts(src: torch.Tensor, src_layout: ShardLayout, src_rank: int,
                         dst: torch.Tensor, dst_layout: ShardLayout, dst_rank: int) -> int:
    """Copy the elements `src` (rank `src_rank`'s shard in `src_layout`) and `dst` have in common; returns how many.

    Used to reshard a checkpoint when the DP size (or bucket size) changes: every new rank copies from
    each old rank's shard the real (non-padding) elements it now owns.
    """
    if src_layout.numel != dst_layout.numel:
        raise ValueError(f"sharded optimizer state of {src_layout.numel} elements cannot fill a model shard of "
                         f"{dst_layout.numel}; the checkpoint was saved for another model or TP/PP layout")
    copied = 0
    theirs = src_layout.ranges(src_rank)
    i = 0
    for g_dst, s_dst, n_dst in dst_layout.ranges(dst_rank):
        end_dst = min(g_dst + n_dst, dst_layout.numel)
        while i < len(theirs) and theirs[i][0] + theirs[i][2] <= g_dst:
            i += 1
        j = i
        while j < len(theirs) and theirs[j][0] < end_dst:
            g_src, s_src, n_src = theirs[j]
            lo, hi = max(g_dst, g_src), min(end_dst, g_src + n_src, src_layout.numel)
            if hi > lo:
                dst[s_dst + lo - g_dst:s_dst + hi - g_dst].copy_(src[s_src + lo - g_src:s_src + hi - g_src])
                copied += hi - lo
            j += 1
    return copied


def _segments(bounds: list[int], start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Pieces of global range [start, end) per parameter: (param index, param offset, range offset, length).

    `bounds` are the parameters' global starts plus the total, ascending.
    """
    out = []
    index = max(0, bisect.bisect_right(bounds, start) - 1)
    while index < len(bounds) - 1 and bounds[index] < end:
        lo, hi = max(start, bounds[index]), min(end, bounds[index + 1])
        if hi > lo:
            out.append((index, lo - bounds[index], lo - start, hi - lo))
        index += 1
    return out


def _pin_in_place(t: torch.Tensor) -> bool:
    """Page-lock `t`'s host memory where it is (cudaHostRegister), so device copies of it run asynchronously.

    Not `pin_memory=True`: PyTorch's pinned allocator rounds every block up to a power of two (a 30.5 GiB
    state would take 32 GiB). If the driver refuses (locked-memory limit), `t` stays pageable, with a warning.
    """
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if code != 0:
        if hasattr(cudart, "cudaGetLastError"):
            cudart.cudaGetLastError()  # not to be reported by the next kernel launch check
        logger.warning("optimizer_cpu_offload: page-locking %.1f GiB of host memory failed (cudaError %d); the "
                       "optimizer state stays pageable (slower copies)", t.numel() * t.element_size() / 2**30, code)
    return code == 0


def _unpin(tensors: list[torch.Tensor]) -> None:
    """Undo `_pin_in_place` (before the memory goes back to the system)."""
    for t in tensors:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def _adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
            step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW update of flat fp32 tensors in place (torch.optim.AdamW's arithmetic; weight decay applied before)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class ShardedOptimizer:
    """ZeRO-1 AdamW (`use_distributed_optimizer`): each DP rank keeps 1/DP of the fp32 masters and moments.

    Kiln's own, over one flat fp32 gradient buffer in parameter order (not megatron-core's
    DistributedOptimizer: that needs megatron's DDP wrapper and CUDA, and Kiln's trainer runs the
    same code on CPU/gloo; see docs/trainer.md). A step:
    1. every micro-batch's gradient is added into the flat buffer by a post-accumulate hook;
    2. partial q/k-norm grads are summed over TP, tied embedding copies over the embedding group
       (full-size, as in `PolicyOptimizer`);
    3. bucket by bucket, the buffer is reduce-scattered (summed) over DP in place: each rank then
       holds the summed gradient of its slice;
    4. the global norm is taken over the shards (summed over DP, TP, PP) and the shards clipped;
    5. bucket by bucket, AdamW updates the rank's master slice (with `cpu_offload` the slice's
       master and moments come from pinned host memory and go back after), the new values are
       cast to the parameter dtype and all-gathered over DP into the parameters.
    The gradient buffer exists from the first backward to the end of the step only.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, *, dp_group, tp_group, tp_rank: int,
                 pp_group=None, embedding_group=None, cpu_offload: bool = False,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        self.cfg = cfg
        self.dp_group, self.tp_group, self.tp_rank = dp_group, tp_group, tp_rank
        self.pp_group, self.embedding_group = pp_group, embedding_group
        self.cpu_offload = cpu_offload
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        dtypes = {p.dtype for p in self.model_params}
        if len(dtypes) != 1:
            raise ValueError(f"the sharded optimizer needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.param_dtype = dtypes.pop()
        self.device = self.model_params[0].device
        self.bounds = [0]
        for p in self.model_params:
            self.bounds.append(self.bounds[-1] + p.numel())
        self.layout = ShardLayout(self.bounds[-1], self.dp_size, bucket_numel)
        self.padded_numel = sum(size * self.dp_size for _, size in self.layout.buckets)
        if any(getattr(p, "shared_embedding", False) for p in self.model_params) and embedding_group is None:
            raise ValueError("tied embeddings split over pipeline stages need the embedding group (first and last "
                             "stage) to sum their gradients; got embedding_group=None")
        if any(not getattr(p, "allreduce", True) for p in self.model_params):
            from megatron.core import parallel_state

            if parallel_state.get_expert_model_parallel_world_size() > 1:
                raise ValueError("the sharded optimizer does not shard expert-parallel weights yet; drop "
                                 "--use-distributed-optimizer or use expert_model_parallel_size=1")
        self.tied = [i for i, p in enumerate(self.model_params) if getattr(p, "shared_embedding", False)]
        self.tp_partial = [i for i, (n, _) in enumerate(named) if "q_layernorm" in n or "k_layernorm" in n]
        counted = [not getattr(p, "shared", False) and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
                   for p in self.model_params]
        decay = [p.dim() >= 2 for p in self.model_params]  # norms and biases take no weight decay
        # this rank's slices: per bucket, the pieces (shard offset, length) to count in the norm / to decay
        self.my_ranges = self.layout.ranges(self.dp_rank)
        self._shard_starts = [s for _, s, _ in self.my_ranges]
        self.norm_pieces, self.decay_pieces = [], []
        for g, s, n in self.my_ranges:
            for index, _, off, length in _segments(self.bounds, g, g + n):
                if counted[index]:
                    self.norm_pieces.append((s + off, length))
                if decay[index]:
                    self.decay_pieces.append((s + off, length))
        host = cpu_offload and self.device.type == "cuda"
        state_device = torch.device("cpu") if cpu_offload else self.device

        pinned: list[torch.Tensor] = []

        def empty() -> torch.Tensor:
            t = torch.zeros(self.layout.shard_numel, dtype=torch.float32, device=state_device)
            if host and _pin_in_place(t):
                pinned.append(t)
            return t

        self.master, self.exp_avg, self.exp_avg_sq = empty(), empty(), empty()
        if pinned:  # unpinned before the memory is freed
            weakref.finalize(self, _unpin, pinned)
        with torch.no_grad():
            for g, s, n in self.my_ranges:
                for index, p_off, off, length in _segments(self.bounds, g, g + n):
                    self.master[s + off:s + off + length].copy_(
                        self.model_params[index].detach().view(-1)[p_off:p_off + length])
        self._streams: tuple | None = None  # offload on CUDA: (upload, download) copy streams
        self.grad_buffer: torch.Tensor | None = None  # [padded_numel] fp32 between the first backward and step()
        self._grad_views: list[torch.Tensor] = []
        for i, p in enumerate(self.model_params):
            p.register_post_accumulate_grad_hook(self._accumulate_into(i))
        self.step_count = 0

    # ------------------------------------------------------------------------------------------
    # gradients
    # ------------------------------------------------------------------------------------------

    def _ensure_grad_buffer(self) -> None:
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros(self.padded_numel, dtype=torch.float32, device=self.device)
            self._grad_views = [self.grad_buffer[a:b].view(p.shape)
                                for p, a, b in zip(self.model_params, self.bounds[:-1], self.bounds[1:])]

    def _accumulate_into(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._ensure_grad_buffer()
            self._grad_views[index].add_(param.grad)
            param.grad = None

        return hook

    def zero_grad(self) -> None:
        """Drop accumulated gradients (the buffer is freed; the next backward allocates it)."""
        for p in self.model_params:
            p.grad = None
        self.grad_buffer, self._grad_views = None, []

    def _shard_grad(self, bucket: int) -> torch.Tensor:
        """This rank's slice of bucket `bucket` in the gradient buffer (after the reduce-scatter: its summed grad)."""
        g, _, n = self.my_ranges[bucket]
        return self.grad_buffer[g:g + n]

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients, a 0-d device tensor, from the shards (DP, TP, PP summed)."""
        views = [self._shard_view(s, length) for s, length in self.norm_pieces]
        sq = (torch.stack(torch._foreach_norm(views)).square().sum() if views
              else torch.zeros((), dtype=torch.float32, device=self.device))
        for group in (self.dp_group, self.tp_group, self.pp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        return sq.sqrt()

    def _shard_view(self, shard_offset: int, length: int) -> torch.Tensor:
        """The gradient buffer's elements at shard positions [shard_offset, +length) (within one bucket)."""
        bucket = bisect.bisect_right(self._shard_starts, shard_offset) - 1
        g, s, _ = self.my_ranges[bucket]
        return self.grad_buffer[g + shard_offset - s:g + shard_offset - s + length]

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------

    def step(self) -> tuple[float, float]:
        """Reduce grads (TP partial, tied, DP reduce-scatter), clip, AdamW on this rank's shard, all-gather params.

        Returns (grad_norm, lr).
        """
        self._ensure_grad_buffer()  # a rank without samples in this batch still joins the reductions
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            for i in self.tp_partial:
                dist.all_reduce(self._grad_views[i], group=self.tp_group)
        for i in self.tied:
            dist.all_reduce(self._grad_views[i], group=self.embedding_group)
        if self.dp_size > 1:
            for (start, size), (g, _, n) in zip(self.layout.buckets, self.my_ranges):
                dist.reduce_scatter_tensor(self.grad_buffer[g:g + n],
                                           self.grad_buffer[start:start + size * self.dp_size], group=self.dp_group)
        norm = self._grad_norm()
        if self.cfg.clip_grad > 0:  # scale min(1, clip / norm) on the device: no host sync before AdamW
            torch._foreach_mul_([self._shard_grad(k) for k in range(len(self.my_ranges))],
                                (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        lr = lr_at(self.step_count, self.cfg)
        self.step_count += 1
        self._update(lr)
        self.zero_grad()
        return float(norm), lr

    def _states(self, bucket: int) -> list[torch.Tensor]:
        """This rank's slices of bucket `bucket` in the master weights and both moments (where they live)."""
        _, s, n = self.my_ranges[bucket]
        return [t[s:s + n] for t in (self.master, self.exp_avg, self.exp_avg_sq)]

    def _update(self, lr: float) -> None:
        """AdamW bucket by bucket. Offloaded on CUDA: bucket k+1 goes up on one side stream while k is updated on
        the compute stream and k-1 comes down on another, so the copies both ways overlap the arithmetic."""
        buckets = range(len(self.layout.buckets))
        if not self.cpu_offload:
            for k in buckets:
                self._update_bucket(k, lr, self._states(k))
            return
        if self.device.type != "cuda":  # the same chunked path with plain copies (CPU tests)
            for k in buckets:
                work = [t.clone() for t in self._states(k)]
                self._update_bucket(k, lr, work)
                for host, dev in zip(self._states(k), work):
                    host.copy_(dev)
            return
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        up, down = self._streams
        compute = torch.cuda.current_stream(self.device)

        def upload(k: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
            with torch.cuda.stream(up):
                work = [t.to(self.device, non_blocking=True) for t in self._states(k)]
            return work, up.record_event()

        pending = upload(0)
        for k in buckets:
            work, ready = pending
            if k + 1 < len(buckets):
                pending = upload(k + 1)
            compute.wait_event(ready)
            for t in work:
                t.record_stream(compute)  # allocated on `up`, used here and on `down`
            self._update_bucket(k, lr, work)
            down.wait_event(compute.record_event())
            with torch.cuda.stream(down):
                for host, t in zip(self._states(k), work):
                    host.copy_(t, non_blocking=True)
                    t.record_stream(down)
        down.synchronize()  # the host copies have landed before anyone reads them

    def _update_bucket(self, bucket: int, lr: float, work: list[torch.Tensor]) -> None:
        """AdamW on `work` (this rank's master / moment slices of `bucket`), then the new values into the params."""
        cfg = self.cfg
        _, s, n = self.my_ranges[bucket]
        master, exp_avg, exp_avg_sq = work
        if cfg.weight_decay > 0:
            pieces = [master[o - s:o - s + length] for o, length in self.decay_pieces if s <= o < s + n]
            if pieces:
                torch._foreach_mul_(pieces, 1 - lr * cfg.weight_decay)
        _adamw_(master, self._shard_grad(bucket), exp_avg, exp_avg_sq, step=self.step_count, lr=lr,
                beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps)
        self._gather_into_params(bucket, master)

    @torch.no_grad()
    def _gather_into_params(self, bucket: int, master: torch.Tensor) -> None:
        """All-gather the bucket's new values over DP (in the parameter dtype) and copy them into the parameters."""
        start, size = self.layout.buckets[bucket]
        if self.dp_size > 1:
            full = torch.empty(size * self.dp_size, dtype=self.param_dtype, device=self.device)
            mine = full[self.dp_rank * size:(self.dp_rank + 1) * size]
            mine.copy_(master)
            dist.all_gather_into_tensor(full, mine, group=self.dp_group)
        else:
            full = master
        for index, p_off, off, length in _segments(self.bounds, start, start + size * self.dp_size):
            self.model_params[index].view(-1)[p_off:p_off + length].copy_(full[off:off + length])

    # ------------------------------------------------------------------------------------------
    # memory, offload, checkpoints
    # ------------------------------------------------------------------------------------------

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer: fp32 master + moments (device or host), the gradient buffer."""
        states = 3 * self.layout.shard_numel * 4
        return {"optimizer_states": states, "optimizer_states_on_host": states if self.cpu_offload else 0,
                "grad_buffer": self.padded_numel * 4}

    def move(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace master shard and moments by `move(tensor)` (colocated offload / onload); no-op when offloaded."""
        if self.cpu_offload:
            return
        self.master, self.exp_avg, self.exp_avg_sq = (move(t) for t in (self.master, self.exp_avg, self.exp_avg_sq))
        if self.grad_buffer is not None:
            self.grad_buffer = move(self.grad_buffer)
            self._grad_views = [self.grad_buffer[a:b].view(p.shape)
                                for p, a, b in zip(self.model_params, self.bounds[:-1], self.bounds[1:])]

    def state_dict(self) -> dict:
        """This rank's shard of the fp32 masters and moments, its layout and the step counter."""
        return {"sharded": True, "layout": self.layout.to_dict(), "dp_rank": self.dp_rank,
                "step_count": self.step_count,
                "master": self.master.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's `state_dict`, or {"sharded": True, "shards": [every saving DP rank's]} to reshard."""
        self.load_resharded(state["shards"] if "shards" in state else [state])

    def load_resharded(self, states: list[dict]) -> None:
        """Restore from the state dicts of every rank of the saving DP group (in DP order), whatever its size.

        With the same layout only this rank's own is read (a one-element list is taken as it).
        """
        if not all(s.get("sharded") for s in states):
            raise ValueError("checkpoint holds a replicated (non-sharded) optimizer state; resume without "
                             "--use-distributed-optimizer, or start the sharded run from the HF checkpoint")
        layouts = [ShardLayout(**s["layout"]) for s in states]
        if len(states) == 1 and layouts[0] == self.layout:
            sources = [(states[0], layouts[0], self.dp_rank)]
        else:
            if len(states) != layouts[0].dp_size:
                raise ValueError(f"resharding needs the states of all {layouts[0].dp_size} saving DP ranks, got "
                                 f"{len(states)}")
            sources = [(s, lay, s["dp_rank"]) for s, lay in zip(states, layouts)]
        with torch.no_grad():
            for key in ("master", "exp_avg", "exp_avg_sq"):
                target = getattr(self, key)
                copied = sum(copy_between_layouts(s[key], lay, r, target, self.layout, self.dp_rank)
                             for s, lay, r in sources)
                real = sum(max(0, min(g + n, self.layout.numel) - g) for g, _, n in self.my_ranges)
                if copied != real:
                    raise ValueError(f"sharded optimizer state covers {copied} of this rank's {real} elements")
        self.step_count = states[0]["step_count"]
        with torch.no_grad():
            for bucket in range(len(self.layout.buckets)):
                _, s, n = self.my_ranges[bucket]
                self._gather_into_params(bucket, self.master[s:s + n].to(self.device))


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig, *, dp_group, tp_group, tp_rank: int,
                    pp_group=None, embedding_group=None) -> PolicyOptimizer | ShardedOptimizer:
    """The optimizer `cfg` asks for: sharded over DP (`use_distributed_optimizer`, maybe offloaded), else replicated.

    Buckets hold `DEFAULT_BUCKET_NUMEL` elements per rank, read at call time (tests shrink it).
    """
    if cfg.use_distributed_optimizer:
        return ShardedOptimizer(model, cfg, dp_group=dp_group, tp_group=tp_group, tp_rank=tp_rank, pp_group=pp_group,
                                embedding_group=embedding_group, cpu_offload=cfg.optimizer_cpu_offload,
                                bucket_numel=DEFAULT_BUCKET_NUMEL)
    return PolicyOptimizer(model, cfg, dp_group=dp_group, tp_group=tp_group, tp_rank=tp_rank, pp_group=pp_group,
                           embedding_group=embedding_group)
