"""The one HF-name <-> engine-parameter mapping: loads HF tensors (start-up and RL updates) and exports them unfused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch

from inference_engine.models.layers import default_weight_loader, replicated_unshard
from inference_engine.models.transformer import CausalLM, ModelSpec
from inference_engine.parallel import TPGroup

# HF projection name -> (fused engine parameter, part of it)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def load_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Load HF-named tensors into the model through each parameter's weight_loader; returns the names loaded."""
    loaded = []
    params = dict(model.named_parameters())
    for hf_name, tensor in named_tensors:
        param, shard_id = resolve(model, params, hf_name)
        if param is None:
            continue
        param.hf_name = hf_name
        loader = getattr(param, "weight_loader", default_weight_loader)
        with torch.no_grad():
            loader(param, tensor.to(param.device), shard_id)
        loaded.append(hf_name)
    return loaded


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
