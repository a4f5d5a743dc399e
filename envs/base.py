"""The environment plugin API: `Env`, `StepResult`, `EnvError` and the timeout-enforcing call helpers."""

from __future__ import annotations

import asyncio
import math
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from kiln_common.sample import Sample


@dataclass
class StepResult:
    """What an environment answers to one action."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class EnvError(RuntimeError):
    """An environment hung or raised; names the env, the step (0 = reset) and the cause."""

    def __init__(self, env_name: str, step: int, cause: str):
        self.env_name = env_name
        self.step = step
        self.cause = cause
        where = "reset" if step == 0 else f"step {step}"
        super().__init__(f"env {env_name!r} failed at {where}: {cause}")


class Env(ABC):
    """An agent environment: `reset` gives the first observation, `step` answers each model turn."""

    #: The name the env was registered under (set by `envs.register`); class name otherwise.
    env_name: str = ""

    @abstractmethod
    async def reset(self, sample: Sample) -> str:
        """Start an episode for `sample`; return the first observation (the first user turn)."""

    @abstractmethod
    async def step(self, action_text: str) -> StepResult:
        """Answer one model turn."""

    async def close(self) -> None:
        """Release the episode's resources."""

    def system_prompt(self) -> str | None:
        """Text to put in the system message (e.g. tool descriptions), or None."""
        return None

    @property
    def display_name(self) -> str:
        return self.env_name or type(self).__name__


_steps: "weakref.WeakKeyDictionary[Env, int]" = weakref.WeakKeyDictionary()


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


async def call_guarded(env: Any, step: int, coro, timeout: float | None):
    """Await an env call with a timeout; a hang or any exception becomes an `EnvError` naming env and step."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise EnvError(env.display_name, step, f"no answer within {timeout:g}s") from None
    except EnvError:
        raise
    except Exception as e:  # any env bug becomes a clear, attributable error
        raise EnvError(env.display_name, step, f"{type(e).__name__}: {e}") from e


async def run_reset(env: Env, sample: Sample, *, timeout: float | None) -> str:
    """`env.reset(sample)` with a timeout; a hang, an exception or a non-str result raise `EnvError`."""
    _check_timeout(timeout)
    _steps[env] = 0
    obs = await call_guarded(env, 0, env.reset(sample), timeout)
    if not isinstance(obs, str):
        raise EnvError(env.display_name, 0, f"reset returned {type(obs).__name__}, expected str")
    return obs


async def run_step(env: Env, action: str, *, timeout: float | None, step: int | None = None) -> StepResult:
    """`env.step(action)` with a timeout; a hang, an exception or a malformed result raise `EnvError`.

    `step` (1-based) is counted per env since its last `run_reset` unless given.
    """
    _check_timeout(timeout)
    step = _steps.get(env, 0) + 1 if step is None else step
    _steps[env] = step
    result = await call_guarded(env, step, env.step(action), timeout)
    if not isinstance(result, StepResult):
        raise EnvError(env.display_name, step, f"step returned {type(result).__name__}, expected StepResult")
    if not isinstance(result.observation, str):
        raise EnvError(env.display_name, step,
                       f"observation is {type(result.observation).__name__}, expected str")
    try:
        result.reward = float(result.reward)
    except (TypeError, ValueError):
        raise EnvError(env.display_name, step, f"reward {result.reward!r} is not a number") from None
    if not math.isfinite(result.reward):
        raise EnvError(env.display_name, step, f"reward {result.reward!r} is not finite")
    result.done = bool(result.done)
    return result
