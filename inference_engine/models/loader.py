"""The one HF-name <-> engine-parameter mapping: loads HF tensors (start-up and RL updates) and exports them unfused."""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch

from inference_engine.models import fp8
from inference_engine.models.layers import WeightSlice, default_weight_target, replicated_unshard
from inference_engine.models.moe import Experts, resolve_expert
from inference_engine.models.transformer import CausalLM, ModelSpec
from inference_engine.parallel import TPGroup
from weight_sync.buckets import StableBucket, copy_tensors
from weight_sync.fp8 import quantize_weight_into

# HF projection name -> (fused engine parameter, part of it)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
STREAM_GROUP = 64  # tensors per checked-then-copied group when loading from a stream (a checkpoint)


def read_spec(model_path: str | Path) -> ModelSpec:
    """The ModelSpec of a local HF folder."""
    if not Path(model_path, "config.json").is_file():
        raise ValueError(f"{str(model_path)!r} has no config.json; expected a local HF model folder")
    return ModelSpec.from_hf_config(json.loads(Path(model_path, "config.json").read_text()))


def iter_safetensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every tensor of every *.safetensors file in the folder."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(model_path)!r}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve(model: CausalLM, params: dict[str, torch.nn.Parameter], hf_name: str):
    """The engine parameter (from `params`, the model's named parameters) and shard id an HF name loads into.

    (None, None) for a name to skip.
    """
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None, None
    if hf_name == "lm_head.weight" and model.spec.tie_word_embeddings:
        return None, None  # tied: the embedding is the head
    expert = resolve_expert(params, hf_name)  # mlp.experts.{e}.{gate,up,down}_proj.weight: a stacked parameter's rows
    if expert is not None:
        return expert
    for hf_part, (fused, shard_id) in PACKED.items():
        if f".{hf_part}." in hf_name:
            name = hf_name.replace(f".{hf_part}.", f".{fused}.")
            if name in params:
                return params[name], shard_id
    if hf_name in params:
        return params[hf_name], None
    raise ValueError(f"weight {hf_name!r} does not belong to this {model.spec.family} model "
                     f"({model.spec.num_layers} layers); expected HF names like "
                     "'model.layers.0.self_attn.q_proj.weight'")


class _Target(NamedTuple):
    """A resolved (HF name, shape): its slice, the parameter it lies in, and whether it takes the HF tensor whole."""

    slice: WeightSlice
    param: torch.nn.Parameter
    whole: bool   # the source is the HF tensor itself (no narrow): this rank holds all of it
    scale: torch.Tensor | None = None   # an FP8 weight's: the view of its scale parameter that goes with the slice


@dataclass
class WeightCopies:
    """A bucket's loads, resolved: per (dtype, device) pair the parameter slices and the sources copied into them."""

    names: list[str]   # the HF names loaded (skipped ones left out)
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]]   # (dsts, srcs)
    pads: list[torch.Tensor]   # padding rows of vocab shards, zeroed on every load
    quantized: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = dataclasses.field(default_factory=list)
    # (full-precision source, FP8 weight slice, its scale slice, block): quantised on every load (models/fp8.py)

    def run(self) -> list[str]:
        """Copy every source into its slice (quantising those bound for FP8 weights); returns the names loaded."""
        for pad in self.pads:
            pad.zero_()
        for dsts, srcs in self.groups:
            copy_tensors(dsts, srcs)
        for src, dst, scale, block in self.quantized:
            quantize_weight_into(src, dst, scale, block)
        return self.names


class WeightPlan:
    """Where each HF-named tensor goes in this model (a parameter view and the slice of the HF tensor it takes),
    resolved and shape-checked once per (name, shape) and reused by every later load.

    The views point at the parameters' current storage: make a new plan after the weights move
    (`ModelRunner.release_memory` / `resume_memory` do). A `StableBucket` (a receiver's bucket of views
    that comes back push after push) keeps its resolved copies here for as long as it lives.
    """

    def __init__(self, model: CausalLM):
        self.model = model
        self._params = dict(model.named_parameters())
        self._targets: dict[tuple[str, tuple[int, ...]], _Target | None] = {}
        self._kept: dict[int, tuple[weakref.ref, WeightCopies]] = {}   # id(StableBucket) -> (its weak ref, copies)

    def target(self, hf_name: str, shape: Sequence[int]) -> WeightSlice | None:
        """The slice an HF tensor of this name and shape fills (None: skipped, e.g. a tied lm_head or another expert
    parallel rank's expert); bad ones raise."""
        resolved = self._resolve(hf_name, shape)
        return None if resolved is None else resolved.slice

    def _resolve(self, hf_name: str, shape: Sequence[int]) -> _Target | None:
        key = (hf_name, tuple(shape))
        if key in self._targets:
            return self._targets[key]
        param, shard_id = resolve(self.model, self._params, hf_name)
        resolved = None
        if param is not None:
            param.hf_name = hf_name
            target = getattr(param, "weight_target", default_weight_target)(param, torch.Size(shape), shard_id)
            if target is not None:  # None: checked, but held by another rank (an expert of another ep rank)
                whole = target.dim is None or (target.start == 0 and target.length == shape[target.dim])
                scale = fp8.scale_view(param, target, shape, shard_id) if fp8.is_fp8_weight(param) else None
                resolved = _Target(target, param, whole, scale)
        self._targets[key] = resolved
        return resolved

    def check(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Raise ValueError for the first unknown name or wrong shape, before anything is loaded."""
        for name, tensor in named_tensors:
            self._resolve(name, tensor.shape)

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy HF-named tensors into their parameter slices; returns the names loaded.

        A list is checked whole before its first copy, and its copies go out together per (dtype, device)
        pair (`copy_tensors`); any other iterable is streamed in groups of `STREAM_GROUP` tensors.
        """
        if isinstance(named_tensors, (list, tuple)):
            return self.copies(named_tensors).run()
        loaded, group = [], []
        for entry in named_tensors:
            group.append(entry)
            if len(group) == STREAM_GROUP:
                loaded += self.copies(group).run()
                group = []
        return loaded + self.copies(group).run()

    def copies(self, named: Sequence[tuple[str, torch.Tensor]]) -> WeightCopies:
        """The copies that load these tensors (each checked first); made once for a `StableBucket` while it lives."""
        if not isinstance(named, StableBucket):
            return self._copies(named)
        key = id(named)
        kept = self._kept.get(key)
        if kept is not None and kept[0]() is named:
            return kept[1]
        copies = self._copies(named)
        plan = weakref.ref(self)   # the callback must not keep the plan (and its parameters' memory) alive

        def forget(_: weakref.ref) -> None:
            alive = plan()
            if alive is not None:
                alive._kept.pop(key, None)

        self._kept[key] = (weakref.ref(named, forget), copies)
        return copies

    def _copies(self, named: Sequence[tuple[str, torch.Tensor]]) -> WeightCopies:
        targets = [self._resolve(name, tensor.shape) for name, tensor in named]  # every check before any copy
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.nn.Parameter | None]]] = {}
        names, pads, quantized = [], [], []
        for (name, tensor), target in zip(named, targets):
            if target is None:
                continue
            names.append(name)
            if target.slice.pad is not None:
                pads.append(target.slice.pad)
            dst = target.slice.dst
            if fp8.is_fp8_weight(target.param) and tensor.dtype != dst.dtype:  # full precision into FP8: quantise
                block = target.param.fp8_module.fp8_block
                quantized.append((target.slice.source(tensor), dst, target.scale, block))
                names.append(fp8.scale_hf_name(name))
                continue
            src = tensor if target.whole else target.slice.source(tensor)
            dsts, srcs, params = groups.setdefault((dst.dtype, tensor.dtype, tensor.device), ([], [], []))
            if target.whole and params and params[-1] is target.param and _follows(dsts[-1], dst) \
                    and _follows(srcs[-1], src):   # the next part of a fused parameter, next in the source too
                dsts[-1], srcs[-1] = _joined(dsts[-1], dst), _joined(srcs[-1], src)
                continue
            dsts.append(dst)
            srcs.append(src)
            params.append(target.param if target.whole else None)
        return WeightCopies(names, [(dsts, srcs) for dsts, srcs, _ in groups.values()], pads, quantized)


def _follows(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Both contiguous, and `second` starts where `first` ends in the same storage."""
    return (first.is_contiguous() and second.is_contiguous()
            and second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and second.storage_offset() == first.storage_offset() + first.numel())


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """One flat view [numel of both] over two adjacent contiguous tensors (see `_follows`)."""
    return first.as_strided((first.numel() + second.numel(),), (1,), first.storage_offset())


def load_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Load HF-named tensors into the model through each parameter's weight target; returns the names loaded."""
    return WeightPlan(model).load(named_tensors)


def _local_hf_pieces(model: CausalLM) -> Iterator[tuple[str, torch.nn.Parameter, object, torch.Tensor]]:
    """(hf_name, parameter, shard_id, this rank's piece of that HF tensor as a view), fused parameters split back."""
    for name, param in model.named_parameters():
        if name.endswith(".experts.gate_up_proj"):
            experts: Experts = model.get_submodule(name.rsplit(".", 1)[0])
            yield from experts.hf_pieces(name.rsplit(".", 1)[0])
            continue
        if ".experts." in name:
            continue  # down_proj and the FP8 scales: yielded with gate_up_proj, expert by expert
        fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
        if fused is None:
            yield name, param, None, param.data
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        parts = [(hf, shard_id) for hf, (f, shard_id) in PACKED.items() if f == fused]
        unit = getattr(param, "fp8_block", 1)  # an FP8 weight's scale has a row per block of the weight's rows
        for (hf_part, shard_id), (offset, size) in zip(parts, module.part_slices()):
            piece = param.data.narrow(0, offset // unit, -(-size // unit))
            yield name.replace(fused, hf_part), param, shard_id, piece


def named_hf_tensors(model: CausalLM, tp: TPGroup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under HF names, fused parameters split back (views, or with tp ranks the full tensors
    rebuilt from every rank's piece: a collective that every rank must iterate together). Under expert parallelism
    each rank iterates its own experts; one all-gather of a local expert's piece gives that expert of every ep
    rank (`Experts.gather_hf`)."""
    for name, param, shard_id, piece in _local_hf_pieces(model):
        unshard = getattr(param, "unshard", replicated_unshard)
        if tp is None or tp.size == 1 or unshard is replicated_unshard:
            yield name, piece
        elif hasattr(param, "gather_hf"):
            yield from param.gather_hf(name, shard_id, tp.all_gather(piece))
        else:
            yield name, unshard(tp.all_gather(piece), shard_id)


def expected_hf_names(model: CausalLM) -> set[str]:
    """Every HF name a complete checkpoint of this model must provide to this rank (its own experts only)."""
    return {name for name, _, _, _ in _local_hf_pieces(model)}
