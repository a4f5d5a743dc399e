"""Multi-agent episodes: a turn-taking dialogue between roles, each role with its own token stream, policy and reward.

Every role sees the dialogue through its own chat: its opening messages (system prompt, first user
turn), the text the other roles (or tools) address to it as user turns (loss_mask 0), and its own
generated turns (loss_mask 1, the engine's log-probs). As in `envs.multiturn`, a role's tokens are
exactly what its engine saw and produced: only the new turns are rendered and tokenised, and appended.
An episode returns one Sample per role, each tagged with the role's policy and sharing one episode id.
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envs.base import EnvError, call_guarded
from envs.multiturn import ChatDelta, play_to_end, record_cache_stats
from kiln_common.sample import Sample, Status
from rollout.client import EngineClient
from rollout.generate import append_response

_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclass
class RoleSpec:
    """One participant of an episode: its name, opening messages, and sampling overrides for its turns."""

    name: str
    messages: list[dict[str, str]]  # its chat before its first turn: system prompt, maybe a first user turn
    sampling_params: dict[str, Any] = field(default_factory=dict)  # e.g. a shorter max_new_tokens

    def __post_init__(self):
        if not isinstance(self.name, str) or not _ROLE_NAME.fullmatch(self.name):
            raise ValueError(f"role name must be an identifier-like string, got {self.name!r}")
        for m in self.messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"role {self.name!r}: opening message {m!r} needs string 'role' and 'content'")


@dataclass
class Opening:
    """How an episode starts: its roles (in a fixed order) and who speaks first."""

    roles: list[RoleSpec]
    first: str

    def __post_init__(self):
        names = [r.name for r in self.roles]
        if not names:
            raise ValueError("an episode needs at least one role")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate role names {names}")
        if self.first not in names:
            raise ValueError(f"first speaker {self.first!r} is not a role; roles: {names}")


@dataclass
class TurnResult:
    """The dialogue's answer to one role's turn: what each role is told, who speaks next, whether it ended."""

    next_role: str | None = None  # who speaks next; ignored when done
    deliver: dict[str, str] = field(default_factory=dict)  # role -> text it sees as a user turn before it speaks
    done: bool = False
    truncated: bool = False  # done because a limit of the dialogue was reached (status TRUNCATED)
    info: dict[str, Any] = field(default_factory=dict)


class MultiAgentEnv(ABC):
    """A dialogue between roles: `reset` opens it, `step(role, text)` answers each turn, `score` rewards each role."""

    env_name: str = ""

    @abstractmethod
    async def reset(self, sample: Sample) -> Opening:
        """Start an episode for `sample`: the roles' opening chats and the first speaker."""

    @abstractmethod
    async def step(self, role: str, text: str) -> TurnResult:
        """Answer `role`'s turn (`text` is its content as generated)."""

    @abstractmethod
    async def score(self) -> dict[str, float | tuple[float, dict[str, float]]]:
        """Reward of every role at the episode's end: a float, or (reward, breakdown for logging)."""

    async def close(self) -> None:
        """Release the episode's resources."""

    @property
    def display_name(self) -> str:
        return self.env_name or type(self).__name__


@dataclass
class _Stream:
    """One role's view of the episode and the Sample it becomes."""

    spec: RoleSpec
    policy: str
    client: EngineClient
    sample: Sample
    messages: list[dict[str, str]]
    pending: list[dict[str, str]] = field(default_factory=list)  # turns addressed to it, not yet tokenised
    last_ids: list[int] | None = None  # its last generated turn; None before it first speaks

    def prepare(self, chat: ChatDelta) -> None:
        """Tokenise what the role has not yet seen: its opening (first turn) or the turns since it last spoke."""
        if self.last_ids is None:
            self.messages.extend(self.pending)
            if not self.messages:
                raise ValueError(f"role {self.spec.name!r} has no opening messages and nothing was said to it")
            self.sample.prompt = copy.deepcopy(self.messages)
            self.sample.tokens = chat.prompt_ids(self.messages)
        else:
            self.sample.append(chat.continuation_ids(self.last_ids, self.pending), loss_mask=0)
            self.messages.extend(self.pending)
        self.pending = []


def _check_limits(max_turns: int, max_total_tokens: int, episode_timeout: float | None) -> None:
    if not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
    if not isinstance(max_total_tokens, int) or max_total_tokens < 2:
        raise ValueError(f"max_total_tokens must be an integer >= 2, got {max_total_tokens!r}")
    if episode_timeout is not None and not (episode_timeout > 0 and math.isfinite(episode_timeout)):
        raise ValueError(f"episode_timeout must be a positive number of seconds or None, got {episode_timeout!r}")


def _role_sample(sample: Sample, role: str, policy: str, episode_id: str) -> Sample:
    out = copy.deepcopy(sample)
    out.tokens, out.response_length, out.loss_mask, out.rollout_logprobs = [], 0, [], []
    out.response, out.reward, out.status, out.error, out.policy = "", None, Status.PENDING, None, policy
    out.metadata.update(episode_id=episode_id, role=role, turns=0, weight_versions=[], messages=[],
                        prompt_tokens=0, cached_tokens=0, cache_hit_rate=0.0)
    return out


def _normalise_reward(role: str, value: Any) -> tuple[float, dict[str, float]]:
    """(reward, breakdown) from what `score` gave for `role`; ValueError naming the value if malformed."""
    reward, breakdown = value if isinstance(value, tuple) and len(value) == 2 else (value, {})
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"reward for role {role!r} is {value!r}; expected a finite number or (number, dict)")
    if not isinstance(breakdown, dict):
        raise ValueError(f"reward breakdown for role {role!r} is {type(breakdown).__name__}, expected a dict")
    return float(reward), dict(breakdown)


class _Episode:
    """The state of one running dialogue (kept outside the timeout so a cut-off episode still returns samples)."""

    def __init__(self, env: MultiAgentEnv, sample: Sample, chat: ChatDelta, episode_id: str):
        self.env, self.sample, self.chat, self.episode_id = env, sample, chat, episode_id
        self.streams: dict[str, _Stream] = {}
        self.status = Status.PENDING
        self.error: str | None = None
        self.turns = 0

    def open(self, opening: Any, policies: Mapping[str, str] | None, clients: Mapping[str, EngineClient]) -> str:
        if not isinstance(opening, Opening):
            raise EnvError(self.env.display_name, 0, f"reset returned {type(opening).__name__}, expected Opening")
        if policies is None:
            policies = assign_policies([spec.name for spec in opening.roles], list(clients))
        for spec in opening.roles:
            policy = policies.get(spec.name)
            if policy is None:
                raise ValueError(f"role {spec.name!r} has no policy; policies given for {sorted(policies)}")
            if policy not in clients:
                raise ValueError(f"role {spec.name!r} is played by policy {policy!r}, which has no engine client; "
                                 f"clients: {sorted(clients)}")
            self.streams[spec.name] = _Stream(spec, policy, clients[policy],
                                              _role_sample(self.sample, spec.name, policy, self.episode_id),
                                              [dict(m) for m in spec.messages])
        return opening.first

    async def run(self, first: str, sampling_params: dict[str, Any], max_turns: int, max_total_tokens: int,
                  step_timeout: float | None) -> None:
        speaker = first
        for turn in range(1, max_turns + 1):
            stream = self.streams[speaker]
            stream.prepare(self.chat)
            budget = max_total_tokens - len(stream.sample.tokens)
            if budget <= 0:
                self.status, self.error = Status.TRUNCATED, f"role {speaker!r} has {len(stream.sample.tokens)} " \
                                                            f"tokens, max_total_tokens is {max_total_tokens}"
                return
            params = {**sampling_params, **stream.spec.sampling_params}
            params["max_new_tokens"] = min(int(params.get("max_new_tokens", budget)), budget)
            output = await stream.client.generate(input_ids=list(stream.sample.tokens), sampling_params=params,
                                                  return_logprob=True,
                                                  session_id=f"{self.episode_id}:{speaker}")
            append_response(stream.sample, output)
            ids, meta = list(output["output_ids"]), output["meta_info"]
            stream.last_ids = ids
            record_cache_stats(stream.sample.metadata, meta)
            stream.sample.metadata["turns"] += 1
            stream.sample.metadata["weight_versions"].append(int(meta.get("weight_version", 0)))
            self.turns = turn
            text = self.chat.assistant_text(ids)
            stream.messages.append({"role": "assistant", "content": text})
            if stream.sample.status is Status.ABORTED:  # append_response set it from the finish_reason
                self.status, self.error = Status.ABORTED, f"engine aborted turn {turn} ({speaker})"
                return
            if len(stream.sample.tokens) >= max_total_tokens:
                self.status = Status.TRUNCATED
                return
            result = await call_guarded(self.env, turn, self.env.step(speaker, text), step_timeout)
            if not isinstance(result, TurnResult):
                raise EnvError(self.env.display_name, turn, f"step returned {type(result).__name__}, "
                                                            "expected TurnResult")
            unknown = sorted(set(result.deliver) - set(self.streams))
            if unknown:
                raise EnvError(self.env.display_name, turn, f"delivered to unknown role(s) {unknown}; "
                                                            f"roles: {sorted(self.streams)}")
            for role, content in result.deliver.items():
                if not isinstance(content, str):
                    raise EnvError(self.env.display_name, turn,
                                   f"text for role {role!r} is {type(content).__name__}, expected str")
                self.streams[role].pending.append({"role": "user", "content": content})
            if result.done:
                self.status = Status.TRUNCATED if result.truncated else Status.COMPLETED
                return
            if result.next_role not in self.streams:
                raise EnvError(self.env.display_name, turn, f"next_role {result.next_role!r} is not a role; "
                                                            f"roles: {sorted(self.streams)}")
            speaker = result.next_role
        self.status = Status.TRUNCATED

    async def score(self, step_timeout: float | None) -> None:
        try:
            scores = await call_guarded(self.env, self.turns, self.env.score(), step_timeout)
            if not isinstance(scores, dict):
                raise ValueError(f"returned {type(scores).__name__}, expected a dict role -> reward")
            missing = sorted(set(self.streams) - set(scores))
            if missing:
                raise ValueError(f"no reward for role(s) {missing}")
            rewards = {role: _normalise_reward(role, scores[role]) for role in self.streams}
        except (EnvError, ValueError) as e:
            raise EnvError(self.env.display_name, self.turns, f"score: {getattr(e, 'cause', e)}") from e
        for role, (reward, breakdown) in rewards.items():
            self.streams[role].sample.reward = reward
            self.streams[role].sample.metadata["reward_breakdown"] = breakdown

    def samples(self, tokenizer) -> list[Sample]:
        out = []
        trained = self.status in (Status.COMPLETED, Status.TRUNCATED)
        for stream in self.streams.values():
            if trained and stream.last_ids is None:
                continue
            s = stream.sample
            s.status, s.error = self.status, self.error
            s.metadata["messages"] = stream.messages
            s.metadata["episode_turns"] = self.turns
            versions = s.metadata["weight_versions"]
            s.weight_version = min(versions) if versions else 0
            s.response = tokenizer.decode(s.response_tokens, skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
            out.append(s)
        return out


def assign_policies(roles: Sequence[str], policies: Sequence[str]) -> dict[str, str]:
    """Role -> policy: the policy named like the role, else the one shared policy if there is only one."""
    if not policies:
        raise ValueError("no policies (engine clients) to play the roles")
    out = {}
    for role in roles:
        if role in policies:
            out[role] = role
        elif len(policies) == 1:
            out[role] = policies[0]
        else:
            raise ValueError(f"role {role!r} has no policy: policies are {sorted(policies)}; name a policy after "
                             "each role, or train one policy shared by all roles")
    return out


def new_episode_id(sample: Sample) -> str:
    """A unique id for one episode of `sample` (its group and index, and a random suffix)."""
    return f"ep-{sample.group_index}-{sample.index}-{uuid.uuid4().hex[:8]}"


async def run_dialogue(env: MultiAgentEnv, sample: Sample, *, tokenizer, clients: Mapping[str, EngineClient],
                       policies: Mapping[str, str] | None, sampling_params: dict[str, Any], max_turns: int,
                       max_total_tokens: int, step_timeout: float | None, episode_timeout: float | None = None,
                       episode_id: str | None = None) -> list[Sample]:
    """Play one multi-agent episode; one Sample per role (in the env's role order), each with its policy and reward.

    `clients` maps policy name -> engine client, `policies` role -> policy name (several roles may share a
    policy; None = `assign_policies`). `max_turns` counts the turns of all roles; `max_total_tokens` bounds
    each role's stream. Status (the same for every role): COMPLETED when the env says done, TRUNCATED at a
    limit (rewards are still given), ABORTED on an engine abort or `episode_timeout`, FAILED when the env
    or engine fails (no reward). A role that never spoke has nothing to train on and gets no Sample,
    unless the episode was cut off or failed (then every role's Sample reports it).
    """
    _check_limits(max_turns, max_total_tokens, episode_timeout)
    if sample.metadata.get("role") is not None:
        raise ValueError(f"sample {sample.index} is role {sample.metadata['role']!r} of a cut-off episode; "
                         "multi-agent episodes cannot be resumed (run without --partial-rollout)")
    episode = _Episode(env, sample, ChatDelta(tokenizer), episode_id or new_episode_id(sample))

    async def play() -> None:
        first = episode.open(await call_guarded(env, 0, env.reset(sample), step_timeout), policies, clients)
        await asyncio.wait_for(episode.run(first, sampling_params, max_turns, max_total_tokens, step_timeout),
                               episode_timeout)
        if episode.status in (Status.COMPLETED, Status.TRUNCATED):
            await episode.score(step_timeout)

    failure = await play_to_end(env, play(), step_timeout=step_timeout, episode_timeout=episode_timeout,
                                label=f"episode {episode.episode_id}")
    if failure is not None:
        episode.status, episode.error = failure
    if not episode.streams:  # failed before the roles were known: one failed sample stands for the episode
        failed = _role_sample(sample, "", sample.policy, episode.episode_id)
        failed.metadata.pop("role")
        failed.status, failed.error = episode.status, episode.error
        return [failed]
    return episode.samples(tokenizer)


def role_metrics(samples: Sequence[Sample], prefix: str = "rollout") -> dict[str, float]:
    """Per-role means of reward, response length, turns and cache hit rate over multi-agent samples."""
    by_role: dict[str, list[Sample]] = {}
    for s in samples:
        role = s.metadata.get("role")
        if role:
            by_role.setdefault(role, []).append(s)
    metrics: dict[str, float] = {}
    for role, group in sorted(by_role.items()):
        rewards = [float(s.reward) for s in group if isinstance(s.reward, (int, float))]
        prompt = sum(s.metadata.get("prompt_tokens", 0) for s in group)
        cached = sum(s.metadata.get("cached_tokens", 0) for s in group)
        key = f"{prefix}/{role}"
        metrics[f"{key}/num_samples"] = float(len(group))
        metrics[f"{key}/reward_mean"] = sum(rewards) / len(rewards) if rewards else 0.0
        metrics[f"{key}/response_len_mean"] = sum(s.response_length for s in group) / len(group)
        metrics[f"{key}/turns_mean"] = sum(s.metadata.get("turns", 0) for s in group) / len(group)
        metrics[f"{key}/cache_hit_rate"] = cached / prompt if prompt else 0.0
    return metrics
