"""Ray actors of the rollout side: `EngineActor` (one Engine, serving HTTP too) and `RolloutManagerActor`.

`EngineActor` holds one `inference_engine.Engine`, serves its HTTP API (SGLang native and
OpenAI) on the node's IP, and exposes the engine's RL surface to weight sync. `EngineProxy`
is the synchronous, picklable stand-in for an engine actor that `weight_sync.push_weights`
drives from trainer rank 0. `RolloutManagerActor` owns the prompt data and a RolloutManager
whose per-policy routers reach the engines over HTTP (or directly through their Ray handles).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Sequence

import ray
import torch

from rollout.client import HttpEngineClient, LocalEngineClient
from rollout.config import DataConfig, EnvConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.manager import RolloutBatch, RolloutManager
from rollout.router import Router
from kiln_common.net import free_port

logger = logging.getLogger(__name__)

HTTP_START_TIMEOUT_S = 30.0


def _setup_logging() -> None:
    """INFO logs of Kiln in an actor process; per-request HTTP logs stay quiet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


class EngineActor:
    """One inference engine in a Ray actor: generation (Ray calls and HTTP) and the RL control surface."""

    def __init__(self, config: Any, serve_http: bool = True) -> None:
        from inference_engine import Engine

        _setup_logging()
        self.engine = Engine(config=config)
        self._server = None
        self.url: str | None = None
        if serve_http:
            self._start_http()

    def _start_http(self) -> None:
        import uvicorn

        from inference_engine.server import create_app

        port = free_port("")
        config = uvicorn.Config(create_app(self.engine), host="0.0.0.0", port=port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        thread = threading.Thread(target=self._server.run, name="kiln-engine-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + HTTP_START_TIMEOUT_S
        while not self._server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the engine's HTTP server did not start on port {port} "
                                   f"within {HTTP_START_TIMEOUT_S:g}s")
            time.sleep(0.05)
        self.url = f"http://{ray.util.get_node_ip_address()}:{port}"

    def get_url(self) -> str | None:
        """The engine's HTTP base URL (None if it does not serve HTTP)."""
        return self.url

    # ---- generation (what LocalEngineClient calls on a Ray handle) ----------------------------------------------

    async def async_generate(self, **kwargs: Any) -> dict | list[dict]:
        """`Engine.async_generate` (non-streaming)."""
        return await self.engine.async_generate(**kwargs)

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort one request or all of them."""
        self.engine.abort(rid, abort_all=abort_all)

    async def flush_cache(self) -> None:
        """Empty the radix cache."""
        await asyncio.to_thread(self.engine.flush_cache)

    async def health(self) -> bool:
        """True while the engine's scheduler thread runs."""
        return self.engine._thread.is_alive()

    async def get_model_info(self) -> dict:
        return self.engine.get_model_info()

    async def metrics(self) -> dict:
        return self.engine.metrics()

    # ---- RL surface (what weight_sync's sender and the driver call) ----------------------------------------------

    async def get_weight_version(self) -> int:
        return self.engine.weight_version

    async def pause_generation(self, mode: str = "pause") -> None:
        """Stop stepping ('pause'), or first let the requests in flight finish on the current weights ('drain')."""
        await asyncio.to_thread(self.engine.pause_generation, mode)

    async def continue_generation(self) -> None:
        await asyncio.to_thread(self.engine.continue_generation)

    async def release_memory(self, weights: bool = False) -> None:
        """Free the KV cache (and weights) while the colocated trainer trains."""
        await asyncio.to_thread(self.engine.release_memory, weights)

    async def resume_memory(self) -> None:
        await asyncio.to_thread(self.engine.resume_memory)

    async def update_weights_from_tensor(self, bucket: Any, weight_version: int | None = None) -> int:
        """Load a bucket shared by handle (colocated transport) or given as (hf_name, tensor) pairs."""
        return await asyncio.to_thread(self.engine.update_weights_from_tensor, bucket, weight_version)

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str = "auto",
                                        timeout_s: float = 300.0) -> None:
        """Join trainer rank 0's weight-update group (tp rank r at rank_offset + r); blocks until every rank arrived."""
        await asyncio.to_thread(self.engine.init_weights_update_group, master_address, master_port, rank_offset,
                                world_size, group_name, backend, timeout_s)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the weight-update group (every tp rank)."""
        await asyncio.to_thread(self.engine.destroy_weights_update_group, group_name)

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], group_name: str,
                                              weight_version: int | None = None) -> int:
        """Receive one bucket broadcast by the group's rank 0 and load it (every tp rank its shard)."""
        return await asyncio.to_thread(self.engine.update_weights_from_distributed, names, dtypes, shapes,
                                       group_name, weight_version)

    async def weight_checksums(self) -> dict[str, dict]:
        """{hf_name: checksum dict} of the engine's weights (weight_sync's verification)."""
        return await asyncio.to_thread(self.engine.weight_checksums)

    async def named_hf_tensors(self) -> dict[str, torch.Tensor]:
        """A copy of the engine's weights under HF names."""
        named = await asyncio.to_thread(self.engine.named_hf_tensors)
        return {name: t.detach().to("cpu", copy=True) for name, t in named}

    async def shutdown(self) -> None:
        """Stop the HTTP server and the engine."""
        if self._server is not None:
            self._server.should_exit = True
        await asyncio.to_thread(self.engine.shutdown)


class EngineProxy:
    """A synchronous stand-in for an EngineActor handle, with the methods `weight_sync.push_weights` calls."""

    def __init__(self, handle: Any, timeout_s: float | None = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=self.timeout_s)

    @property
    def weight_version(self) -> int:
        return self._call("get_weight_version")

    def pause_generation(self, mode: str = "pause") -> None:
        self._call("pause_generation", mode)

    def continue_generation(self) -> None:
        self._call("continue_generation")

    def update_weights_from_tensor(self, bucket: Any, weight_version: int | None = None) -> int:
        return self._call("update_weights_from_tensor", bucket, weight_version)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "auto", timeout_s: float = 300.0) -> None:
        self._call("init_weights_update_group", master_address, master_port, rank_offset, world_size, group_name,
                   backend, timeout_s)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._call("destroy_weights_update_group", group_name)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str,
                                        weight_version: int | None = None) -> int:
        return self._call("update_weights_from_distributed", names, dtypes, shapes, group_name, weight_version)

    def weight_checksums(self) -> dict[str, dict]:
        return self._call("weight_checksums")


class RolloutManagerActor:
    """Ray actor around RolloutManager: prompt data, per-policy routers over the engines, health checks."""

    def __init__(self, rollout: RolloutConfig, data: DataConfig, engines: dict[str, list[str | Any]],
                 tokenizer_path: str, env_config: EnvConfig | None = None,
                 health_check_interval: float = 10.0) -> None:
        """`engines` maps each policy to its engines: HTTP base URLs, or EngineActor handles (Ray calls)."""
        from transformers import AutoTokenizer

        _setup_logging()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.routers: dict[str, Router] = {}
        for policy, targets in engines.items():
            clients = [HttpEngineClient(t) if isinstance(t, str) else LocalEngineClient(t, name=f"{policy}-engine-{i}")
                       for i, t in enumerate(targets)]
            self.routers[policy] = Router(clients, page_size=rollout.router_page_size,
                                          balance_threshold=rollout.router_balance_threshold)
        dataset = PromptDataset(data, self.tokenizer) if data.prompt_data else None
        eval_data = PromptDataset(data, self.tokenizer, data.eval_prompt_data) if data.eval_prompt_data else None
        self.manager = RolloutManager(rollout, dataset, self.routers, self.tokenizer, eval_data=eval_data,
                                      env_config=env_config)
        self.health_check_interval = health_check_interval
        self._health_started = False

    def _start_health_checks(self) -> None:
        if not self._health_started:
            for router in self.routers.values():
                router.start_health_checks(self.health_check_interval)
            self._health_started = True

    async def generate(self, step: int) -> RolloutBatch:
        """One step's scored samples."""
        self._start_health_checks()
        return await self.manager.generate(step)

    async def evaluate(self) -> dict[str, float]:
        """Metrics over the evaluation data."""
        self._start_health_checks()
        return await self.manager.evaluate()

    async def flush_cache(self, policy: str) -> None:
        """Forget routed prefixes of `policy`'s engines (their caches were flushed by a weight update)."""
        await self.routers[policy].flush_cache()

    async def state_dict(self) -> dict[str, Any]:
        return self.manager.state_dict()

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self.manager.load_state_dict(state)
