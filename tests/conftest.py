"""Session fixtures: tiny random HF model folders (Llama, Qwen2, Qwen3) with a locally trained BPE tokenizer."""

import os
from pathlib import Path

import pytest
import torch

from inference_engine.testing import FAMILIES, make_tiny_model, make_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """{"llama": path, "qwen2": path, "qwen3": path}; qwen3 has q/k norm and tied embeddings."""
    out = {}
    for i, family in enumerate(FAMILIES):
        out[family] = make_tiny_model(tmp_path_factory.mktemp(family), family, seed=i, tokenizer_dir=tokenizer_dir)
    return out


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, tiny_models):
    """Each family in turn."""
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def qwen3_model(tiny_models):
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def qwen3_moe_model(tmp_path_factory, tokenizer_dir):
    """A tiny random Qwen3MoeForCausalLM: 3 layers (layer 1 a dense MLP), 8 experts, top-2, renormalised."""
    return make_tiny_model(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", seed=7, tokenizer_dir=tokenizer_dir,
                           num_layers=3, mlp_only_layers=(1,))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module (the driver's end-to-end runs); actors import tests/ and the repo."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    tests = Path(__file__).resolve().parent
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()
