"""Ray actors of the rollout side: `EngineActor` (one Engine, serving HTTP too) and `RolloutManagerActor`.

`EngineActor` holds one `inference_engine.Engine`, serves its HTTP API (SGLang native and
OpenAI) on the node's IP, and forwards the engine's control surface (`inference_engine.control`)
member by member. `EngineProxy` is the synchronous, picklable stand-in for an engine actor that
`weight_sync.push_weights` drives from trainer rank 0. `RolloutManagerActor` owns the prompt data
and a RolloutManager whose per-policy routers reach the engines over HTTP (or directly through
their Ray handles).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

import ray
import torch

from inference_engine.control import MEMBERS, Member
from rollout.client import HttpEngineClient, LocalEngineClient
from rollout.config import DataConfig, EnvConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.eval_config import EvalSet, load_eval_config
from rollout.manager import RolloutBatch, RolloutManager
from rollout.router import Router
from kiln_common.logs import setup_logging
from kiln_common.net import free_port

logger = logging.getLogger(__name__)

HTTP_START_TIMEOUT_S = 30.0


def _setup_logging() -> None:
    """INFO logs of Kiln in an actor process (through tqdm.write: not onto a progress bar's line); per-request HTTP
    logs stay quiet."""
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


class EngineActor:
    """One inference engine in a Ray actor: serves HTTP (optionally) and forwards every member of the engine's
    control surface (`inference_engine.control.MEMBERS`) to its Engine; the methods are generated below."""

    LIFECYCLE = ("get_url", "shutdown")   # the actor's own methods, beside the control surface

    def __init__(self, config: Any, serve_http: bool = True, api_key: str | None = None) -> None:
        """`api_key`: the run's token, required on every HTTP route but /health (it also turns the admin routes
        on); serving HTTP needs one."""
        from inference_engine import Engine

        if serve_http and api_key is None:
            raise ValueError("EngineActor serves HTTP on the node's address only behind an api_key (the driver "
                             "passes the run's token)")
        _setup_logging()
        self.engine = Engine(config=config)
        self._server = None
        self.url: str | None = None
        if serve_http:
            self._start_http(api_key)

    def _start_http(self, api_key: str) -> None:
        import uvicorn

        from inference_engine.config import ServerConfig
        from inference_engine.server import create_app

        host = http_host(ray.util.get_node_ip_address())
        port = free_port(host)
        server_config = ServerConfig(host=host, port=port, api_key=api_key)
        config = uvicorn.Config(create_app(self.engine, server_config), host=host, port=port, log_level="warning",
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
        self.url = f"http://{host}:{port}"

    def get_url(self) -> str | None:
        """The engine's HTTP base URL (None if it does not serve HTTP)."""
        return self.url

    async def shutdown(self) -> None:
        """Stop the HTTP server and the engine."""
        if self._server is not None:
            self._server.should_exit = True
        await asyncio.to_thread(self.engine.shutdown)


def http_host(node_ip: str) -> str:
    """The address an engine's HTTP server binds: the node's own IP (reachable by the rollout manager on any node,
    not every interface), or 127.0.0.1 when that IP is a loopback one."""
    import ipaddress

    return "127.0.0.1" if ipaddress.ip_address(node_ip).is_loopback else node_ip


class EngineProxy:
    """A synchronous, picklable stand-in for an EngineActor handle (what `weight_sync.push_weights` drives): every
    member of the engine's control surface, each a blocking Ray call; the methods are generated below."""

    def __init__(self, handle: Any, timeout_s: float | None = None) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self._handle, name).remote(*args, **kwargs), timeout=self._timeout_s)


def _host_copies(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(name, t.detach().to("cpu", copy=True)) for name, t in named]


def _actor_method(member: Member) -> Callable[..., Any]:
    """EngineActor's forwarder of one member: awaited, run in a worker thread, or called inline (cheap ones)."""
    name = member.name
    if member.is_attribute:
        async def forward(self):
            return getattr(self.engine, name)
    elif member.is_async:
        async def forward(self, *args, **kwargs):
            return await getattr(self.engine, name)(*args, **kwargs)
    elif member.blocking:
        async def forward(self, *args, **kwargs):
            result = await asyncio.to_thread(getattr(self.engine, name), *args, **kwargs)
            return _host_copies(result) if member.host_tensors else result
    else:
        async def forward(self, *args, **kwargs):
            return getattr(self.engine, name)(*args, **kwargs)
    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = member.doc
    return forward


def _proxy_member(member: Member) -> Any:
    """EngineProxy's member: a blocking Ray call of the actor's method of the same name (a property for attributes)."""
    name = member.name
    if member.is_attribute:
        return property(lambda self: self._call(name), doc=member.doc)

    def call(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = member.doc
    return call


for _member in MEMBERS.values():
    setattr(EngineActor, _member.name, _actor_method(_member))
    setattr(EngineProxy, _member.name, _proxy_member(_member))


class RolloutManagerActor:
    """Ray actor around RolloutManager: prompt data, per-policy routers over the engines, health checks."""

    def __init__(self, rollout: RolloutConfig, data: DataConfig, engines: dict[str, list[str | Any]],
                 tokenizer_path: str, env_config: EnvConfig | None = None,
                 health_check_interval: float = 10.0, api_key: str | None = None,
                 health_timeout: float = 10.0, engine_prompt_limit: int | None = None,
                 eval_sets: list[EvalSet] | None = None, stall_window: float = 300.0) -> None:
        """`engines` maps each policy to its engines: HTTP base URLs (reached with `api_key`, the run's token), or
        EngineActor handles (Ray calls). A health probe unanswered within `health_timeout` seconds is slow (the
        engine stays in rotation); an engine dead, not ok, or silent for `stall_window` seconds while it holds
        requests leaves its router's rotation (its requests move to the others). `eval_sets`: the --eval-config
        sets (None: read from `data.eval_config`), evaluated beside --eval-prompt-data (the set 'default')."""
        from transformers import AutoTokenizer

        _setup_logging()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._api_key = api_key
        self.routers: dict[str, Router] = {}
        for policy, targets in engines.items():
            clients = [self._client(policy, i, t) for i, t in enumerate(targets)]
            self.routers[policy] = Router(clients, page_size=rollout.router_page_size,
                                          balance_threshold=rollout.router_balance_threshold,
                                          health_timeout=health_timeout, stall_window=stall_window)
        limit = engine_prompt_limit  # rows with longer prompts are dropped at load, not failed every epoch
        dataset = PromptDataset(data, self.tokenizer, engine_prompt_limit=limit) if data.prompt_data else None
        eval_data = (PromptDataset(data, self.tokenizer, data.eval_prompt_data, engine_prompt_limit=limit)
                     if data.eval_prompt_data else None)
        if eval_sets is None:
            eval_sets = load_eval_config(data.eval_config, rollout, data) if data.eval_config else []
        extra = [(spec, PromptDataset(spec.data_config(data), self.tokenizer, spec.path, engine_prompt_limit=limit))
                 for spec in eval_sets]
        self.manager = RolloutManager(rollout, dataset, self.routers, self.tokenizer, eval_data=eval_data,
                                      env_config=env_config, eval_sets=extra)
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

    async def next_batch(self, step: int, version: int) -> RolloutBatch:
        """--async-mode fully: the next ready groups within --max-staleness of the trainer's weight `version`."""
        self._start_health_checks()
        return await self.manager.next_batch(step, version)

    async def stop_stream(self) -> None:
        """--async-mode fully: stop generating (abort what is in flight)."""
        await self.manager.stop_stream()

    async def evaluate(self) -> dict[str, float]:
        """Metrics over every eval set (eval/... for --eval-prompt-data, eval/<name>/... for --eval-config's)."""
        self._start_health_checks()
        return await self.manager.evaluate()

    async def flush_cache(self, policy: str) -> None:
        """Forget routed prefixes of `policy`'s engines (their caches were flushed by a weight update)."""
        await self.routers[policy].flush_cache()

    def _client(self, policy: str, index: int, target: str | Any) -> HttpEngineClient | LocalEngineClient:
        if isinstance(target, str):
            return HttpEngineClient(target, api_key=self._api_key)
        return LocalEngineClient(target, name=f"{policy}-engine-{index}")

    async def replace_engine(self, policy: str, index: int, target: str | Any) -> None:
        """Put a restarted engine (its URL or actor handle), whose weights the driver has verified, in engine
        `index`'s place of `policy`'s router, in rotation."""
        if policy not in self.routers:
            raise ValueError(f"replace_engine: unknown policy {policy!r}; the policies are {sorted(self.routers)}")
        router = self.routers[policy]
        if not 0 <= index < len(router.clients):
            raise ValueError(f"replace_engine: policy {policy!r} has engines 0..{len(router.clients) - 1}, "
                             f"not {index}")
        old = router.clients[index]
        router.replace_client(index, self._client(policy, index, target))
        if isinstance(old, HttpEngineClient):
            await old.aclose()

    async def engine_events(self) -> dict[str, list[dict[str, Any]]]:
        """{policy: its router's rotation changes since the last call} (`Router.take_events`: an engine left the
        rotation and why, or came back), for the driver's log."""
        return {policy: events for policy, router in self.routers.items() if (events := router.take_events())}

    async def state_dict(self) -> dict[str, Any]:
        return self.manager.state_dict()

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self.manager.load_state_dict(state)
