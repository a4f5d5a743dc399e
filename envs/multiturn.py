"""The default multi-turn generate function: model turn -> `env.step` -> observation appended, tokens in/out.

The Sample's tokens are exactly what the engine saw and produced. Model tokens are appended as the
engine returned them (`rollout.generate.append_response`: loss_mask 1, the engine's log-probs); only the
text that follows them -- the end of the assistant turn and the observation turn rendered by the chat
template -- is tokenised, and appended with loss_mask 0 and log-prob 0.0 (`Sample.append`). Nothing is
ever re-tokenised, so nothing drifts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Any

from envs.base import Env, EnvError, run_reset, run_step
from kiln_common.sample import Sample, Status
from rollout.client import EngineClient
from rollout.generate import append_response

logger = logging.getLogger(__name__)

_PLACEHOLDER = "KILN_TURN_PLACEHOLDER_7F3A"


def record_cache_stats(metadata: dict[str, Any], meta_info: dict[str, Any]) -> None:
    """Add one engine response's prompt and cached token counts to `metadata` and update its cache_hit_rate."""
    metadata["prompt_tokens"] = metadata.get("prompt_tokens", 0) + int(meta_info.get("prompt_tokens", 0))
    metadata["cached_tokens"] = metadata.get("cached_tokens", 0) + int(meta_info.get("cached_tokens", 0))
    prompt = metadata["prompt_tokens"]
    metadata["cache_hit_rate"] = metadata["cached_tokens"] / prompt if prompt else 0.0


class ChatDelta:
    """Renders, with the tokenizer's chat template, only the text that a new conversation turn adds."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PLACEHOLDER}]
        rendered = self.render(self._probe)
        if _PLACEHOLDER not in rendered:
            raise ValueError("the chat template does not render assistant content verbatim; cannot find turn ends")
        self._probe_text = rendered
        self.turn_end = rendered[rendered.rindex(_PLACEHOLDER) + len(_PLACEHOLDER):]  # e.g. "<|im_end|>\n"
        self._special_ids = set(tokenizer.all_special_ids)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text for a whole conversation."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the opening conversation, ending with the assistant generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def turn_text(self, role: str, content: str) -> str:
        """Text of one non-assistant turn plus the next assistant generation prompt."""
        return self.turns_text([{"role": role, "content": content}])

    def turns_text(self, messages: list[dict[str, str]]) -> str:
        """Text of non-assistant turns (possibly none) plus the next assistant generation prompt."""
        full = self.render(self._probe + list(messages), add_generation_prompt=True)
        if not full.startswith(self._probe_text):
            roles = [m["role"] for m in messages]
            raise ValueError(f"the chat template re-renders earlier turns when {roles} turns are added; "
                             "incremental rendering needs a prefix-stable template")
        return full[len(self._probe_text):]

    def _closing_token(self, generated_ids: list[int]) -> str:
        """Text of the last generated token if it is a special token that begins the turn end (the eos)."""
        if generated_ids and generated_ids[-1] in self._special_ids:
            stop_text = self.tokenizer.decode([generated_ids[-1]], skip_special_tokens=False)
            if self.turn_end.startswith(stop_text):
                return stop_text
        return ""

    def assistant_text(self, generated_ids: list[int]) -> str:
        """The model turn's content: its tokens decoded with special tokens (tool-call tags) kept, minus the eos."""
        ids = generated_ids[:-1] if self._closing_token(generated_ids) else generated_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def observation_ids(self, generated_ids: list[int], role: str, content: str) -> list[int]:
        """Tokens after a model turn: what closes that turn (unless generated) and the next turn's text."""
        return self.continuation_ids(generated_ids, [{"role": role, "content": content}])

    def continuation_ids(self, generated_ids: list[int], messages: list[dict[str, str]]) -> list[int]:
        """Tokens after a model turn: what closes that turn (unless generated), the new turns, the generation prompt."""
        end = self.turn_end[len(self._closing_token(generated_ids)):]
        return self.encode(end + self.turns_text(messages))


def _opening_messages(sample: Sample, observation: str, system: str | None) -> list[dict[str, str]]:
    messages = [dict(m) for m in sample.prompt] if isinstance(sample.prompt, list) else []
    if observation:
        messages.append({"role": "user", "content": observation})
    elif isinstance(sample.prompt, str) and sample.prompt:
        messages.append({"role": "user", "content": sample.prompt})
    if system:
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}
        else:
            messages.insert(0, {"role": "system", "content": system})
    if not messages:
        raise ValueError(f"sample {sample.index}: empty prompt and the env's reset returned no observation")
    return messages


async def _drive(client: EngineClient, chat: ChatDelta, env: Env, sample: Sample,
                 sampling_params: dict[str, Any], max_turns: int, max_total_tokens: int,
                 step_timeout: float | None, session_id: str | None) -> None:
    observation = await run_reset(env, sample, timeout=step_timeout)
    messages = _opening_messages(sample, observation, env.system_prompt())
    sample.metadata["messages"] = messages
    sample.tokens = chat.prompt_ids(messages)
    if len(sample.tokens) >= max_total_tokens:
        sample.status = Status.TRUNCATED
        sample.error = f"prompt has {len(sample.tokens)} tokens, max_total_tokens is {max_total_tokens}"
        return
    rewards: list[float] = sample.metadata["step_rewards"]
    for turn in range(1, max_turns + 1):
        params = dict(sampling_params)
        budget = max_total_tokens - len(sample.tokens)
        params["max_new_tokens"] = min(int(params.get("max_new_tokens", budget)), budget)
        output = await client.generate(input_ids=list(sample.tokens), sampling_params=params, return_logprob=True,
                                       session_id=session_id)
        append_response(sample, output)
        ids, meta = list(output["output_ids"]), output["meta_info"]
        record_cache_stats(sample.metadata, meta)
        sample.metadata["turns"] = turn
        sample.metadata["weight_versions"].append(int(meta.get("weight_version", 0)))
        text = chat.assistant_text(ids)
        messages.append({"role": "assistant", "content": text})
        if sample.status is Status.ABORTED:  # append_response set it from the finish_reason
            sample.error = f"engine aborted turn {turn}"
            return
        if len(sample.tokens) >= max_total_tokens:
            sample.status = Status.TRUNCATED
            return
        result = await run_step(env, text, timeout=step_timeout, step=turn)
        rewards.append(result.reward)
        if result.done:
            sample.status = Status.COMPLETED
            return
        if turn == max_turns:
            sample.status = Status.TRUNCATED
            return
        role = str(result.info.get("role", "user"))
        delta = chat.observation_ids(ids, role, result.observation)
        if len(sample.tokens) + len(delta) >= max_total_tokens:
            sample.status = Status.TRUNCATED
            return
        sample.append(delta, loss_mask=0)
        messages.append({"role": role, "content": result.observation})


async def play_to_end(env: Any, play: Awaitable[None], *, step_timeout: float | None, episode_timeout: float | None,
                      label: str) -> tuple[Status, str] | None:
    """Await an episode's `play`, then close `env` (an Env or a MultiAgentEnv); the (status, error) it failed with.

    None when `play` finished; ABORTED when it ran past `episode_timeout` (its `asyncio.wait_for`), FAILED on
    an `EnvError` or any other exception (engine or data errors fail the episode, not the run). A failing
    `env.close()` is logged, never raised.
    """
    try:
        await play
        return None
    except asyncio.TimeoutError:
        return Status.ABORTED, f"episode ran past episode_timeout={episode_timeout:g}s"
    except EnvError as e:
        return Status.FAILED, str(e)
    except Exception as e:
        logger.warning("%s failed: %s: %s", label, type(e).__name__, e)
        return Status.FAILED, f"{type(e).__name__}: {e}"
    finally:
        try:
            await asyncio.wait_for(env.close(), step_timeout)
        except Exception as e:
            logger.warning("closing env %s failed: %s: %s", env.display_name, type(e).__name__, e)


async def run_episode(client: EngineClient, tokenizer, env: Env, sample: Sample,
                      sampling_params: dict[str, Any], *, max_turns: int, max_total_tokens: int,
                      step_timeout: float | None, episode_timeout: float | None = None,
                      session_id: str | None = None) -> Sample:
    """Play one episode of `env` with the engine behind `client`; fill and return `sample`.

    Every turn is requested under `session_id` (if given), so a router keeps the episode on one engine;
    `sample.metadata` gets the episode's prompt_tokens, cached_tokens and cache_hit_rate over its turns.

    Ends when the env says done (COMPLETED), after `max_turns` model turns or at `max_total_tokens`
    (TRUNCATED), when the engine aborts or `episode_timeout` passes (ABORTED), or when the env or the
    engine fails (FAILED, with `sample.error`). The reward is the sum of the step rewards.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if max_total_tokens < 2:
        raise ValueError(f"max_total_tokens must be >= 2, got {max_total_tokens}")
    if episode_timeout is not None and not (episode_timeout > 0 and math.isfinite(episode_timeout)):
        raise ValueError(f"episode_timeout must be a positive number of seconds or None, got {episode_timeout!r}")
    chat = ChatDelta(tokenizer)
    sample.tokens, sample.response_length, sample.loss_mask, sample.rollout_logprobs = [], 0, [], []
    sample.status, sample.error = Status.PENDING, None
    sample.metadata.update(turns=0, step_rewards=[], weight_versions=[], env=env.display_name,
                           prompt_tokens=0, cached_tokens=0, cache_hit_rate=0.0)
    play = asyncio.wait_for(_drive(client, chat, env, sample, sampling_params, max_turns, max_total_tokens,
                                   step_timeout, session_id), episode_timeout)
    failure = await play_to_end(env, play, step_timeout=step_timeout, episode_timeout=episode_timeout,
                                label=f"episode of sample {sample.index}")
    if failure is not None:
        sample.status, sample.error = failure
    sample.reward = float(sum(sample.metadata["step_rewards"]))
    versions = sample.metadata["weight_versions"]
    sample.weight_version = min(versions) if versions else 0
    sample.response = tokenizer.decode(sample.response_tokens, skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
    return sample
