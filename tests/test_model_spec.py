"""One reading of an HF config for the engine and the trainer: the transformers 4 and >= 5 forms, and agreement."""

import json
from pathlib import Path

import pytest

from inference_engine.models import read_spec
from kiln_common.model_spec import ModelSpec, rope_settings
from trainer import bridge


def _config(folder) -> dict:
    return json.loads(Path(folder, "config.json").read_text())


def test_rope_settings_reads_both_forms():
    assert rope_settings({"rope_theta": 5e5, "rope_scaling": None}) == (5e5, None)
    # transformers >= 5 writes one rope_parameters dict instead of rope_theta / rope_scaling
    assert rope_settings({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == (1e6, None)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    theta, scaling = rope_settings({"rope_parameters": {**llama3, "rope_theta": 5e5}})
    assert (theta, scaling) == (5e5, llama3)
    assert rope_settings({}) == (10000.0, None)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_engine_and_trainer_read_a_config_alike(tiny_models, family):
    from transformers import AutoConfig

    folder = tiny_models[family]
    engine = read_spec(folder)
    trainer = bridge.load_spec(folder)
    assert (trainer.family, trainer.vocab_size, trainer.hidden_size, trainer.ffn_hidden_size, trainer.num_layers,
            trainer.num_heads, trainer.num_kv_heads, trainer.head_dim, trainer.rope_theta, trainer.rms_eps,
            trainer.tie_embeddings, trainer.qkv_bias, trainer.qk_norm, trainer.max_position_embeddings) == (
        engine.family, engine.vocab_size, engine.hidden_size, engine.intermediate_size, engine.num_layers,
        engine.num_heads, engine.num_kv_heads, engine.head_dim, engine.rope_theta, engine.rms_norm_eps,
        engine.tie_word_embeddings, engine.qkv_bias, engine.qk_norm, engine.max_position_embeddings)
    # the same config in the transformers >= 5 form gives the same RoPE base on both sides
    cfg = _config(folder)
    theta = cfg.pop("rope_theta", None) or 10000.0
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta * 3}
    assert ModelSpec.from_hf_config(cfg).rope_theta == theta * 3
    assert bridge.spec_from_hf_config(cfg).rope_theta == theta * 3
    assert AutoConfig.from_pretrained(folder).to_dict()["model_type"] == family


def test_trainer_limits_on_the_shared_reading(tiny_models):
    cfg = _config(tiny_models["llama"])
    cfg["attention_bias"] = True
    assert ModelSpec.from_hf_config(cfg).qkv_bias  # the engine serves it
    with pytest.raises(ValueError, match="attention_bias"):
        bridge.spec_from_hf_config(cfg)
    cfg = _config(tiny_models["qwen3"])
    cfg["num_key_value_heads"] = 3  # 4 heads
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelSpec.from_hf_config(cfg)


def test_moe_expert_count_in_both_spellings(tmp_path):
    """Newer transformers writes a Qwen3-MoE config with `num_local_experts` (its alias of the Hub's `num_experts`):
    the engine's spec and the trainer's MoE checks read either spelling alike."""
    from inference_engine.testing import make_tiny_model
    from trainer.config import TrainerConfig

    folder = make_tiny_model(tmp_path / "moe", "qwen3_moe", num_experts=4, num_experts_per_tok=2)
    cfg = _config(folder)
    experts = cfg.pop("num_experts", None) or cfg.pop("num_local_experts")
    assert experts == 4
    for key in ("num_experts", "num_local_experts"):
        renamed = {**cfg, key: experts}
        assert ModelSpec.from_hf_config(renamed).num_experts == 4
        Path(folder, "config.json").write_text(json.dumps(renamed))
        TrainerConfig(hf_checkpoint=str(folder), use_routing_replay=True)  # a MoE model: replay is allowed
    with pytest.raises(ValueError, match="num_experts >= 1"):
        ModelSpec.from_hf_config(cfg)  # neither spelling: not read as a dense model silently
