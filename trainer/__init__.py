"""Kiln trainer: megatron-core policy and reference models, HF bridge, RL losses."""
