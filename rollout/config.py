"""Typed configs of the rollout side: `RolloutConfig`, `DataConfig`, and `EnvConfig` (the env flags generate
functions get).

Each field's docstring (the string literal under it) is its `--help` text; a field may
choose its flag name with `field(metadata={"flag": "..."})`. `orchestrator.cli` turns any
such dataclass into command-line flags and YAML keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

RM_TYPES = ("math", "exact_match", "format", "remote")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


def check_positive(cfg: object, name: str, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: expected an integer >= 1")


def check_positive_seconds(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: expected a number of seconds > 0 or None")


def _import_path(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if value is not None and not _IMPORT_PATH.match(value):
        raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: expected an import path 'package.module:function'")


@dataclass
class RolloutConfig:
    """How prompts become scored, grouped samples: sampling, generate/reward functions, filters, timeouts."""

    rollout_batch_size: int = 32
    """Prompts per rollout step (each sampled --n-samples-per-prompt times)."""
    n_samples_per_prompt: int = 8
    """Responses per prompt; they share one group_index (GRPO groups)."""
    rollout_max_response_len: int = 512
    """Most new tokens per response (max_new_tokens)."""
    rollout_temperature: float = 1.0
    """Sampling temperature of rollouts."""
    rollout_top_p: float = 1.0
    """Nucleus sampling threshold of rollouts, in (0, 1]."""
    rollout_top_k: int = -1
    """Top-k sampling of rollouts; -1 = off."""
    rollout_stop: list[str] = field(default_factory=list)
    """Extra stop strings."""
    rollout_stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop token ids (EOS always stops)."""
    rollout_ignore_eos: bool = False
    """Generate past EOS: every response has exactly --rollout-max-response-len tokens (benchmarks)."""
    use_routing_replay: bool = False
    """MoE policies: the engines return the experts they chose (Sample.routed_experts) for the trainer to replay."""
    sampling_seed: int | None = None
    """If set, request i is sampled with seed sampling_seed + sample index (reproducible rollouts)."""
    custom_generate_function_path: str = "rollout.generate:generate"
    """Generate function `async fn(args, sample, sampling_params) -> Sample | list[Sample]` as 'pkg.mod:fn'."""
    rm_type: Literal["math", "exact_match", "format", "remote"] = "math"
    """Built-in reward when --custom-rm-path is not given: math, exact_match, format or remote."""
    custom_rm_path: str | None = None
    """Reward function 'pkg.mod:fn': `fn(args, sample) -> float` or, with --group-rm, `fn(args, samples) -> list`."""
    group_rm: bool = False
    """Call the custom reward function once per group with the list of samples."""
    rm_url: str | None = None
    """URL of a remote reward model (rm_type remote): POST JSON {prompt, response, label, metadata}."""
    format_reward_pattern: str | None = None
    """Regex the response must match for reward 1 (rm_type format)."""
    reward_key: str | None = None
    """When rewards are dicts, the key of the scalar that filters, metrics and training use."""
    reward_timeout: float | None = 60.0
    """Seconds a reward call may take before the sample is marked failed; None = no limit."""
    custom_reward_post_process_path: str | None = None
    """Batch reward hook 'pkg.mod:fn' `fn(args, samples) -> list[float]`: the rewards training uses, one per sample
    of the step's batch (e.g. normalised across the batch); the scorer's reward is kept in metadata['raw_reward']."""
    dynamic_sampling_filter_path: str | None = None
    """Group filter 'pkg.mod:fn' `fn(args, samples) -> bool`; e.g. rollout.filters:nonzero_reward_std."""
    over_sampling_batch_size: int | None = None
    """Prompts launched per sampling round (>= what is still missing) so filters can drop groups."""
    max_oversampling_rounds: int = 4
    """Extra sampling rounds allowed per step to refill groups dropped by filters or failures."""
    partial_rollout: bool = False
    """Keep samples aborted at the step's end (batch full or deadline) and resume them next step."""
    offpolicy_tokens: Literal["correct", "mask"] = "correct"
    """Tokens sampled by older weights than their sample's newest ones (earlier --partial-rollout segments, tokens
    before an in-flight weight push): 'correct' trains them with TIS importance weights from the engine's log-probs;
    'mask' leaves them out of the loss (slime's --mask-offpolicy-in-partial-rollout). docs/async.md."""
    max_staleness: int = 1
    """--async-mode fully: a group is trained only if the trainer's weight version minus its oldest token's is at
    most this (the trainer waits for groups about to pass it); generation runs at most this many batches ahead."""
    rollout_deadline: float | None = None
    """Seconds after which a step aborts what is still generating; None = no deadline."""
    abort_grace: float = 5.0
    """Seconds to wait for engines to return aborted requests before cancelling them."""
    sample_timeout: float | None = None
    """Seconds one generate call may take before its sample is marked failed; None = no limit."""
    rollout_concurrency: int = 512
    """Most generate calls in flight per engine: the manager keeps up to this many times the number of engines
    serving the run in flight (slime's --sglang-server-concurrency, whose default this is): more than an engine
    runs at once (--max-running-requests), so that the next requests wait in its queue, not in the manager."""
    router_page_size: int = 16
    """Tokens per page in the router's prefix-affinity hashing."""
    router_balance_threshold: int = 16
    """Prefix affinity yields to least-load when the chosen engine has this many more requests in flight."""
    n_samples_per_eval_prompt: int = 1
    """Responses per prompt in evaluation."""
    eval_temperature: float = 0.0
    """Sampling temperature in evaluation."""
    eval_max_response_len: int | None = None
    """Most new tokens per evaluation response; None = --rollout-max-response-len."""
    save_debug_rollout_data: str | None = None
    """Save every step's samples to this path ('{step}' is replaced) with torch.save."""
    load_debug_rollout_data: str | None = None
    """Load samples saved by --save-debug-rollout-data instead of generating ('{step}' is replaced)."""
    progress: bool = True
    """Show a progress bar per rollout (on a terminal only: the driver turns it off when stderr is not one)."""

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "n_samples_per_prompt", "rollout_max_response_len",
                     "rollout_concurrency", "router_page_size", "n_samples_per_eval_prompt"):
            check_positive(self, name)
        check_positive(self, "over_sampling_batch_size", allow_none=True)
        check_positive(self, "eval_max_response_len", allow_none=True)
        if self.max_oversampling_rounds < 0:
            raise ValueError(f"RolloutConfig.max_oversampling_rounds = {self.max_oversampling_rounds}: expected >= 0")
        if self.router_balance_threshold < 0:
            raise ValueError(f"RolloutConfig.router_balance_threshold = {self.router_balance_threshold}: expected >= 0")
        if self.rollout_temperature < 0 or self.eval_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got rollout {self.rollout_temperature}, "
                             f"eval {self.eval_temperature}")
        if not 0 < self.rollout_top_p <= 1:
            raise ValueError(f"RolloutConfig.rollout_top_p = {self.rollout_top_p}: expected a value in (0, 1]")
        if self.rollout_top_k != -1 and self.rollout_top_k < 1:
            raise ValueError(f"RolloutConfig.rollout_top_k = {self.rollout_top_k}: expected -1 (off) or >= 1")
        if self.rm_type not in RM_TYPES:
            raise ValueError(f"RolloutConfig.rm_type = {self.rm_type!r}: expected one of {RM_TYPES}")
        if self.custom_rm_path is None and self.rm_type == "remote" and not self.rm_url:
            raise ValueError("RolloutConfig.rm_type = 'remote' needs --rm-url")
        if self.custom_rm_path is None and self.rm_type == "format":
            if not self.format_reward_pattern:
                raise ValueError("RolloutConfig.rm_type = 'format' needs --format-reward-pattern")
            try:
                re.compile(self.format_reward_pattern)
            except re.error as e:
                raise ValueError(f"RolloutConfig.format_reward_pattern = {self.format_reward_pattern!r}: {e}") from e
        if self.group_rm and self.custom_rm_path is None:
            raise ValueError("RolloutConfig.group_rm needs --custom-rm-path (a batched reward function)")
        for name in ("custom_generate_function_path", "custom_rm_path", "custom_reward_post_process_path",
                     "dynamic_sampling_filter_path"):
            _import_path(self, name)
        for name in ("reward_timeout", "rollout_deadline", "sample_timeout"):
            check_positive_seconds(self, name)
        if self.offpolicy_tokens not in ("correct", "mask"):
            raise ValueError(f"RolloutConfig.offpolicy_tokens = {self.offpolicy_tokens!r}: "
                             "expected 'correct' or 'mask'")
        if not isinstance(self.max_staleness, int) or isinstance(self.max_staleness, bool) or self.max_staleness < 0:
            raise ValueError(f"RolloutConfig.max_staleness = {self.max_staleness!r}: expected an integer >= 0")
        if self.abort_grace < 0:
            raise ValueError(f"RolloutConfig.abort_grace = {self.abort_grace}: expected >= 0")
        if self.save_debug_rollout_data and self.load_debug_rollout_data:
            raise ValueError("--save-debug-rollout-data and --load-debug-rollout-data cannot both be set")

    def sampling_params(self, *, evaluation: bool = False) -> dict:
        """SGLang sampling params of a rollout (or evaluation) request."""
        params = {
            "max_new_tokens": (self.eval_max_response_len or self.rollout_max_response_len) if evaluation
            else self.rollout_max_response_len,
            "temperature": self.eval_temperature if evaluation else self.rollout_temperature,
            "top_p": 1.0 if evaluation else self.rollout_top_p,
            "top_k": -1 if evaluation else self.rollout_top_k,
        }
        if self.rollout_stop:
            params["stop"] = list(self.rollout_stop)
        if self.rollout_stop_token_ids:
            params["stop_token_ids"] = list(self.rollout_stop_token_ids)
        if self.rollout_ignore_eos and not evaluation:
            params["ignore_eos"] = True
        if self.use_routing_replay and not evaluation:
            params["return_routed_experts"] = True
        return params


@dataclass
class DataConfig:
    """Where prompts come from and how rows become prompts."""

    prompt_data: str | None = None
    """Training prompts: a .jsonl/.json/.parquet file or a folder saved by datasets.save_to_disk."""
    eval_prompt_data: str | None = None
    """Evaluation prompts, same formats as --prompt-data (the eval set 'default': metrics eval/reward_mean, ...)."""
    eval_config: str | None = None
    """YAML file of further eval sets, each with name, path and optional n_samples_per_prompt, temperature, top_p,
    top_k, max_response_len, stop, custom_rm_path, rm_type, group_rm, input_key, label_key, metadata_key
    (rollout/eval_config.py); each is evaluated every --eval-interval and logged as eval/<name>/..."""
    input_key: str = "prompt"
    """Row key of the prompt: a string, or a list of chat messages {role, content}."""
    label_key: str | None = "label"
    """Row key of the reference answer; None = no label."""
    metadata_key: str | None = None
    """Row key of a dict of per-row metadata passed to generate and reward functions."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (plain text becomes one user message)."""
    system_prompt: str | None = None
    """System message put before plain-text prompts when the chat template is applied."""
    rollout_shuffle: bool = False
    """Shuffle the prompts every epoch (seeded by --rollout-seed and the epoch)."""
    rollout_seed: int = 42
    """Seed of the data order."""
    num_epoch: int = 1
    """Passes over the prompt data."""
    rollout_max_prompt_len: int | None = None
    """Rows with longer prompts are dropped at load; None: the engines' limit, else max_position_embeddings - 1."""

    def __post_init__(self) -> None:
        check_positive(self, "num_epoch")
        check_positive(self, "rollout_max_prompt_len", allow_none=True)
        if not self.input_key:
            raise ValueError("DataConfig.input_key must be a non-empty row key")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ValueError("DataConfig.system_prompt needs --apply-chat-template")


@dataclass
class EnvConfig:
    """Which environment the env generate functions play, and the limits of an episode."""

    env: str | None = None
    """Env played by envs.generate functions: registered name, entry point or 'pkg.mod:Class'; metadata 'env' wins."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the env's constructor (a sample's metadata 'env_kwargs' adds to them)."""
    env_max_turns: int = 8
    """Most model turns of an episode (all roles together in multi-agent episodes)."""
    env_max_total_tokens: int = 4096
    """Most tokens of an episode's conversation (per role in multi-agent episodes)."""
    env_step_timeout: float | None = 30.0
    """Seconds one env call (reset, step, score) may take; None = no limit."""
    env_episode_timeout: float | None = None
    """Seconds a whole episode may take before it is aborted; None = no limit."""

    def __post_init__(self) -> None:
        if self.env is not None and (not isinstance(self.env, str) or not self.env):
            raise ValueError(f"EnvConfig.env = {self.env!r}: expected an env name, 'pkg.mod:Class' or None")
        if not isinstance(self.env_kwargs, dict):
            raise ValueError(f"EnvConfig.env_kwargs = {self.env_kwargs!r}: expected a mapping")
        if not isinstance(self.env_max_turns, int) or self.env_max_turns < 1:
            raise ValueError(f"EnvConfig.env_max_turns = {self.env_max_turns!r}: expected an integer >= 1")
        if not isinstance(self.env_max_total_tokens, int) or self.env_max_total_tokens < 2:
            raise ValueError(
                f"EnvConfig.env_max_total_tokens = {self.env_max_total_tokens!r}: expected an integer >= 2"
            )
        for name in ("env_step_timeout", "env_episode_timeout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"EnvConfig.{name} = {value!r}: expected a number of seconds > 0 or None")
