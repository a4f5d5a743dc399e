"""Cache-aware request router over several engine clients.

Routing, in order: a known `session_id` stays on its engine (an episode keeps its
KV cache); otherwise the engine that most recently served the longest page-aligned
prefix of the request (its radix cache likely still holds it), unless that engine
is `balance_threshold` requests busier than the least-loaded one; otherwise the
engine with the fewest requests in flight. An engine that fails to answer leaves the
rotation (the request is retried on another) until a health check passes again.

Health checks have their own short timeout (`health_timeout`): an engine that does not
answer one in time (stopped, hung, partitioned) leaves the rotation, and the requests it
holds are cancelled and retried on the other engines, so a stalled engine costs a run at
most one health period plus that timeout, not the HTTP client's long request timeout.
`replace_client(i, client)` puts a restarted engine back in engine i's place. Every change of the rotation
is logged here and kept for `take_events()`, so a caller in another process (the rollout manager's
driver) can log it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from rollout.client import EngineClient, EngineUnavailableError

logger = logging.getLogger(__name__)


class NoHealthyEngineError(EngineUnavailableError):
    """Every engine behind the router is out of rotation."""


@dataclass
class EngineStats:
    """Counters of one engine since the last `Router.take_stats()`."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0


def page_hashes(input_ids: Sequence[int], page_size: int) -> list[int]:
    """Chained hashes of the full pages of `input_ids`: entry k identifies the prefix ids[:(k+1)*page_size]."""
    hashes, h = [], 0
    for start in range(0, len(input_ids) - page_size + 1, page_size):
        h = hash((h, tuple(input_ids[start:start + page_size])))
        hashes.append(h)
    return hashes


class Router:
    """An EngineClient that spreads requests over several engine clients, cache- and load-aware."""

    def __init__(self, clients: Sequence[EngineClient], *, page_size: int = 16, balance_threshold: int = 16,
                 max_prefixes_per_engine: int = 65536, max_sessions: int = 65536,
                 health_timeout: float = 10.0) -> None:
        if not clients:
            raise ValueError("Router needs at least one engine client")
        if page_size < 1:
            raise ValueError(f"page_size = {page_size}: expected >= 1")
        if not health_timeout > 0:
            raise ValueError(f"health_timeout = {health_timeout}: expected seconds > 0")
        self.health_timeout = health_timeout
        self.clients = list(clients)
        self.page_size = page_size
        self.balance_threshold = balance_threshold
        self.max_prefixes_per_engine = max_prefixes_per_engine
        self.max_sessions = max_sessions
        n = len(self.clients)
        self.healthy = [True] * n
        self.outstanding = [0] * n
        self.stats = [EngineStats() for _ in range(n)]
        self._prefixes: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n)]  # LRU sets
        self._sessions: OrderedDict[str, int] = OrderedDict()
        self._next = 0  # round-robin start among equally loaded engines
        self._health_task: asyncio.Task | None = None
        self._inflight: list[set[asyncio.Future]] = [set() for _ in range(n)]  # requests each engine holds
        self._evicted: set[asyncio.Future] = set()  # cancelled because their engine left the rotation
        self._events: list[dict[str, Any]] = []  # rotation changes since the last take_events()

    def name(self, i: int) -> str:
        """A printable name of engine i."""
        return f"engine {i} ({getattr(self.clients[i], 'name', type(self.clients[i]).__name__)})"

    def choose(self, input_ids: Sequence[int], session_id: str | None = None,
               exclude: frozenset[int] = frozenset()) -> int:
        """Index of the engine a request should go to (no side effects)."""
        return self._choose(page_hashes(input_ids, self.page_size), session_id, exclude)

    def _choose(self, hashes: list[int], session_id: str | None, exclude: frozenset[int]) -> int:
        """`choose` for a request whose page hashes are `hashes`."""
        candidates = [i for i in range(len(self.clients)) if self.healthy[i] and i not in exclude]
        if not candidates:
            down = ", ".join(self.name(i) for i in range(len(self.clients)))
            raise NoHealthyEngineError(f"no healthy engine left to serve the request: {down}")
        least = min(self.outstanding[i] for i in candidates)
        if session_id is not None and self._sessions.get(session_id) in candidates:
            return self._sessions[session_id]
        best, best_len = None, 0
        for i in candidates:
            prefixes = self._prefixes[i]
            matched = 0
            for k in range(len(hashes) - 1, best_len - 1, -1):  # longest first; only look for improvements
                if hashes[k] in prefixes:
                    matched = k + 1
                    break
            if matched > best_len or (matched == best_len and best is not None and matched > 0
                                      and self.outstanding[i] < self.outstanding[best]):
                best, best_len = i, matched
        if best is not None and self.outstanding[best] - least <= self.balance_threshold:
            return best
        n = len(self.clients)
        ordered = sorted(candidates, key=lambda i: (self.outstanding[i], (i - self._next) % n))
        return ordered[0]

    def _record(self, i: int, hashes: list[int], session_id: str | None) -> None:
        self._next = (i + 1) % len(self.clients)
        prefixes = self._prefixes[i]
        for h in hashes:
            prefixes[h] = None
            prefixes.move_to_end(h)
        while len(prefixes) > self.max_prefixes_per_engine:
            prefixes.popitem(last=False)
        if session_id is not None:
            self._sessions[session_id] = i
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def mark_unhealthy(self, i: int, reason: str) -> None:
        """Take engine i out of rotation, forget what it cached, and move its requests to other engines."""
        if self.healthy[i]:
            self._event(i, False, f"{self.name(i)} leaves the rotation: {reason}")
        self.healthy[i] = False
        self._prefixes[i].clear()
        for request in list(self._inflight[i]):
            if not request.done():
                self._evicted.add(request)
                request.cancel()

    def replace_client(self, i: int, client: EngineClient) -> None:
        """Put `client` (a restarted engine) in engine i's place, in rotation, with nothing cached or routed."""
        self.mark_unhealthy(i, "replaced")
        self.clients[i] = client
        self._prefixes[i].clear()
        for session in [s for s, engine in self._sessions.items() if engine == i]:
            del self._sessions[session]
        self.healthy[i] = True
        self._event(i, True, f"{self.name(i)} is in rotation (restarted)")

    def _event(self, engine: int, in_rotation: bool, message: str) -> None:
        logger.log(logging.INFO if in_rotation else logging.WARNING, "%s", message)
        self._events.append({"engine": engine, "in_rotation": in_rotation, "message": message})
        del self._events[:-1000]   # a caller that never takes them keeps the last 1000

    def take_events(self) -> list[dict[str, Any]]:
        """The rotation changes since the last call, oldest first: {"engine": index, "in_rotation": False when it
        left (and "message" says why), True when it came back}."""
        events, self._events = self._events, []
        return events

    async def generate(self, input_ids: Sequence[int], sampling_params: dict[str, Any],
                       return_logprob: bool = True, session_id: str | None = None) -> dict[str, Any]:
        """Route one request; on an unreachable engine, retry on the others."""
        hashes = page_hashes(input_ids, self.page_size)  # once per request: it hashes the whole prompt
        tried: set[int] = set()
        while True:
            i = self._choose(hashes, session_id, frozenset(tried))
            tried.add(i)
            self._record(i, hashes, session_id)
            self.outstanding[i] += 1
            request = asyncio.ensure_future(self.clients[i].generate(
                input_ids, sampling_params, return_logprob=return_logprob, session_id=session_id))
            self._inflight[i].add(request)
            try:
                response = await request
            except EngineUnavailableError as e:
                self.stats[i].failures += 1
                self.mark_unhealthy(i, str(e))
                continue
            except asyncio.CancelledError:
                if request not in self._evicted:  # the caller cancelled us: cancel the engine request too
                    request.cancel()
                    raise
                self.stats[i].failures += 1  # its engine left the rotation: retry elsewhere
                continue
            finally:
                self.outstanding[i] -= 1
                self._inflight[i].discard(request)
                self._evicted.discard(request)
            meta = response.get("meta_info", {})
            stats = self.stats[i]
            stats.requests += 1
            stats.prompt_tokens += int(meta.get("prompt_tokens", len(input_ids)))
            stats.cached_tokens += int(meta.get("cached_tokens", 0))
            stats.completion_tokens += int(meta.get("completion_tokens", len(response.get("output_ids", ()))))
            return response

    async def check_health(self) -> list[bool]:
        """Ask every engine (each answer within `health_timeout`); failing ones leave the rotation, recovered
        ones return. Returns the health list."""
        async def ask(client: EngineClient) -> Any:
            return await asyncio.wait_for(client.health(), self.health_timeout)

        results = await asyncio.gather(*(ask(c) for c in self.clients), return_exceptions=True)
        for i, ok in enumerate(results):
            if ok is True:
                if not self.healthy[i]:
                    self._event(i, True, f"{self.name(i)} is back in rotation")
                    self.healthy[i] = True
            elif isinstance(ok, asyncio.TimeoutError):
                self.mark_unhealthy(i, f"no answer to a health check within {self.health_timeout:g}s (stalled?)")
            else:
                why = f"{type(ok).__name__}: {ok}" if isinstance(ok, BaseException) else f"answered {ok!r}"
                self.mark_unhealthy(i, f"health check failed ({why})")
        return list(self.healthy)

    async def health(self) -> bool:
        """True if at least one engine is healthy."""
        return any(await self.check_health())

    def start_health_checks(self, interval: float = 10.0) -> None:
        """Check health every `interval` seconds in the running event loop until `stop_health_checks`."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.check_health()
        self.stop_health_checks()
        self._health_task = asyncio.get_running_loop().create_task(loop())

    def stop_health_checks(self) -> None:
        """Stop the periodic health checks."""
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None

    async def abort_all(self) -> None:
        """Abort every request in flight on every healthy engine."""
        await self._broadcast("abort_all")

    async def flush_cache(self) -> None:
        """Flush every healthy engine's cache (after a weight update) and forget routed prefixes."""
        await self._broadcast("flush_cache")
        for prefixes in self._prefixes:
            prefixes.clear()

    async def _broadcast(self, method: str) -> None:
        live = [i for i in range(len(self.clients)) if self.healthy[i]]
        results = await asyncio.gather(*(getattr(self.clients[i], method)() for i in live), return_exceptions=True)
        for i, r in zip(live, results):
            if isinstance(r, EngineUnavailableError):
                self.mark_unhealthy(i, str(r))
            elif isinstance(r, BaseException):
                logger.warning("%s: %s failed: %r", self.name(i), method, r)

    def take_stats(self) -> list[EngineStats]:
        """Per-engine counters since the last call, and reset them."""
        stats, self.stats = self.stats, [EngineStats() for _ in self.clients]
        return stats
