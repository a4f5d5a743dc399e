"""Typed configs of the rollout side and the driver: `RolloutConfig`, `DataConfig`, `RunConfig`.

Each field's docstring (the string literal under it) is its `--help` text; a field may
choose its flag name with `field(metadata={"flag": "..."})`. `rollout.cli` turns any
such dataclass into command-line flags and YAML keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from rollout.sample import DEFAULT_POLICY

RM_TYPES = ("math", "exact_match", "format", "remote")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


def _positive(cfg: object, name: str, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} = {value!r}: expected an integer >= 1")


def _positive_seconds(cfg: object, name: str) -> None:
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
    dynamic_sampling_filter_path: str | None = None
    """Group filter 'pkg.mod:fn' `fn(args, samples) -> bool`; e.g. rollout.filters:nonzero_reward_std."""
    over_sampling_batch_size: int | None = None
    """Prompts launched per sampling round (>= what is still missing) so filters can drop groups."""
    max_oversampling_rounds: int = 4
    """Extra sampling rounds allowed per step to refill groups dropped by filters or failures."""
    partial_rollout: bool = False
    """Keep samples aborted at the step's end (batch full or deadline) and resume them next step."""
    rollout_deadline: float | None = None
    """Seconds after which a step aborts what is still generating; None = no deadline."""
    abort_grace: float = 5.0
    """Seconds to wait for engines to return aborted requests before cancelling them."""
    sample_timeout: float | None = None
    """Seconds one generate call may take before its sample is marked failed; None = no limit."""
    rollout_concurrency: int = 256
    """Most generate calls in flight at once."""
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
    """Show a tqdm progress bar per step."""

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "n_samples_per_prompt", "rollout_max_response_len",
                     "rollout_concurrency", "router_page_size", "n_samples_per_eval_prompt"):
            _positive(self, name)
        _positive(self, "over_sampling_batch_size", allow_none=True)
        _positive(self, "eval_max_response_len", allow_none=True)
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
        for name in ("custom_generate_function_path", "custom_rm_path", "dynamic_sampling_filter_path"):
            _import_path(self, name)
        for name in ("reward_timeout", "rollout_deadline", "sample_timeout"):
            _positive_seconds(self, name)
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
        return params


@dataclass
class DataConfig:
    """Where prompts come from and how rows become prompts."""

    prompt_data: str | None = None
    """Training prompts: a .jsonl/.json/.parquet file or a folder saved by datasets.save_to_disk."""
    eval_prompt_data: str | None = None
    """Evaluation prompts, same formats as --prompt-data."""
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
    """Rows whose prompt has more tokens than this are skipped (and reported)."""

    def __post_init__(self) -> None:
        _positive(self, "num_epoch")
        _positive(self, "rollout_max_prompt_len", allow_none=True)
        if not self.input_key:
            raise ValueError("DataConfig.input_key must be a non-empty row key")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ValueError("DataConfig.system_prompt needs --apply-chat-template")


@dataclass
class RunConfig:
    """The driver's loop: model, steps, placement, checkpoints, logging and debug modes."""

    hf_checkpoint: str = ""
    """Local HF model folder the run starts from (weights, config, tokenizer)."""
    policies: list[str] = field(default_factory=list)
    """Several policies trained together, as NAME=PATH (e.g. doctor=/m/a patient=/m/b); default: one policy
    'default' = --hf-checkpoint. Each gets its own trainers, engines and weight pushes."""
    num_rollout: int = 100
    """Training steps (one rollout + one policy update each)."""
    seed: int = 1234
    """Seed of model init and everything not seeded elsewhere."""
    colocate: bool = True
    """Trainers and engines share the devices and take turns holding memory."""
    async_rollout: bool = False
    """Overlap the rollout of step k+1 with training of step k (staleness 1, TIS on; needs --no-colocate)."""
    actor_num_nodes: int = 1
    """Nodes of each policy's trainer ranks."""
    actor_num_gpus_per_node: int = 1
    """Trainer ranks per node (one device each; on CPU a device is --cpus-per-device CPUs)."""
    num_engines: int = field(default=1, metadata={"flag": "rollout-num-engines"})
    """Inference engines serving rollouts, per policy (colocated: each shares a trainer device; else --tp-size each)."""
    cpus_per_device: float = 1.0
    """CPUs in each placement-group bundle (without GPUs a bundle of this many CPUs is one device)."""
    rollout_client: Literal["http", "ray"] = "http"
    """How the rollout manager reaches the engines: their HTTP servers, or Ray calls."""
    health_check_interval: float = 10.0
    """Seconds between the router's engine health checks."""
    update_weight_buffer_size: int = 512 << 20
    """Bytes per weight-push bucket (a larger tensor travels alone)."""
    check_weight_update: bool = False
    """After each weight push, compare per-tensor checksums of engines and trainer."""
    weight_sync_timeout: float = 300.0
    """Seconds a weight push (rendezvous or broadcast) may wait for a peer before failing."""
    ray_address: str | None = None
    """Ray cluster to join ('auto' = the local node's); None = $RAY_ADDRESS if set, else start a local Ray."""
    ray_num_cpus: int | None = None
    """CPUs of a local Ray started by the driver; None = all."""
    load: str | None = None
    """Checkpoint folder to resume from (model, optimizer, data position)."""
    save: str | None = None
    """Checkpoint folder to save to."""
    save_interval: int | None = None
    """Save every this many steps (needs --save)."""
    eval_interval: int | None = None
    """Evaluate on --eval-prompt-data every this many steps."""
    debug_rollout_only: bool = False
    """Only generate rollouts: no trainer, no weight updates."""
    debug_train_only: bool = False
    """Only train (on --load-debug-rollout-data): no engines."""
    use_wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "kiln"
    """Weights & Biases project name."""
    metrics_file: str | None = "metrics.jsonl"
    """JSON-lines file the driver appends one line of metrics per step to; None = off."""

    def __post_init__(self) -> None:
        for name in ("num_rollout", "num_engines", "actor_num_nodes", "actor_num_gpus_per_node",
                     "update_weight_buffer_size"):
            _positive(self, name)
        _positive(self, "ray_num_cpus", allow_none=True)
        for name in ("cpus_per_device", "health_check_interval", "weight_sync_timeout"):
            _positive_seconds(self, name)
        if self.rollout_client not in ("http", "ray"):
            raise ValueError(f"RunConfig.rollout_client = {self.rollout_client!r}: expected 'http' or 'ray'")
        if self.async_rollout and self.colocate:
            raise ValueError("--async-rollout needs --no-colocate: colocated engines give up their memory while "
                             "the trainers train, so rollout cannot overlap training")
        if self.async_rollout and (self.debug_rollout_only or self.debug_train_only):
            raise ValueError("--async-rollout does not apply to --debug-rollout-only / --debug-train-only")
        self.policy_paths()
        _positive(self, "save_interval", allow_none=True)
        _positive(self, "eval_interval", allow_none=True)
        if self.save_interval is not None and not self.save:
            raise ValueError(f"RunConfig.save_interval = {self.save_interval} needs --save (a folder)")
        if self.debug_rollout_only and self.debug_train_only:
            raise ValueError("--debug-rollout-only and --debug-train-only cannot both be set")

    def policy_paths(self) -> dict[str, str]:
        """{policy name: HF folder}, in the order given; {'default': --hf-checkpoint} without --policies."""
        if not self.policies:
            return {DEFAULT_POLICY: self.hf_checkpoint}
        out: dict[str, str] = {}
        for item in self.policies:
            name, sep, path = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name) or not path:
                raise ValueError(f"RunConfig.policies entry {item!r}: expected NAME=PATH with NAME a word "
                                 f"(letters, digits, _ or -) and PATH a local HF model folder")
            if name in out:
                raise ValueError(f"RunConfig.policies names policy {name!r} twice")
            out[name] = path
        return out
