"""Kiln's radix-cache inference engine: `from inference_engine import Engine, EngineConfig`."""

from inference_engine.config import EngineConfig
from inference_engine.engine import Engine
from inference_engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
