"""Cache-aware request router over several engine clients.

Routing, in order: a known `session_id` stays on its engine (an episode keeps its
KV cache); otherwise the engine that most recently served the longest page-aligned
prefix of the request (its radix cache likely still holds it), unless that engine
is `balance_threshold` requests busier than the least-loaded one; otherwise the
engine with the fewest requests in flight. An engine that fails to answer leaves the
rotation (the request is retried on another) until a health check passes again.

Health checks tell a slow engine from a dead one (docs/architecture.md, *Fault tolerance*). A probe that
does not answer within `health_timeout` is a *slow probe*: counted (`EngineStats.slow_probes`) and logged,
and the engine stays in rotation with its requests, which finish there. A request that times out
(`EngineTimeoutError`) is retried, on another engine if one is in rotation, else on the same one. An engine
leaves the rotation only when it is dead or says so: a request fails with `EngineUnavailableError`
(connection refused, actor died), its probe answers not ok (scheduler thread gone, a stall the engine
measured itself), or a stall is confirmed here: no sign of life (an answered probe or a finished request)
for `stall_window` seconds while it holds requests. Then its requests are cancelled and retried on the
other engines, or fail with `NoHealthyEngineError` when none is left.
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

from rollout.client import EngineClient, EngineTimeoutError, EngineUnavailableError

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
    slow_probes: int = 0   # health probes without an answer within the probe timeout (the engine stayed in rotation)
    timeouts: int = 0      # requests that timed out and were retried (the engine stayed in rotation)


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
                 health_timeout: float = 10.0, stall_window: float = 300.0,
                 clock: Any = None) -> None:
        """`health_timeout`: seconds a health probe may take before it counts as slow (the engine stays in
        rotation). `stall_window`: seconds without any sign of life from an engine holding requests before it
        counts as stalled and leaves the rotation. `clock`: a monotonic clock in seconds (default: the running
        event loop's time; tests pass a controllable one)."""
        if not clients:
            raise ValueError("Router needs at least one engine client")
        if page_size < 1:
            raise ValueError(f"page_size = {page_size}: expected >= 1")
        if not health_timeout > 0:
            raise ValueError(f"health_timeout = {health_timeout}: expected seconds > 0")
        if not stall_window >= health_timeout:
            raise ValueError(f"stall_window = {stall_window}: expected seconds >= health_timeout ({health_timeout})")
        self.health_timeout = health_timeout
        self.stall_window = stall_window
        self._clock = clock
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
        self._last_alive: list[float | None] = [None] * n  # clock time of each engine's last sign of life
        self.unanswered = [0] * n  # health probes in a row without an answer, per engine
        self._down_reason: list[str | None] = [None] * n  # why each engine left the rotation (for failed samples)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _alive(self, i: int) -> None:
        """Engine i gave a sign of life now (a probe answered, a request finished)."""
        self._last_alive[i] = self._now()
        self.unanswered[i] = 0

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
            down = ", ".join(f"{self.name(i)}: {self._down_reason[i] or 'excluded'}" for i in range(len(self.clients)))
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
            self._down_reason[i] = reason
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
        self._down_reason[i] = None
        self._last_alive[i] = None   # its silence is counted from its next probe
        self.unanswered[i] = 0
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
        """Route one request; on an unreachable engine, retry on the others; on a timeout, retry (on another engine
        in rotation if there is one, else on the same)."""
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
            except EngineTimeoutError as e:   # slow, not dead: it stays in rotation
                self.stats[i].timeouts += 1
                others = [j for j in range(len(self.clients)) if self.healthy[j] and j not in tried]
                logger.warning("%s: %s; retrying the request on %s", self.name(i), e,
                               "another engine" if others else "the same engine (the only one in rotation)")
                if not others:
                    tried.discard(i)
                continue
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
            self._alive(i)
            meta = response.get("meta_info", {})
            stats = self.stats[i]
            stats.requests += 1
            stats.prompt_tokens += int(meta.get("prompt_tokens", len(input_ids)))
            stats.cached_tokens += int(meta.get("cached_tokens", 0))
            stats.completion_tokens += int(meta.get("completion_tokens", len(response.get("output_ids", ()))))
            return response

    async def check_health(self) -> list[bool]:
        """Probe every engine (each answer awaited `health_timeout` seconds): an ok answer keeps or brings it back
        in rotation; a not-ok answer or an error takes it out; no answer in time is a slow probe, counted and
        logged, and the engine stays in rotation unless a stall is confirmed (it holds requests and has given no
        sign of life for `stall_window` seconds). Returns the health list."""
        async def ask(client: EngineClient) -> Any:
            return await asyncio.wait_for(client.health(), self.health_timeout)

        results = await asyncio.gather(*(ask(c) for c in self.clients), return_exceptions=True)
        for i, ok in enumerate(results):
            if ok is True:
                self._alive(i)
                if not self.healthy[i]:
                    self._event(i, True, f"{self.name(i)} is back in rotation")
                    self.healthy[i] = True
                self._down_reason[i] = None
            elif isinstance(ok, (asyncio.TimeoutError, EngineTimeoutError)):
                self._slow_probe(i)
            else:
                why = f"{type(ok).__name__}: {ok}" if isinstance(ok, BaseException) else f"answered {ok!r}"
                self.mark_unhealthy(i, f"health check failed ({why})")
        return list(self.healthy)

    def _slow_probe(self, i: int) -> None:
        """Engine i's probe got no answer within `health_timeout`: count it; take the engine out of rotation only
        for a confirmed stall (requests held and no sign of life for `stall_window` seconds)."""
        now = self._now()
        if self._last_alive[i] is None:   # silent since the router started (or it was replaced): count from here
            self._last_alive[i] = now
        self.stats[i].slow_probes += 1
        self.unanswered[i] += 1
        silent = now - self._last_alive[i]
        if not self.healthy[i]:
            return
        if self.outstanding[i] > 0 and silent >= self.stall_window:
            self.mark_unhealthy(i, f"stalled: no answer to {self.unanswered[i]} health check(s) in a row and no "
                                   f"finished request for {silent:.0f}s while it holds {self.outstanding[i]} "
                                   f"request(s) (stall window {self.stall_window:g}s)")
            return
        logger.warning("%s: slow health check (no answer within %gs; %d in a row, last sign of life %.0fs ago, "
                       "%d request(s) held); kept in rotation (stall window %gs)", self.name(i), self.health_timeout,
                       self.unanswered[i], silent, self.outstanding[i], self.stall_window)

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
