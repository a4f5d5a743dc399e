"""Model implementation (Llama / Qwen2 / Qwen3 in one) and the HF weight mapping."""

from inference_engine.models.loader import load_weights, named_hf_tensors, read_spec
from kiln_common.model_spec import FAMILIES, ModelSpec
from inference_engine.models.transformer import CausalLM

__all__ = ["CausalLM", "FAMILIES", "ModelSpec", "load_weights", "named_hf_tensors", "read_spec"]
