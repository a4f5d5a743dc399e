"""The one HF-name <-> engine-parameter mapping: loads HF tensors (start-up and RL updates) and exports them unfused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from inference_engine.models.layers import WeightSlice, default_weight_target, replicated_unshard
from inference_engine.models.transformer import CausalLM, ModelSpec
from inference_engine.parallel import TPGroup
from weight_sync.buckets import copy_tensors

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
    """The engine parameter (from `params`, the model's named parameters) and shard id an HF name loads into; (None, None) to skip."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None, None
    if hf_name == "lm_head.weight" and model.spec.tie_word_embeddings:
        return None, None  # tied: the embedding is the head
    for hf_part, (fused, shard_id) in PACKED.items():
        if f".{hf_part}." in hf_name:
            name = hf_name.replace(f".{hf_part}.", f".{fused}.")
            if name in params:
                return params[name], shard_id
    if hf_name in params:
        return params[hf_name], None
    raise ValueError(f"weight {hf_name!r} does not belong to this {model.spec.family} model "
                     f"({model.spec.num_layers} layers); expected HF names like 'model.layers.0.self_attn.q_proj.weight'")


class WeightPlan:
    """Where each HF-named tensor goes in this model (a parameter view and the slice of the HF tensor it takes),
    resolved and shape-checked once per (name, shape) and reused by every later load.

    The views point at the parameters' current storage: make a new plan after the weights move
    (`ModelRunner.release_memory` / `resume_memory` do).
    """

    def __init__(self, model: CausalLM):
        self.model = model
        self._params = dict(model.named_parameters())
        self._slices: dict[tuple[str, tuple[int, ...]], WeightSlice | None] = {}

    def target(self, hf_name: str, shape: Sequence[int]) -> WeightSlice | None:
        """The slice an HF tensor of this name and shape loads into (None: skipped, e.g. a tied lm_head); bad ones raise."""
        key = (hf_name, tuple(shape))
        if key in self._slices:
            return self._slices[key]
        param, shard_id = resolve(self.model, self._params, hf_name)
        target = None
        if param is not None:
            param.hf_name = hf_name
            target = getattr(param, "weight_target", default_weight_target)(param, torch.Size(shape), shard_id)
        self._slices[key] = target
        return target

    def check(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Raise ValueError for the first unknown name or wrong shape, before anything is loaded."""
        for name, tensor in named_tensors:
            self.target(name, tensor.shape)

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy HF-named tensors into their parameter slices; returns the names loaded.

        A list is checked whole before its first copy, and its copies go out as one multi-tensor copy
        per (dtype, device) pair; any other iterable is streamed in groups of `STREAM_GROUP` tensors.
        """
        if isinstance(named_tensors, (list, tuple)):
            return self._load_group(named_tensors)
        loaded, group = [], []
        for entry in named_tensors:
            group.append(entry)
            if len(group) == STREAM_GROUP:
                loaded += self._load_group(group)
                group = []
        return loaded + self._load_group(group)

    def _load_group(self, named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
        targets = [self.target(name, tensor.shape) for name, tensor in named]  # every check before any copy
        copies: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        loaded = []
        for (name, tensor), target in zip(named, targets):
            if target is None:
                continue
            dsts, srcs = copies.setdefault((target.dst.dtype, tensor.dtype, tensor.device), ([], []))
            dsts.append(target.dst)
            srcs.append(target.source(tensor))
            if target.pad is not None:
                target.pad.zero_()
            loaded.append(name)
        for dsts, srcs in copies.values():
            copy_tensors(dsts, srcs)
        return loaded


def load_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Load HF-named tensors into the model through each parameter's weight target; returns the names loaded."""
    return WeightPlan(model).load(named_tensors)


def _local_hf_pieces(model: CausalLM) -> Iterator[tuple[str, torch.nn.Parameter, object, torch.Tensor]]:
    """(hf_name, parameter, shard_id, this rank's piece of that HF tensor as a view), fused parameters split back."""
    for name, param in model.named_parameters():
        fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
        if fused is None:
            yield name, param, None, param.data
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        parts = [(hf, shard_id) for hf, (f, shard_id) in PACKED.items() if f == fused]
        for (hf_part, shard_id), (offset, size) in zip(parts, module.part_slices()):
            yield name.replace(fused, hf_part), param, shard_id, param.data.narrow(0, offset, size)


def named_hf_tensors(model: CausalLM, tp: TPGroup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under HF names, fused parameters split back (views, or with tp ranks the full tensors
    rebuilt from every rank's piece: a collective that every rank must iterate together)."""
    for name, param, shard_id, piece in _local_hf_pieces(model):
        unshard = getattr(param, "unshard", replicated_unshard)
        if tp is None or tp.size == 1 or unshard is replicated_unshard:
            yield name, piece
        else:
            yield name, unshard(tp.all_gather(piece), shard_id)


def expected_hf_names(model: CausalLM) -> set[str]:
    """Every HF name a complete checkpoint of this model must provide."""
    return {name for name, _, _, _ in _local_hf_pieces(model)}
