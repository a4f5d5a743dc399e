"""Qwen3-MoE's sparse MLP block: a softmax top-k router and SwiGLU experts stored stacked (fused gate/up).

Parameters of `SparseMoE` (HF prefix `model.layers.{i}.mlp.`):
- `gate.weight` [E, hidden]: the router, replicated on every tp rank;
- `experts.gate_up_proj` [E / ep, 2 I / (tp / ep), hidden]: each of this rank's experts' gate rows then up rows
  (its share of I);
- `experts.down_proj` [E / ep, hidden, I / (tp / ep)]: their down projections (this rank's input columns).
The stacked names and layouts are transformers >= 5's Qwen3MoeExperts, so a full stacked tensor loads in one copy
(the fast path of a weight push); the per-expert HF names of transformers 4 checkpoints
(`mlp.experts.{e}.{gate,up,down}_proj.weight`) load into their expert's rows (`resolve_expert`). Tensor
parallelism shards moe_intermediate_size: each rank computes every token's experts on its I / tp columns and
the layer's output is all-reduced, like a dense MLP's row-parallel down projection. Expert parallelism
(`ep_size`, a divisor of tp_size, as SGLang's `--ep-size`) splits the experts instead: the tp ranks form ep
groups of tp / ep consecutive ranks, group g holds experts [g E / ep, (g + 1) E / ep) and shards their I over its
tp / ep ranks (ep = tp: whole experts). The router runs on every rank (the hidden states are replicated after
attention), each rank computes only the (token, expert) pairs of its own experts, and the same all-reduce sums
the partial outputs; a rank's weight targets take only its experts' tensors (the others are skipped).

FP8 rollout (`Experts.make_fp8`, called by `models.fp8.convert`): both stacks become float8_e4m3fn with a float32
scale per `block x block` block of each expert matrix (`weight_sync.fp8`), in `experts.gate_up_proj_scale_inv`
[n, 2 r / B, ceil(hidden / B)] and `experts.down_proj_scale_inv` [n, ceil(hidden / B), r / B], which load like the
weights in block units (HF names `mlp.experts.{e}.{gate,up,down}_proj.weight_scale_inv` and the stacked
`mlp.experts.{gate_up,down}_proj_scale_inv`); r must be a multiple of B. The router stays in the model dtype.

Each forward writes the experts it chose for every token into the KV pool's routed-experts buffer at the
token's slot (`KVPool.routed_experts` [slots, moe layers, top_k]), so a request can return the routing of all
its tokens, prefix-cache hits included (routing replay).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch
from torch import nn

from inference_engine import ops
from inference_engine.models.fp8 import reference_linear
from inference_engine.models.layers import WeightSlice, _check_shape, _rank_size, default_weight_loader
from inference_engine.parallel import check_ep_shape
from weight_sync.fp8 import quantize_weight

if TYPE_CHECKING:
    from inference_engine.forward_batch import ForwardBatch
    from inference_engine.parallel import TPGroup
    from kiln_common.model_spec import ModelSpec

# model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight (transformers 4 / per-expert checkpoints), or the
# FP8 scale of one (`.weight_scale_inv`)
_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?$")
SCALE_SUFFIX = "_scale_inv"  # weight_sync.fp8.SCALE_SUFFIX: an FP8 stack's scales are `<stack>_scale_inv`
_STACKED = ("gate_up_proj", "down_proj")  # the stacked parameters of an `Experts` module, named as in transformers 5
_STACK_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}  # expert_part -> parameter name


def routed_experts_dtype(num_experts: int) -> torch.dtype:
    """uint8 ids for up to 256 experts, else int16."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class _OwnExperts(WeightSlice):
    """Expert parallelism: this rank's experts [start, start + length) of a stacked HF tensor (dim 0), then, when
    `cut` = (dim, start, length) is set, their slice of I (of each half of dim 1 for gate_up: `pairs`)."""

    def __new__(cls, dst: torch.Tensor, first: int, count: int, pairs: bool = False,
                cut: tuple[int, int, int] | None = None):
        self = super().__new__(cls, dst, 0, first, count)
        self.pairs, self.cut = pairs, cut
        return self

    def source(self, loaded: torch.Tensor) -> torch.Tensor:
        own = loaded.narrow(0, self.start, self.length)
        if self.pairs:
            own = own.unflatten(1, (2, -1))  # [n, 2, I, hidden]: gate rows, up rows
        return own if self.cut is None else own.narrow(*self.cut)


class _PairSlice(WeightSlice):
    """A tp rank's gate rows and up rows of the stacked gate_up tensor [E, 2I, hidden], as one [E, 2, I/tp, hidden]
    view: rows [start, start + length) of each half of `dim` 1 (never the whole tensor, so the loader narrows)."""

    def source(self, loaded: torch.Tensor) -> torch.Tensor:
        return loaded.unflatten(1, (2, -1)).narrow(2, self.start, self.length)


class Experts(nn.Module):
    """This rank's SwiGLU experts stacked: gate_up_proj [n, 2 r, hidden], down_proj [n, hidden, r], where n =
    num_experts / ep_size experts from `first` on and r = intermediate_size / (tp_size / ep_size) columns of each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup | None,
                 ep_size: int = 1):
        super().__init__()
        self.tp_rank, self.tp_size = _rank_size(tp)
        check_ep_shape(num_experts, intermediate_size, self.tp_size, ep_size)
        self.ep_size, self.moe_tp_size = ep_size, self.tp_size // ep_size  # ranks per ep group share I
        self.ep_rank, self.moe_tp_rank = divmod(self.tp_rank, self.moe_tp_size)
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.local_experts = num_experts // ep_size
        self.first = self.ep_rank * self.local_experts  # this rank's experts: [first, first + local_experts)
        self.rows = intermediate_size // self.moe_tp_size  # this rank's share of I
        n = self.local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * self.rows, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden_size, self.rows), requires_grad=False)
        self.fp8_block = 0  # > 0: e4m3 stacks with block scales (make_fp8)
        for param, part in ((self.gate_up_proj, "gate_up"), (self.down_proj, "down")):
            self._loads(param, part, 1)

    def _loads(self, param: nn.Parameter, part: str, unit: int) -> None:
        """Make `param` (a stack of part "gate_up" / "down", in units of `unit` weight rows and columns: 1 for
        weights, the FP8 block for their scales) load and export through this module."""
        param.expert_part, param.expert_unit = part, unit
        param.weight_target, param.weight_loader = self.weight_target, self.weight_loader
        param.unshard, param.gather_hf = self.unshard, self.gather_hf

    def make_fp8(self, block: int, name: str = "experts") -> None:
        """Hold both stacks in e4m3 with a float32 scale per `block x block` block of each expert matrix (their
        current values quantised); ValueError naming the layer unless this rank's r columns are whole blocks."""
        if self.rows % block:
            raise ValueError(f"fp8 weights: {name} has moe_intermediate_size {self.rows * self.moe_tp_size} = "
                             f"{self.rows} per rank (tp {self.tp_size}, ep {self.ep_size}), not a multiple of "
                             f"fp8_block_size {block} (set a smaller --fp8-block-size, e.g. "
                             f"{math.gcd(block, self.rows)})")
        for param in (self.gate_up_proj, self.down_proj):
            q, s = quantize_weight(param.data, block)
            param.data = q
            scale = nn.Parameter(s, requires_grad=False)
            self._loads(scale, param.expert_part, block)
            param.fp8_module = self  # where the loader finds the scale of a full-precision stack (scale_target)
            setattr(self, _STACK_NAMES[param.expert_part] + SCALE_SUFFIX, scale)
        self.fp8_block = block

    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up_proj_scale_inv, down_proj_scale_inv) of FP8 stacks, else None."""
        return (self.gate_up_proj_scale_inv, self.down_proj_scale_inv) if self.fp8_block else None

    def scale_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice | None:
        """The slice of an FP8 stack's scale parameter that the weight target of (param, shape, shard_id) has."""
        b = self.fp8_block
        scale = getattr(self, _STACK_NAMES[param.expert_part] + SCALE_SUFFIX)
        return self.weight_target(scale, torch.Size((*shape[:-2], -(-shape[-2] // b), -(-shape[-1] // b))),
                                  shard_id)

    def owns(self, expert: int) -> bool:
        """Whether global expert id `expert` is one of this rank's."""
        return self.first <= expert < self.first + self.local_experts

    def weight_target(self, param: nn.Parameter, shape: torch.Size, shard_id=None) -> WeightSlice | None:
        """Where an HF tensor goes: shard_id None is the whole stacked tensor; (expert, part) one expert's gate (0),
        up (1) or down ("down") projection [I, hidden] / [hidden, I]; None for an expert of another rank (after
        the same checks)."""
        u = param.expert_unit  # an FP8 scale: shapes and slices in blocks (r is whole blocks: make_fp8)
        e, i, h, r = self.num_experts, self.rows * self.moe_tp_size // u, -(-self.hidden_size // u), self.rows // u
        start = self.moe_tp_rank * r
        sliced = self.moe_tp_size > 1
        suffix = SCALE_SUFFIX if u > 1 else ""
        if shard_id is None and param.expert_part == "gate_up":
            _check_shape("experts.gate_up_proj" + suffix, (e, 2 * i, h), shape)
            if self.ep_size > 1:
                dst = param.data.unflatten(1, (2, r)) if sliced else param.data
                return _OwnExperts(dst, self.first, self.local_experts, sliced, (2, start, r) if sliced else None)
            if self.tp_size == 1:
                return WeightSlice(param.data)
            return _PairSlice(param.data.unflatten(1, (2, r)), 1, start, r)
        if shard_id is None:
            _check_shape("experts.down_proj" + suffix, (e, h, i), shape)
            if self.ep_size > 1:
                return _OwnExperts(param.data, self.first, self.local_experts, False, (2, start, r) if sliced else None)
            return WeightSlice(param.data, 2, start, r)
        expert, part = shard_id
        if not 0 <= expert < e:
            raise ValueError(f"expert {expert} does not exist; this model has {e} experts per layer")
        if part == "down":
            _check_shape(f"experts.{expert}.down_proj.weight{suffix}", (h, i), shape)
        else:
            _check_shape(f"experts.{expert}.{('gate', 'up')[part]}_proj.weight{suffix}", (i, h), shape)
        if not self.owns(expert):
            return None  # another ep rank's expert
        local = expert - self.first
        if part == "down":
            return WeightSlice(param.data[local], 1, start, r)
        return WeightSlice(param.data[local].narrow(0, part * r, r), 0, start, r)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Load an HF tensor (see `weight_target`; another rank's expert is skipped)."""
        target = self.weight_target(param, loaded.shape, shard_id)
        if target is not None:
            target.load(loaded)

    def unshard(self, pieces: list[torch.Tensor], shard_id=None) -> torch.Tensor:
        """One expert's full HF projection from its ep group's pieces: gate / up rows, down columns, in rank order."""
        return torch.cat(pieces, dim=1 if shard_id[1] == "down" else 0)

    def gather_hf(self, hf_name: str, shard_id: tuple,
                  pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of the expert projection at this rank's local index of `shard_id`, on every ep
        rank, from every tp rank's piece (`pieces`, in rank order, as `loader.named_hf_tensors` all-gathers them)."""
        expert, part = shard_id
        local, m = expert - self.first, self.moe_tp_size
        for g in range(self.ep_size):
            owner = g * self.local_experts + local
            name = hf_name.replace(f".experts.{expert}.", f".experts.{owner}.", 1)
            yield name, self.unshard(pieces[g * m:(g + 1) * m], (owner, part))

    def hf_pieces(self, prefix: str) -> Iterator[tuple[str, nn.Parameter, tuple, torch.Tensor]]:
        """(per-expert HF name, parameter, shard_id, this rank's piece as a view) of this rank's expert projections
        (and of their FP8 scales, `<name>_scale_inv`)."""
        stacks = [(self.gate_up_proj, self.down_proj, "")]
        if self.fp8_block:
            stacks.append((self.gate_up_proj_scale_inv, self.down_proj_scale_inv, SCALE_SUFFIX))
        for local in range(self.local_experts):
            e = self.first + local
            for gate_up, down, suffix in stacks:
                r = self.rows // gate_up.expert_unit
                for part, proj in ((0, "gate"), (1, "up")):
                    yield (f"{prefix}.{e}.{proj}_proj.weight{suffix}", gate_up, (e, part),
                           gate_up.data[local].narrow(0, part * r, r))
                yield f"{prefix}.{e}.down_proj.weight{suffix}", down, (e, "down"), down.data[local]


class SparseMoE(nn.Module):
    """Router + experts of one sparse layer: softmax over the router logits in float32, top-k, renormalised when
    norm_topk_prob, weights cast to the activation dtype (HF's order), then the experts' weighted sum."""

    def __init__(self, spec: ModelSpec, moe_index: int, tp: TPGroup | None, ep_size: int = 1):
        super().__init__()
        self.tp = tp
        self.moe_index = moe_index  # this layer's row in the routed-experts buffer
        self.top_k, self.renormalize = spec.num_experts_per_tok, spec.norm_topk_prob
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.gate.weight.weight_loader = default_weight_loader
        self.experts = Experts(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, tp, ep_size)
        # expert parallelism: the experts below hold [offset, offset + E / ep); None: all of them
        self.expert_offset = self.experts.first if ep_size > 1 else None

    def forward(self, x: torch.Tensor, fb: ForwardBatch | None = None) -> torch.Tensor:
        """Mixture output [T, hidden] of x [T, hidden]; with fb, the chosen experts go to their tokens' KV slots."""
        record = None
        if fb is not None and fb.kv_pool.routed_experts is not None:
            record = (fb.kv_pool.routed_experts, fb.out_cache_loc, self.moe_index)
        logits = ops.linear(x, self.gate.weight)  # [T, E] in x's dtype, as HF's nn.Linear
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        scales, block = self.experts.scales(), self.experts.fp8_block  # FP8 stacks: their block scales
        if ops.runs_triton(x.device):
            from inference_engine.kernels import fused_moe as kernels

            weights, ids = kernels.route(logits, self.top_k, self.renormalize, x.dtype, record)
            out = kernels.fused_moe(x, w13, w2, weights, ids, expert_offset=self.expert_offset, scales=scales,
                                    block=block)
        else:
            weights, ids = route_reference(logits, self.top_k, self.renormalize, x.dtype)
            if record is not None:
                buffer, loc, layer = record  # [slots, moe layers, k]
                buffer[loc, layer] = ids.to(buffer.dtype)
            out = moe_reference(x, w13, w2, weights, ids, self.expert_offset or 0, scales, block)
        return out if self.tp is None or self.tp.size == 1 else self.tp.all_reduce(out)


def route_reference(logits: torch.Tensor, top_k: int, renormalize: bool,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in dtype, expert ids [T, k] int64, best first) of router logits [T, E]: softmax in float32,
    top-k, renormalised over the chosen ones when asked, cast to dtype (HF's Qwen3MoeSparseMoeBlock)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, expert_offset: int = 0, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                  block: int = 0) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) [T, hidden] for x [T, hidden], w13 [E, 2I, hidden] (gate rows,
    then up rows), w2 [E, hidden, I]: the torch specification of `kernels.fused_moe.fused_moe`, rounding as HF's
    Qwen3MoeSparseMoeBlock (each expert's output in x's dtype, times its weight, summed over the token's experts in
    expert order); reads the counts on the host. Expert parallelism: w13 / w2 hold experts [expert_offset,
    expert_offset + E) of the model's, and pairs routed to any other expert add nothing (another rank's).

    FP8 (scales = (w13 scale_inv [E, 2I/B, ceil(hidden/B)], w2 scale_inv [E, ceil(hidden/B), I/B]), w13 / w2 e4m3):
    each product is `models.fp8.reference_linear`, the dequantised expert matrix times the input quantised per
    token and `block` group and dequantised (x for gate / up, silu(gate) * up for down), in float32, rounded to
    x's dtype: the specification of the FP8 fused MoE."""
    def product(a: torch.Tensor, w: torch.Tensor, e: int, which: int) -> torch.Tensor:
        if scales is None:
            return ops.linear(a, w[e])
        return reference_linear(a, w[e], scales[which][e], block)

    tokens, k = ids.shape
    experts = w13.shape[0]
    flat = ids.reshape(-1) - expert_offset  # [T k] local expert ids
    flat = torch.where((flat >= 0) & (flat < experts), flat, experts)  # other ranks' pairs: one bucket, after ours
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in token order inside each expert
    token_of = order // k  # [T k] the token of each sorted pair
    counts = torch.bincount(flat, minlength=experts + 1)[:experts].tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = token_of[start:start + n]
            h = ops.silu_and_mul(product(x[rows], w13, e, 0))  # [n, I]
            y = product(h, w2, e, 1) * weights.reshape(-1)[order[start:start + n], None]  # [n, hidden]
            out.index_add_(0, rows, y)
        start += n
    return out


class _ExpertRef(NamedTuple):
    param: nn.Parameter
    shard_id: tuple


def resolve_expert(params: dict[str, nn.Parameter], hf_name: str) -> _ExpertRef | None:
    """The stacked parameter and (expert, part) a per-expert HF name loads into; None for any other name."""
    match = _EXPERT_NAME.match(hf_name)
    if match is None:
        return None
    prefix, expert, proj, scale = match.groups()
    param = params.get(f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}{scale or ''}")
    if param is None:
        return None
    return _ExpertRef(param, (int(expert), {"gate": 0, "up": 1, "down": "down"}[proj]))


def stacked_expert_names(hf_name: str, num_experts: int) -> list[str]:
    """The per-expert HF names a stacked `...mlp.experts.{gate_up,down}_proj` tensor (or its FP8 scales,
    `..._proj_scale_inv`) covers (else [hf_name])."""
    for stacked in _STACKED:
        for suffix in ("", SCALE_SUFFIX):
            if hf_name.endswith(f".mlp.experts.{stacked}{suffix}"):
                prefix = hf_name[:-len(stacked + suffix) - 1]
                projs = ("gate", "up") if stacked == "gate_up_proj" else ("down",)
                return [f"{prefix}.{e}.{p}_proj.weight{suffix}" for e in range(num_experts) for p in projs]
    return [hf_name]
