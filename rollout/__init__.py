"""Kiln RL rollout: samples, data, generate functions, rewards, the rollout manager and router."""

from rollout.client import EngineClient, EngineError, EngineUnavailableError, HttpEngineClient, LocalEngineClient
from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.generate import GenerateArgs
from rollout.manager import DataExhausted, RolloutBatch, RolloutManager
from rollout.router import NoHealthyEngineError, Router
from kiln_common.sample import Sample, Status

__all__ = [
    "DataConfig", "DataExhausted", "EngineClient", "EngineError", "EngineUnavailableError", "GenerateArgs",
    "HttpEngineClient", "LocalEngineClient", "NoHealthyEngineError", "PromptDataset", "RolloutBatch",
    "RolloutConfig", "RolloutManager", "Router", "Sample", "Status",
]
