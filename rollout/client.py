"""Engine clients: the small async interface generate functions use to call inference engines.

Every client returns SGLang's response dict {"text", "output_ids", "meta_info"}.
`LocalEngineClient` calls an in-process `Engine` (or a Ray actor handle of one),
`HttpEngineClient` an engine's HTTP server, and `rollout.router.Router` spreads
requests over several clients.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Protocol, Sequence, runtime_checkable

import httpx

from kiln_common.errors import EngineNotServingError

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine rejected or failed a request (retrying elsewhere would not help)."""


class EngineUnavailableError(EngineError):
    """The engine could not be reached or is overloaded (another engine may serve the request)."""


class EngineTimeoutError(EngineUnavailableError):
    """The engine did not answer in time: slow (a loaded machine), not known dead. A router retries the request
    and keeps the engine in rotation (`rollout.router`)."""


@runtime_checkable
class EngineClient(Protocol):
    """What generate functions, envs (`envs.multiturn`, `envs.multiagent`) and the router need from an engine.

    Generate functions and envs call only `generate`; the rest serves the router and the run's control.
    """

    async def generate(self, input_ids: Sequence[int], sampling_params: dict[str, Any],
                       return_logprob: bool = True, session_id: str | None = None) -> dict[str, Any]:
        """Generate one continuation of `input_ids`: SGLang's response dict (a router keeps a session on one engine)."""
        ...

    async def health(self) -> bool:
        """True if the engine answers and reports itself ok."""
        ...

    async def abort_all(self) -> None:
        """Abort every request in flight; each returns its partial output with finish_reason 'abort'."""
        ...

    async def flush_cache(self) -> None:
        """Drop the engine's prefix cache."""
        ...


def check_response(response: Any, return_logprob: bool, where: str) -> dict[str, Any]:
    """Validate an engine response dict and return it; EngineError naming `where` if malformed."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if not isinstance(response, dict) or "output_ids" not in response or "meta_info" not in response:
        raise EngineError(f"{where}: malformed response (expected a dict with output_ids and meta_info): "
                          f"{str(response)[:200]}")
    meta = response["meta_info"]
    if return_logprob and len(meta.get("output_token_logprobs", ())) != len(response["output_ids"]):
        raise EngineError(f"{where}: {len(response['output_ids'])} output ids but "
                          f"{len(meta.get('output_token_logprobs', ()))} output_token_logprobs")
    return response


def report_ok(report: Any) -> bool:
    """Whether an engine's health answer means ok: a report {"ok": true, ...}, an older {"status": "ok"}, or True."""
    if isinstance(report, dict):
        return report.get("ok", report.get("status") == "ok") is True
    return report is True


def _last_line(e: BaseException) -> str:
    """The last line of an error's text (a Ray error's is the cause's message, after its traceback)."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _actor_gone(e: BaseException) -> bool:
    """Whether `e` says a Ray actor died or is unreachable (RayActorError and its subclasses)."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return False
    return isinstance(e, RayActorError)


class LocalEngineClient:
    """A client over an in-process `inference_engine.Engine`, or a Ray actor handle of one.

    Like the HTTP client's connection errors, an engine that refuses requests for now (`EngineNotServingError`:
    memory released) and an actor that died or cannot be reached (Ray's `RayActorError`, e.g. `ActorDiedError`)
    raise `EngineUnavailableError`, so a router retries the request on another engine.
    """

    def __init__(self, engine: Any, name: str = "local") -> None:
        self.engine = engine
        self.name = name
        self._is_actor = hasattr(getattr(engine, "async_generate", None), "remote")

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.engine, method)
        try:
            if self._is_actor:
                return await fn.remote(*args, **kwargs)
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except EngineNotServingError as e:   # over Ray too: the task error is also an instance of its cause
            raise EngineUnavailableError(f"engine {self.name} refused {method}: {_last_line(e)}") from e
        except Exception as e:
            if self._is_actor and _actor_gone(e):
                raise EngineUnavailableError(f"engine {self.name} (Ray actor) is gone: {type(e).__name__}: "
                                             f"{_last_line(e)}") from e
            raise

    async def generate(self, input_ids: Sequence[int], sampling_params: dict[str, Any],
                       return_logprob: bool = True, session_id: str | None = None) -> dict[str, Any]:
        """Generate through `engine.async_generate`."""
        response = await self._call("async_generate", input_ids=list(input_ids),
                                    sampling_params=dict(sampling_params), return_logprob=return_logprob)
        return check_response(response, return_logprob, self.name)

    async def health(self) -> bool:
        """True if the engine's health report says ok (an engine without `health` counts as ok); False if it says
        otherwise or the call raises."""
        try:
            if not hasattr(self.engine, "health"):
                return True
            return report_ok(await self._call("health"))
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            logger.warning("engine %s failed its health check: %s", self.name, e)
            return False

    async def abort_all(self) -> None:
        """Abort every request in flight through `engine.abort(abort_all=True)`."""
        await self._call("abort", abort_all=True)

    async def flush_cache(self) -> None:
        """Flush the engine's radix cache."""
        await self._call("flush_cache")


class HttpEngineClient:
    """A client over an engine's HTTP server (POST /generate, GET /health, /abort_request, /flush_cache).

    `api_key`: the engine's token, sent as `Authorization: Bearer <api_key>` with every request.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float | None = 600.0,
                 connect_timeout: float = 10.0, max_retries: int = 3, retry_backoff: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if max_retries < 0:
            raise ValueError(f"max_retries = {max_retries}: expected >= 0")
        if api_key is not None and (not api_key or any(c.isspace() for c in api_key)):
            raise ValueError("api_key must be a non-empty token without whitespace")
        self._headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self.base_url = base_url.rstrip("/")
        self.name = self.base_url
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # an AsyncClient is bound to one event loop
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, transport=self._transport,
                                             headers=self._headers)
            self._loop = loop
        return self._client

    async def _request(self, method: str, path: str, json: Any = None, retry: bool = True) -> httpx.Response:
        attempts = 1 + (self.max_retries if retry else 0)
        for attempt in range(attempts):
            try:
                response = await self._http().request(method, path, json=json)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
                if attempt + 1 < attempts:
                    logger.warning("%s%s: %s; retry %d/%d", self.base_url, path, e, attempt + 1, self.max_retries)
                    await asyncio.sleep(self.retry_backoff * 2 ** attempt)
                    continue
                error = EngineTimeoutError if isinstance(e, httpx.ConnectTimeout) else EngineUnavailableError
                raise error(f"engine {self.base_url} unreachable at {path} after {attempts} attempt(s): {e!r}") from e
            except httpx.TimeoutException as e:
                raise EngineTimeoutError(f"engine {self.base_url}{path} timed out: {e!r}") from e
            except httpx.HTTPError as e:
                raise EngineUnavailableError(f"engine {self.base_url}{path} failed: {e!r}") from e
            if response.status_code in (502, 503, 504):
                raise EngineUnavailableError(
                    f"engine {self.base_url}{path} answered {response.status_code}: {response.text[:200]}")
            if response.status_code >= 400:
                raise EngineError(f"engine {self.base_url}{path} answered {response.status_code}: "
                                  f"{response.text[:500]}")
            return response
        raise AssertionError("unreachable")

    async def generate(self, input_ids: Sequence[int], sampling_params: dict[str, Any],
                       return_logprob: bool = True, session_id: str | None = None) -> dict[str, Any]:
        """POST /generate with SGLang's JSON body."""
        payload = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params),
                   "return_logprob": return_logprob}
        response = await self._request("POST", "/generate", json=payload)
        try:
            body = response.json()
        except ValueError as e:
            raise EngineError(f"engine {self.base_url}/generate returned invalid JSON: {response.text[:200]}") from e
        return check_response(body, return_logprob, self.base_url)

    async def health(self) -> bool:
        """GET /health answers 200 (Kiln's engines: with a report whose "ok" is true; a body without a report, as
        SGLang's, counts as ok); 503 or any other error: False. No answer within the HTTP timeout raises
        `EngineTimeoutError` (slow, not known dead: a router keeps the engine in rotation)."""
        try:
            response = await self._request("GET", "/health", retry=False)
        except EngineTimeoutError:
            raise
        except EngineError:
            return False
        try:
            body = response.json()
        except ValueError:
            return True
        return not (isinstance(body, dict) and "ok" in body) or body["ok"] is True

    async def abort_all(self) -> None:
        """POST /abort_request for every request in flight."""
        await self._request("POST", "/abort_request", json={"rid": "", "abort_all": True})

    async def flush_cache(self) -> None:
        """POST /flush_cache."""
        await self._request("POST", "/flush_cache")

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
