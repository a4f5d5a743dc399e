"""The RL driver: configs from flags/YAML, Ray placement, trainer groups, engines, and the step loop.

One step: rollout -> (colocated: engines release memory, trainers onload) -> train each policy on
its samples -> push each policy's weights into its engines -> (trainers offload, engines resume).
Policies that share devices (--policies-share-devices) take the middle part in turn: onload, train,
push and offload one policy, then the next, so one policy's training state is on the device at a time.
Frozen policies (--frozen-policies) are served but have no trainer: they take no part in the middle part
(their engines, if they share a device with trainers, release and resume memory with the others).
-> eval every --eval-interval steps -> checkpoint every --save-interval steps -> one log line.
With --async-rollout the rollout of step k+1 runs while step k trains (staleness 1, TIS on).
Step k (1-based, as logged) trains on rollout k-1 and leaves the engines at weight_version k.
With --async-mode fully the engines generate continuously and each step takes the next ready groups within
--max-staleness versions (docs/async.md); weight pushes do not drain the engines.
Fault tolerance (docs/architecture.md): after each rollout every engine's health is checked; a dead or
stalled one is restarted on its bundle, gets the step's weight push (checksums verified) and only then
serves again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from envs.generate import env_metrics
from inference_engine.config import EngineConfig
from kiln_common.logs import (QUIET_PROGRESS_ENV, eta, is_terminal, optional_kernels_note, pythonwarnings,
                              setup_logging)
from orchestrator.checkpoint import CheckpointError, begin_checkpoint, choose_checkpoint, finish_checkpoint
from orchestrator.cli import ConfigError, build_parser, instantiate, load_yaml, to_flag_values
from orchestrator.config import RunConfig
from orchestrator.metrics import MetricsLogger, eval_rewards
from rollout.client import report_ok
from rollout.config import DataConfig, EnvConfig, RolloutConfig
from rollout.data import check_source
from rollout.eval_config import EvalConfigError, eval_sets
from rollout.manager import DataExhausted, RolloutBatch, RolloutManager
from rollout.staleness import version_lag_metrics
from trainer.config import TrainerConfig
from weight_sync import WeightSyncConfig

logger = logging.getLogger("kiln.driver")

CONFIG_CLASSES = (RunConfig, RolloutConfig, DataConfig, TrainerConfig, EngineConfig, EnvConfig)
# flags the driver sets itself, per policy or from another flag
_DERIVED = {"model-path": "--hf-checkpoint / --policies", "device": "the placement (cuda when Ray has GPUs)"}
USAGE = "%(prog)s --hf-checkpoint MODEL_FOLDER --prompt-data FILE [--config RUN.yaml] [FLAG ...] (--help: every flag)"
_HF_HINT = ("a local Hugging Face model folder (config.json, weights, tokenizer), e.g. from "
            "`huggingface-cli download Qwen/Qwen3-0.6B --local-dir /models/Qwen3-0.6B`")


class InputError(ConfigError):
    """A user's mistake found before anything starts (a missing file, a bad value); `hint` says what would work."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class DriverConfig:
    """Every part's config, resolved against each other; `policies` maps names to HF folders."""

    run: RunConfig
    rollout: RolloutConfig
    data: DataConfig
    trainer: TrainerConfig
    engine: EngineConfig
    env: EnvConfig
    policies: dict[str, str]

    def flag_values(self) -> dict[str, Any]:
        """{flag: value} of the whole run (recorded in checkpoints and wandb)."""
        return to_flag_values([self.run, self.rollout, self.data, self.trainer, self.engine, self.env])


def parse_args(argv: Sequence[str] | None = None) -> DriverConfig:
    """Parse train.py's flags (and --config YAML) into a resolved DriverConfig."""
    parser = build_parser(CONFIG_CLASSES, prog="train.py",
                          description="Kiln RL training: rollout -> train -> push weights, under Ray.")
    parser.usage = USAGE   # a bad flag: this line and argparse's one-line error, not every flag of the run
    namespace = parser.parse_args(argv)
    values = load_yaml(namespace.config, CONFIG_CLASSES) if namespace.config else {}
    values.update({k.replace("_", "-"): v for k, v in vars(namespace).items() if k != "config"})
    return resolve(values)


def resolve(values: dict[str, Any]) -> DriverConfig:
    """Build the configs from {flag: value}, deriving what one part takes from another; ConfigError if inconsistent."""
    values = dict(values)
    for flag, source in _DERIVED.items():
        if flag in values:
            raise ConfigError(f"--{flag} is set by the driver from {source}; do not set it")
    try:
        policies = RunConfig(policies=values.get("policies", []),
                             hf_checkpoint=values.get("hf-checkpoint", "")).policy_paths()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for name, path in policies.items():
        if not path:
            raise InputError("set --hf-checkpoint MODEL_FOLDER (or --policies NAME=PATH ...)",
                             hint=f"expected {_HF_HINT}")
        if not (Path(path) / "config.json").is_file():
            which = f"policy {name!r}:" if values.get("policies") else "--hf-checkpoint"
            why = "it does not exist" if not Path(path).exists() else "it has no config.json"
            raise InputError(f"{which} {path!r} is not a local HF model folder ({why})", hint=f"expected {_HF_HINT}")
    first = next(iter(policies.values()))
    values.setdefault("hf-checkpoint", first)
    values["model-path"] = first
    # the trainer's log-probs are of logits / the rollout temperature (greedy rollouts: T = 1, as the engine)
    rollout_temperature = values.get("rollout-temperature", RolloutConfig.rollout_temperature)
    derived = rollout_temperature if rollout_temperature > 0 else 1.0
    if "temperature" in values and values["temperature"] != derived:
        raise ConfigError(f"--temperature {values['temperature']} differs from --rollout-temperature "
                          f"{rollout_temperature}; the trainer must use the rollout temperature (leave it unset)")
    values["temperature"] = derived
    if values.get("sampling-seed") is None:  # every request seeded: rollouts reproducible, resumes bit-exact
        values["sampling-seed"] = values.get("seed", RunConfig.seed)
    if values.get("async-rollout"):
        if values.get("use-tis") is False:
            raise ConfigError("--async-rollout trains on samples one version stale; it needs TIS (drop --no-use-tis)")
        values["use-tis"] = True
    _offpolicy_correction(values)
    fp8 = [f"--{flag} {values[flag]}" for flag in ("rollout-dtype", "kv-cache-dtype")
           if str(values.get(flag) or "").startswith("fp8")]
    if fp8:   # FP8 weights or KV widen the engine/trainer gap: corrected unless told not to
        _fp8_corrections(values, " and ".join(fp8))
    if values.get("attention-backend") == "flashinfer":  # a CUDA-only backend: validated as on the GPU the
        values["device"] = "cuda"                         # placement will give it (checked in setup)
    if "engine-stall-window" not in values and values.get("engine-health-timeout", 0) > RunConfig.engine_stall_window:
        values["engine-stall-window"] = values["engine-health-timeout"]   # a longer probe widens the window
    run, rollout, data, trainer, engine, env = instantiate(CONFIG_CLASSES, values)
    if len(policies) > 1 and trainer.ref_checkpoint is not None:
        raise ConfigError("--ref-checkpoint is ambiguous with several --policies; each policy's reference is its "
                          "own starting checkpoint")
    if run.debug_train_only and not rollout.load_debug_rollout_data:
        raise ConfigError("--debug-train-only trains on saved rollouts: set --load-debug-rollout-data PATH")
    if not run.debug_train_only and not data.prompt_data and not rollout.load_debug_rollout_data:
        raise ConfigError("set --prompt-data (a .jsonl/.json/.parquet file or a dataset folder)")
    if run.eval_interval is not None and not data.eval_prompt_data and not data.eval_config:
        raise ConfigError(f"--eval-interval {run.eval_interval} needs --eval-prompt-data or --eval-config")
    _check_opd_teacher(run, trainer)
    if run.rollout_client == "http" and not run.debug_train_only:
        _check_http_serving()
    ranks, split = run.actor_num_nodes * run.actor_num_gpus_per_node, (
        trainer.tensor_parallel_size * trainer.pipeline_parallel_size * trainer.context_parallel_size)
    if trainer.context_parallel_size > 1 and ranks % split:
        raise ConfigError(f"--context-parallel-size {trainer.context_parallel_size}: the {ranks} trainer ranks "
                          f"(--actor-num-nodes x --actor-num-gpus-per-node) are not a multiple of TP x PP x CP = "
                          f"{split}")
    try:   # the eval sets' files, keys and values, before Ray starts
        eval_sets(data, rollout)
    except EvalConfigError as e:
        raise ConfigError(str(e)) from None
    return DriverConfig(run, rollout, data, trainer, engine, env, policies)


def _check_http_serving() -> None:
    """--rollout-client http serves every engine over HTTP (FastAPI on uvicorn): ConfigError here, before Ray starts,
    if this Python lacks them, instead of the engines failing as they start (one image serves the whole job)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--rollout-client http serves the engines over HTTP and needs {' and '.join(missing)}, not "
                          f"installed here: install them (the project's dependencies) or pass --rollout-client ray")


def _check_opd_teacher(run: RunConfig, trainer: TrainerConfig) -> None:
    """--use-opd --opd-type engine needs one served teacher: --opd-teacher-url or --opd-teacher-load."""
    served = trainer.use_opd and trainer.opd_type == "engine"
    if run.opd_teacher_url is not None and not served:
        raise ConfigError("--opd-teacher-url is the teacher of --use-opd --opd-type engine; set those or drop it")
    if served and (run.opd_teacher_url is None) == (trainer.opd_teacher_load is None):
        raise ConfigError("--use-opd --opd-type engine needs one teacher: --opd-teacher-url URL (an engine already "
                          "served) or --opd-teacher-load HF_DIR (served by this run on a device of its own)")


def _offpolicy_correction(values: dict[str, Any]) -> None:
    """Turn TIS on where samples hold tokens of older weights that are importance-corrected (docs/async.md):
    --async-mode fully, and --partial-rollout with --offpolicy-tokens correct; ConfigError if --no-use-tis."""
    mode = values.get("async-mode", RunConfig.async_mode)
    partial = values.get("partial-rollout") and values.get("offpolicy-tokens", "correct") == "correct"
    if mode != "fully" and not partial:
        return
    if values.get("use-tis") is False:
        why = ("--async-mode fully trains on tokens up to --max-staleness versions old" if mode == "fully" else
               "--partial-rollout resumes samples with tokens of older weights (--offpolicy-tokens correct)")
        raise ConfigError(f"{why}; the decoupled objective needs TIS (drop --no-use-tis"
                          f"{'' if mode == 'fully' else ', or set --offpolicy-tokens mask'})")
    values["use-tis"] = True


def _fp8_corrections(values: dict[str, Any], why: str) -> None:
    """Turn TIS and MIS on for FP8 rollout (weights or KV cache, `why`) where the flags leave them unset, and say so
    in one log line."""
    unset = [flag for flag in ("use-tis", "use-mis") if values.get(flag) is None]
    if values.get("recompute-old-logprobs") is False:
        logger.info("%s: TIS / MIS stay off (they need the trainer's recomputed log-probs, and "
                    "--no-recompute-old-logprobs is set); the mismatch is still reported (train_rollout_kl)", why)
        return
    for flag in unset:
        values[flag] = True
    kept = [f"--{flag} {values[flag]}" for flag in ("use-tis", "use-mis") if flag not in unset]
    logger.info("%s: %s (importance correction of the FP8 engine's log-probs)%s", why,
                " and ".join(f"--{flag}" for flag in unset) + " turned on" if unset else "nothing turned on",
                f"; kept as set: {', '.join(kept)}" if kept else "")


def check_inputs(config: DriverConfig) -> None:
    """Raise InputError unless every file the run reads is there and readable: the prompt data (its first rows) and
    --load; found here, before Ray or any actor starts, instead of in an actor minutes later."""
    run, data = config.run, config.data
    hint = (f"a .jsonl/.json/.parquet file or a datasets.save_to_disk folder; a relative path is relative to "
            f"{os.getcwd()}")
    files = {"--prompt-data": data.prompt_data if not run.debug_train_only else None,
             "--eval-prompt-data": data.eval_prompt_data}
    for flag, path in files.items():
        if path:
            try:
                check_source(path, data.input_key, flag)
            except (OSError, ValueError) as e:
                raise InputError(str(e), hint=hint if "does not exist" in str(e) else None) from e
    if run.load and Path(run.load).exists() and not Path(run.load).is_dir():
        raise InputError(f"--load {run.load!r} is a file; expected a checkpoint folder (an earlier run's --save)")


def _user_error(message: str, hint: str | None = None) -> None:
    """Print a user's mistake as one line (and a hint) on stderr, as argparse does, and exit with code 2."""
    print(f"train.py: error: {' '.join(message.split())}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)
    raise SystemExit(2)


def _config_error_text(e: ConfigError) -> tuple[str, str | None]:
    """(message, hint) of a ConfigError; a --config file that is missing or not YAML gets a line of its own."""
    import yaml

    cause, path = e.__cause__, getattr(e.__cause__, "filename", None)
    if isinstance(cause, FileNotFoundError) and path:
        return f"--config {path!r} does not exist", f"a relative path is relative to {os.getcwd()}"
    if isinstance(cause, yaml.MarkedYAMLError):
        where = (f" at line {cause.problem_mark.line + 1}, column {cause.problem_mark.column + 1}"
                 if cause.problem_mark else "")
        name = str(e).removeprefix("cannot read config file ").split(": ", 1)[0]
        return f"--config {name!r} is not valid YAML: {cause.problem or cause.context}{where}", None
    return str(e), getattr(e, "hint", None)


def configure(argv: Sequence[str]) -> DriverConfig:
    """Logging, then the flags resolved and every input checked before anything starts; a user's mistake exits
    with code 2 and one line on stderr (the traceback only with --debug)."""
    setup_logging()
    argv = list(argv)
    if not argv:
        print("usage: " + USAGE % {"prog": "train.py"}, file=sys.stderr)
        _user_error("no arguments; set at least --hf-checkpoint and --prompt-data (or --config RUN.yaml)")
    debug = "--debug" in argv
    terminal = is_terminal(sys.stderr)   # decided once: progress bars and colours only on a terminal
    if not terminal:
        for name, value in QUIET_PROGRESS_ENV.items():   # datasets' bars while the prompt data is checked
            os.environ.setdefault(name, value)
    try:
        config = parse_args(argv)
        debug = config.run.debug
        check_inputs(config)
    except ConfigError as e:
        if debug:
            raise
        _user_error(*_config_error_text(e))
    if not terminal:   # a log file gets no progress bars (each redraw would be a line, or a fragment of one)
        config.rollout.progress = False
    return config


class EngineFailureError(RuntimeError):
    """Engines failed and the run cannot go on (--no-fault-tolerance, the restart limit, or a failed restart)."""


def failure_summary(batch: RolloutBatch, limit: int = 3) -> str:
    """The most common reasons samples of a step failed, e.g. '2x reward timed out after 1s; 1x ...'."""
    reasons = Counter((s.error or s.status.value).splitlines()[0][:160] for s in batch.failed)
    return "; ".join(f"{n}x {why}" for why, n in reasons.most_common(limit))


def _last_line(e: BaseException) -> str:
    """The last line of an error's text (a Ray error's is the cause's message, after its traceback)."""
    text = str(e).strip()
    return text.splitlines()[-1][:300] if text else type(e).__name__


def _reward_mean(samples: Sequence[Any]) -> float:
    """The mean of the samples' scalar rewards (0.0 without any)."""
    rewards = [s.reward for s in samples if isinstance(s.reward, (int, float))]
    return sum(rewards) / max(len(rewards), 1)


def check_checkpoint_frozen(checkpoint: Path, frozen: Sequence[str]) -> None:
    """CheckpointError unless the checkpoint's frozen policies (driver.json; none before frozen policies existed)
    are this run's: a policy frozen there has no trainer state to resume, one trained there would lose it."""
    state = json.loads((checkpoint / "driver.json").read_text())
    saved = sorted(state.get("frozen_policies", []))
    if saved != sorted(set(frozen)):
        raise CheckpointError(f"checkpoint {checkpoint} was saved with --frozen-policies {saved or 'none'}, this run "
                              f"has {sorted(set(frozen)) or 'none'}; resume with the same frozen policies")


def _fmt(metrics: dict[str, Any], key: str, spec: str = ".3f") -> str:
    value = metrics.get(key)
    return "-" if value is None else format(value, spec)


class Driver:
    """Owns the Ray actors of a run and runs its steps; `run()` returns the per-step metrics."""

    def __init__(self, config: DriverConfig) -> None:
        self.cfg = config
        self.trainers: dict[str, Any] = {}
        self.engines: dict[str, list[Any]] = {}
        self.manager = None
        self.pg = None
        self.start_step = 0
        self.checkpoint: Path | None = None  # the one --load resumes, chosen and verified before Ray starts
        self._started_ray = False
        self.weight_versions = {name: 0 for name in config.policies}
        self.history: list[dict[str, Any]] = []
        self.run_id = uuid.uuid4().hex[:8]   # in the engine actors' names (`engine_name`)
        self.engine_restarts = 0   # over the whole run, all policies
        self._engine_counts: dict[tuple[str, int], dict[str, float]] = {}   # step counters at the last rollout
        self._plan: Any = None
        self._turns: list[list[str]] = [list(config.policies)]   # set by setup()
        self._engine_options: dict[str, Any] = {}   # device, serve_http, token: how engines are started
        self._sync: dict[str, WeightSyncConfig] = {}   # each policy's weight-sync settings
        self._to_return: list[tuple[str, int]] = []   # restarted engines waiting for their weights and the check
        self.teacher: Any = None   # on-policy distillation's served teacher (an EngineActor handle or a URL)

    # ---- set-up -----------------------------------------------------------------------------------------------

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        run = self.cfg.run
        # megatron-core's "Apex / Transformer Engine not installed" import warnings: hidden in every actor, one note
        env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": pythonwarnings(os.environ.get("PYTHONWARNINGS")),
               **QUIET_PROGRESS_ENV}   # an actor's own tqdm bars reach the console as stale fragments: only Kiln's
        # rollout bar is drawn, by the driver (kiln_common.logs.progress_bar)
        if not (is_terminal(sys.stdout) and is_terminal(sys.stderr)):
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")   # Ray's "(Actor pid=...)" prefixes without colour codes
        note = optional_kernels_note() if not run.debug_rollout_only else None
        if note:
            logger.info("%s", note)
        if run.ray_address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=run.ray_address, runtime_env={"env_vars": env})
        else:
            ray.init(num_cpus=run.ray_num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
        self._started_ray = True

    def setup(self) -> None:
        """Start Ray (or join it), place and start every actor, and resume from --load."""
        import ray

        from orchestrator.actors import RolloutManagerActor
        from orchestrator.placement import create_placement_group, plan_placement
        from orchestrator.trainer_group import TrainerGroup

        cfg, run = self.cfg, self.cfg.run
        self.checkpoint = choose_checkpoint(run.load) if run.load else None  # CheckpointError before anything costly
        if self.checkpoint is not None:
            check_checkpoint_frozen(self.checkpoint, run.frozen_policies)
        self._init_ray()
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if not use_gpu and cfg.engine.device != "cpu":
            raise ConfigError(f"--attention-backend {cfg.engine.attention_backend} needs a GPU and Ray "
                              "found none; on CPU use 'torch' or 'triton'")
        train, rollout = not run.debug_rollout_only, not run.debug_train_only
        plan = plan_placement(list(cfg.policies), num_trainers=run.actor_num_nodes * run.actor_num_gpus_per_node,
                              num_engines=run.num_engines, colocate=run.colocate, use_gpu=use_gpu,
                              cpus_per_device=run.cpus_per_device, train=train, rollout=rollout,
                              engine_devices=cfg.engine.tp_size, share_devices=run.policies_share_devices,
                              frozen=run.frozen_policies)
        self.colocated = run.colocate and train and rollout
        trained = run.trained_policies()
        # the policies whose trainers hold device memory together: one at a time when they share devices
        self._turns = [[name] for name in trained] if run.policies_share_devices and self.colocated else [trained]
        logger.info("placement: %d bundles of %s for policies %s (%s, %s)%s", len(plan.bundles), plan.bundles[0],
                    list(cfg.policies), "colocated" if self.colocated else "disaggregated", "GPU" if use_gpu else "CPU",
                    f"; frozen (served, not trained): {run.frozen_policies}" if run.frozen_policies else "")
        self.pg = create_placement_group(plan)
        if train:
            for name in trained:
                tcfg = dataclasses.replace(cfg.trainer, hf_checkpoint=cfg.policies[name])
                self.trainers[name] = TrainerGroup(name, tcfg, self.pg, plan.policies[name].trainers)
            for names in self._turns:   # built (and offloaded) in turn when they share devices
                ray.get([ref for name in names for ref in self.trainers[name].remote("init")])
                if self.checkpoint is not None:
                    ray.get([ref for name in names for ref in self.trainers[name].remote(
                        "load_checkpoint", str(self.checkpoint / f"policy_{name}"))])
                if self.colocated:
                    ray.get([ref for name in names for ref in self.trainers[name].remote("offload")])
        if rollout:
            import secrets

            serve_http = run.rollout_client == "http"
            self._plan = plan
            self._engine_options = {"device": "cuda" if use_gpu else "cpu", "serve_http": serve_http,
                                    # this run's key to its engines' HTTP routes
                                    "token": secrets.token_urlsafe(32) if serve_http else None}
            # engines that share a device and size their KV pools from its free memory start one after another
            in_turn = run.policies_share_devices and use_gpu and cfg.engine.max_total_tokens is None
            for position, name in enumerate(cfg.policies):
                self.engines[name] = [self._start_engine(name, i, position)
                                      for i in range(len(plan.policies[name].engines))]
                if in_turn:
                    ray.get([h.health.remote() for h in self.engines[name]])   # waits until it has loaded
            targets = {name: [self._engine_target(h) for h in handles] for name, handles in self.engines.items()}
            self.manager = ray.remote(RolloutManagerActor).options(num_cpus=0).remote(
                cfg.rollout, cfg.data, targets, next(iter(cfg.policies.values())), cfg.env, run.health_check_interval,
                self._engine_options["token"], health_timeout=run.engine_health_timeout,
                stall_window=run.engine_stall_window,
                engine_prompt_limit=cfg.engine.context_length - 1 if cfg.engine.context_length else None)
        if train and cfg.trainer.use_opd and cfg.trainer.opd_type == "engine":
            self.teacher = self._start_teacher(use_gpu)
        if train and rollout:
            for name, group in self.trainers.items():
                self._sync[name] = WeightSyncConfig(
                    transport="colocated" if self.colocated and run.actor_num_nodes == 1 else "distributed",
                    bucket_bytes=run.update_weight_buffer_size, check_weight_update=run.check_weight_update,
                    timeout_s=run.weight_sync_timeout, master_address=group.master_addr,
                    group_name=f"kiln_weights_{name}", fp8=cfg.engine.fp8_layout)
            ray.get([ref for name in self.trainers for ref in self._connect_weight_sync(name)])
        self._resume()

    def _start_teacher(self, use_gpu: bool) -> Any:
        """The OPD teacher: --opd-teacher-url as is, or an EngineActor serving --opd-teacher-load outside the
        placement group on a device of its own (a GPU, or --cpus-per-device CPUs), reached over Ray."""
        import ray

        from orchestrator.actors import EngineActor

        run = self.cfg.run
        if run.opd_teacher_url is not None:
            return run.opd_teacher_url
        config = dataclasses.replace(self.cfg.engine, model_path=self.cfg.trainer.opd_teacher_load,
                                     device="cuda" if use_gpu else "cpu", tp_size=1, ep_size=1)  # one device
        resources = {"num_gpus": 1, "num_cpus": run.cpus_per_device} if use_gpu else {"num_cpus": run.cpus_per_device}
        handle = ray.remote(EngineActor).options(**resources, max_concurrency=1000,
                                                 name=f"kiln-opd-teacher-{self.run_id}").remote(config, False)
        ray.get(handle.health.remote())   # waits until it has loaded
        logger.info("OPD teacher %s served for the run", self.cfg.trainer.opd_teacher_load)
        return handle

    def _score_teacher(self, batch: RolloutBatch) -> dict[str, float]:
        """Fill every sample's teacher_logprobs from the OPD teacher (orchestrator/teacher.py); its metrics."""
        import asyncio

        from orchestrator.teacher import score_samples
        from rollout.client import HttpEngineClient, LocalEngineClient

        if isinstance(self.teacher, str):
            client = HttpEngineClient(self.teacher, api_key=os.environ.get("KILN_OPD_TEACHER_API_KEY"))
        else:
            client = LocalEngineClient(self.teacher)
        start = time.perf_counter()
        failed = asyncio.run(score_samples(client, batch.samples, self.cfg.trainer.temperature))
        return {"opd/teacher_failed": failed, "timing/opd_teacher_s": time.perf_counter() - start}

    def engine_name(self, policy: str, index: int) -> str:
        """The Ray actor name of engine `index` of `policy` (`ray.get_actor(name)` finds it; kept across restarts)."""
        return f"kiln-engine-{policy}-{index}-{self.run_id}"

    def _start_engine(self, policy: str, index: int, position: int | None = None) -> Any:
        """Start engine `index` of `policy`: a named EngineActor in its slot of the placement group (at set-up, and
        to restart a failed engine on the same bundle). Returns the handle at once; the engine loads meanwhile.

        Policies that share devices: the engine is the `position`-th to start on its device (None: a restart,
        which starts beside all the others) and takes its equal share of the KV memory (`shared_kv_fraction`)."""
        import ray

        from orchestrator.actors import EngineActor
        from orchestrator.placement import actor_options, shared_kv_fraction

        opts = self._engine_options
        slot = self._plan.policies[policy].engines[index]
        config = dataclasses.replace(self.cfg.engine, model_path=self.cfg.policies[policy], device=opts["device"])
        sharing = len(self.cfg.policies) if self.cfg.run.policies_share_devices else 1
        if sharing > 1:
            fraction = shared_kv_fraction(config.mem_fraction_static, sharing,
                                          sharing - 1 if position is None else position)
            config = dataclasses.replace(config, mem_fraction_static=fraction)
        options = {**actor_options(self.pg, slot), "max_concurrency": 1000, "name": self.engine_name(policy, index)}
        deadline = time.monotonic() + 60.0
        while True:
            try:
                return ray.remote(EngineActor).options(**options).remote(config, opts["serve_http"], opts["token"])
            except ValueError as e:   # a killed predecessor's name is freed a moment after it died
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _engine_target(self, handle: Any) -> Any:
        """What the rollout manager reaches an engine by: its HTTP URL (waits for its start), or its handle."""
        import ray

        return ray.get(handle.get_url.remote()) if self._engine_options["serve_http"] else handle

    def _connect_weight_sync(self, policy: str) -> list[Any]:
        """Connect `policy`'s weight sender to its current engines (ObjectRefs of the ranks' calls)."""
        from orchestrator.actors import EngineProxy

        run = self.cfg.run
        proxies = [EngineProxy(h, timeout_s=run.weight_sync_timeout) for h in self.engines[policy]]
        return self.trainers[policy].remote("connect_engines", proxies, self._sync[policy],
                                            [self.cfg.engine.tp_size] * len(proxies))

    def _resume(self) -> None:
        """Restore step, data position and weight versions from --load; push the loaded weights to the engines."""
        import ray

        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        state = json.loads((checkpoint / "driver.json").read_text())
        if sorted(state["policies"]) != sorted(self.cfg.policies):
            raise ValueError(f"checkpoint {checkpoint} has policies {sorted(state['policies'])}, this run "
                             f"{sorted(self.cfg.policies)}")
        self.start_step = state["next_step"]
        if self.manager is not None:
            ray.get(self.manager.load_state_dict.remote(torch.load(checkpoint / "rollout_state.pt",
                                                                   weights_only=False)))
        if self.trainers and self.engines:
            self._push_weights(self.start_step)
        self.weight_versions.update({name: self.start_step for name in self.trainers})   # frozen ones stay at 0
        logger.info("resumed from %s at step %d", checkpoint, self.start_step)

    # ---- phases -----------------------------------------------------------------------------------------------

    def _push_weights(self, version: int, policies: list[str] | None = None) -> dict[str, float]:
        """Push every policy's (or these policies') weights into its engines as `version`; timing and size
        metrics."""
        import ray

        verify = {policy for policy, _ in self._to_return}   # a restarted engine's weights are checked once
        names = list(self.trainers) if policies is None else policies
        refs = {name: self.trainers[name].remote("push_weights", version, name in verify) for name in names}
        results = {name: ray.get(rs)[0] for name, rs in refs.items()}  # rank 0 reports; every rank takes part
        ray.get([self.manager.flush_cache.remote(name) for name in refs])
        metrics = {}
        for name, stats in results.items():
            self.weight_versions[name] = int(stats["weight_version"])
            metrics[self._key("push", name, "gb_per_s")] = stats["gb_per_s"]
            metrics[self._key("push", name, "bytes")] = stats["bytes"]
        return metrics

    # ---- fault tolerance --------------------------------------------------------------------------------------

    def _engine_faults(self) -> list[tuple[str, int, str]]:
        """(policy, index, reason) of every engine that died, reported itself not ok (a dead scheduler thread or tp
        worker, a stall the engine measured), or left its health check unanswered for --engine-stall-window
        seconds. One unanswered after --engine-health-timeout is slow, not failed: logged, and waited for."""
        import ray

        run = self.cfg.run
        refs = {(policy, i): h.health.remote() for policy, handles in self.engines.items()
                for i, h in enumerate(handles)}
        ready, waiting = ray.wait(list(refs.values()), num_returns=len(refs), timeout=run.engine_health_timeout)
        if waiting:   # a loaded machine answers late; only a silence over the stall window is a stall
            for (policy, i), ref in refs.items():
                if ref in waiting:
                    logger.warning("engine %s: slow health check (no answer within --engine-health-timeout %gs); "
                                   "waiting up to --engine-stall-window %gs before calling it stalled",
                                   self.engine_name(policy, i), run.engine_health_timeout, run.engine_stall_window)
            more, _ = ray.wait(waiting, num_returns=len(waiting),
                               timeout=run.engine_stall_window - run.engine_health_timeout)
            ready = ready + more
        return self._classify_health(refs, set(ready))

    def _classify_health(self, refs: dict[tuple[str, int], Any], answered: set) -> list[tuple[str, int, str]]:
        """The failed engines among the health probes `refs` ({(policy, index): ObjectRef}), `answered` the refs
        that answered within the stall window."""
        import ray
        from ray.exceptions import RayActorError

        window = self.cfg.run.engine_stall_window
        faults = []
        for (policy, i), ref in refs.items():
            if ref not in answered:
                faults.append((policy, i, f"stalled: no answer to a health check for {window:g}s "
                                          "(--engine-stall-window)"))
                continue
            try:
                report = ray.get(ref)
            except RayActorError as e:
                faults.append((policy, i, f"the actor died ({type(e).__name__}: {_last_line(e)})"))
            except Exception as e:  # noqa: BLE001 - whatever broke the health call, the engine is not serving
                faults.append((policy, i, f"its health check raised {type(e).__name__}: {_last_line(e)}"))
            else:
                if not report_ok(report):
                    why = report.get("reason") if isinstance(report, dict) else report
                    faults.append((policy, i, f"it reports itself unhealthy: {why}"))
        return faults

    def _check_engines(self, step: int) -> None:
        """After a rollout: log the routers' rotation changes, find failed engines and restart them (or stop the run:
        --no-fault-tolerance, or more than --max-engine-restarts in all)."""
        self._log_engine_events(step)
        self._handle_engine_faults(step, self._engine_faults())

    ENGINE_COUNTERS = ("start_time_seconds", "steps_total", "step_requests_total", "step_seconds_total")

    def _engine_counters(self) -> dict[tuple[str, int], dict[str, float]]:
        """Every engine's step counters (Engine.metrics), by (policy, index); an engine that does not answer within
        --engine-health-timeout is left out (the fault check deals with it)."""
        import ray

        refs = {(policy, i): h.metrics.remote() for policy, handles in self.engines.items()
                for i, h in enumerate(handles)}
        counts = {}
        for key, ref in refs.items():
            try:
                report = ray.get(ref, timeout=self.cfg.run.engine_health_timeout)
            except Exception:  # noqa: BLE001 - a missing figure, not a failure
                continue
            counts[key] = {name: float(report.get(name, 0)) for name in self.ENGINE_COUNTERS}
        return counts

    def _engine_step_metrics(self, rollout_s: float | None) -> dict[str, float]:
        """What the engines did since the previous rollout (that rollout's, and an evaluation's if one ran), per
        policy when there are several: forward steps, the mean step's wall time (scheduling, launch and the wait for
        its result: host- or device-bound, the engine's pace), the mean batch (requests per step), and the share of
        the rollout's wall time the engines were stepping (busy_frac, over all of the policy's engines). A restarted
        engine (another start time) counts from zero."""
        now, before = self._engine_counters(), self._engine_counts
        self._engine_counts = now
        counters = self.ENGINE_COUNTERS[1:]
        totals: dict[str, dict[str, float]] = {}
        for (policy, i), counts in now.items():
            prev = before.get((policy, i))
            if prev is None or prev["start_time_seconds"] != counts["start_time_seconds"]:  # new or restarted
                prev = dict.fromkeys(counters, 0.0)
            acc = totals.setdefault(policy, {**dict.fromkeys(counters, 0.0), "engines": 0})
            for name in counters:
                acc[name] += counts[name] - prev[name]
            acc["engines"] += 1
        metrics = {}
        for policy, d in totals.items():
            prefix = "rollout/engine/" if len(self.engines) == 1 else f"rollout/engine/{policy}/"
            metrics[prefix + "steps"] = d["steps_total"]
            if d["steps_total"]:
                metrics[prefix + "step_ms"] = 1000 * d["step_seconds_total"] / d["steps_total"]
                metrics[prefix + "requests_per_step"] = d["step_requests_total"] / d["steps_total"]
            if rollout_s:
                metrics[prefix + "busy_frac"] = d["step_seconds_total"] / (d["engines"] * rollout_s)
        return metrics

    def _log_engine_events(self, step: int) -> None:
        """Log the routers' rotation changes (an engine left the rotation and why, or came back) in this log."""
        import ray

        for policy, events in ray.get(self.manager.engine_events.remote()).items():
            for event in events:
                logger.log(logging.INFO if event["in_rotation"] else logging.WARNING, "step %d: policy %s: %s",
                           step + 1, policy, event["message"])

    def _handle_engine_faults(self, step: int, faults: list[tuple[str, int, str]]) -> None:
        """Restart the failed engines `faults` ((policy, index, reason) each), or raise EngineFailureError naming
        them and why when --no-fault-tolerance is set or the restarts would exceed --max-engine-restarts."""
        run = self.cfg.run
        if not faults:
            return
        described = "; ".join(f"{self.engine_name(policy, i)}: {why}" for policy, i, why in faults)
        if not run.fault_tolerance:
            raise EngineFailureError(f"step {step + 1}: {len(faults)} engine(s) failed and --no-fault-tolerance is "
                                     f"set, so the run stops: {described}")
        if self.engine_restarts + len(faults) > run.max_engine_restarts:
            raise EngineFailureError(
                f"step {step + 1}: {len(faults)} engine(s) failed, and restarting them would exceed "
                f"--max-engine-restarts {run.max_engine_restarts} ({self.engine_restarts} restart(s) so far), so the "
                f"run stops: {described}")
        for policy, i, why in faults:
            logger.warning("step %d: engine %s failed (%s); restarting it on its placement-group bundle", step + 1,
                           self.engine_name(policy, i), why)
        self._restart_engines(step, [(policy, i) for policy, i, _ in faults])

    def _restart_engines(self, step: int, failed: list[tuple[str, int]]) -> None:
        """Kill the failed engines, start new ones on the same bundles and rebuild their policies' weight sync;
        they return to rotation after the step's push has given them the trainer's weights (`_return_engines`)."""
        import ray

        for policy, i in failed:
            ray.kill(self.engines[policy][i], no_restart=True)
        for policy, i in failed:
            self.engines[policy][i] = self._start_engine(policy, i)
        for policy, i in failed:
            name = self.engine_name(policy, i)
            try:
                report = ray.get(self.engines[policy][i].health.remote())   # waits until the engine has started
            except Exception as e:  # noqa: BLE001 - one clear error for the run
                raise EngineFailureError(f"restarting engine {name} failed: {type(e).__name__}: "
                                         f"{_last_line(e)}") from e
            if not report_ok(report):
                raise EngineFailureError(f"restarted engine {name} is not healthy: {report}")
            self.engine_restarts += 1
            self._to_return.append((policy, i))
        policies = sorted({policy for policy, _ in failed} & set(self.trainers))
        if policies:   # the senders drop the dead engines and connect the new set; the step's push fills them
            ray.get([ref for policy in policies for ref in self.trainers[policy].remote("disconnect_engines")])
            ray.get([ref for policy in policies for ref in self._connect_weight_sync(policy)])
        if not self.trainers:   # rollout only: every engine holds the checkpoint's weights, as the new one does
            self._return_engines(step)

    def _return_engines(self, step: int) -> None:
        """Put the restarted engines back in rotation, once they hold the trainer's weights (the push verified their
        checksums) at the policy's weight version."""
        import ray

        for policy, i in self._to_return:
            handle = self.engines[policy][i]
            version = ray.get(handle.weight_version.remote())
            if self.trainers and version != self.weight_versions[policy]:
                raise EngineFailureError(f"restarted engine {self.engine_name(policy, i)} holds weight version "
                                         f"{version} after the push, not {self.weight_versions[policy]}")
            ray.get(self.manager.replace_engine.remote(policy, i, self._engine_target(handle)))
            logger.info("step %d: engine %s is back in rotation at weight version %d%s", step + 1,
                        self.engine_name(policy, i), version,
                        " (checksums verified)" if policy in self.trainers else "")
        self._to_return = []
        self._log_engine_events(step)

    def _key(self, prefix: str, policy: str, name: str) -> str:
        return f"{prefix}/{name}" if len(self.cfg.policies) == 1 else f"{prefix}/{policy}/{name}"

    def _train(self, batch: RolloutBatch, policies: list[str] | None = None) -> dict[str, float]:
        """Each policy's (or these policies') train step on its samples, in parallel; metrics by policy."""
        import ray

        by_policy = batch.by_policy()
        metrics: dict[str, float] = {}
        work = {}
        for name in list(self.trainers) if policies is None else policies:
            group = self.trainers[name]
            samples = by_policy.get(name, [])
            if not samples:
                logger.warning("step %d: no samples for policy %r; it is not updated", batch.step + 1, name)
                continue
            work[name] = group.remote("train_step", ray.put(samples))
        for name, refs in work.items():
            for key, value in ray.get(refs)[0].items():
                metrics[self._key("train", name, key)] = value
            if len(self.cfg.policies) > 1:
                metrics[f"rollout/{name}/reward_mean"] = _reward_mean(by_policy[name])
        return metrics

    def _frozen_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """rollout/<policy>/frozen_samples (samples returned for a frozen policy, which are not trained) and
        rollout/<policy>/reward_mean of each frozen policy."""
        by_policy = batch.by_policy()
        metrics: dict[str, float] = {}
        for name in self.cfg.run.frozen_policies:
            samples = by_policy.get(name, [])
            metrics[f"rollout/{name}/frozen_samples"] = float(len(samples))
            if samples:
                metrics[f"rollout/{name}/reward_mean"] = _reward_mean(samples)
        return metrics

    def _evaluate(self) -> dict[str, float]:
        import ray

        return ray.get(self.manager.evaluate.remote())

    def _save(self, step: int, rollout_state: dict[str, Any] | None = None) -> None:
        """Checkpoint after `step` (0-based): trainers, rollout state, driver state, manifest; then mark it latest.

        `rollout_state`: the manager's state to record (async rollout: taken before the next rollout began);
        None = its state now. The protocol (atomic files, manifest, pointer last) is orchestrator/checkpoint.py's.
        """
        import ray

        folder = begin_checkpoint(self.cfg.run.save, step + 1)
        refs = {name: g.remote("save_checkpoint", str(folder / f"policy_{name}")) for name, g in self.trainers.items()}
        files = {f"policy_{name}/{file}": digest for name, rank_refs in refs.items()
                 for written in ray.get(rank_refs) for file, digest in written.items()}
        if self.manager is not None and rollout_state is None:
            rollout_state = ray.get(self.manager.state_dict.remote())
        state = {"next_step": step + 1, "policies": self.cfg.policies, "weight_versions": self.weight_versions,
                 "frozen_policies": sorted(self.cfg.run.frozen_policies),
                 "seeds": {"seed": self.cfg.run.seed, "rollout_seed": self.cfg.data.rollout_seed,
                           "sampling_seed": self.cfg.rollout.sampling_seed},
                 "config": self.cfg.flag_values()}
        finish_checkpoint(self.cfg.run.save, step + 1, files, rollout_state, state)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run steps --num-rollout steps from the start (or the resumed step); the metrics of each step."""
        import ray

        cfg, run = self.cfg, self.cfg.run
        log = MetricsLogger(run, cfg.flag_values())
        try:
            if (self.manager is not None and run.eval_interval and self.start_step == 0 and self.trainers
                    and not run.skip_eval_before_train):
                start = time.perf_counter()
                metrics = {**self._evaluate(), "timing/eval_s": time.perf_counter() - start}
                log.log(0, metrics)
                logger.info("step 0 | eval reward %s (before training)", eval_rewards(metrics))
            if self.engines:
                self._engine_counts = self._engine_counters()
            pending = self._launch_rollout(self.start_step)
            for step in range(self.start_step, run.num_rollout):
                t_step = time.perf_counter()
                timing: dict[str, float] = {}
                start = time.perf_counter()
                try:
                    batch = self._wait_rollout(pending, step)
                except DataExhausted as e:
                    logger.info("stopping before step %d: %s", step + 1,
                                _last_line(getattr(e, "cause", None) or e))   # the message, not Ray's traceback
                    break
                timing["timing/rollout_wait_s"] = time.perf_counter() - start
                if self.engines:
                    start = time.perf_counter()
                    self._check_engines(step)
                    engine_steps = self._engine_step_metrics(batch.metrics.get("rollout/time_s"))
                    timing["timing/engine_check_s"] = time.perf_counter() - start
                else:
                    engine_steps = {}
                state_before_next = None
                if run.async_rollout and step + 1 < run.num_rollout:
                    if self._saves_at(step):  # the data position before the next rollout starts
                        state_before_next = ray.get(self.manager.state_dict.remote())
                    pending = self._launch_rollout(step + 1)
                metrics = {**batch.metrics, **env_metrics(batch.samples), **engine_steps}
                if self.teacher is not None:
                    metrics.update(self._score_teacher(batch))
                if self.trainers:
                    metrics.update(self._train_and_push(batch, step, timing))
                    metrics.update(self._frozen_metrics(batch))
                if not run.async_rollout and step + 1 < run.num_rollout:
                    pending = self._launch_rollout(step + 1)
                if self.manager is not None and run.eval_interval and (step + 1) % run.eval_interval == 0:
                    start = time.perf_counter()
                    metrics.update(self._evaluate())
                    timing["timing/eval_s"] = time.perf_counter() - start
                if self._saves_at(step):
                    start = time.perf_counter()
                    self._save(step, state_before_next)
                    timing["timing/save_s"] = time.perf_counter() - start
                if self._exports_hf_at(step):
                    start = time.perf_counter()
                    for name, path in self.export_hf_step(step + 1).items():
                        logger.info("step %d: policy %s exported to %s", step + 1, name, path)
                    timing["timing/save_hf_s"] = time.perf_counter() - start
                timing["timing/step_s"] = time.perf_counter() - t_step
                metrics.update(timing)
                for name, version in self.weight_versions.items():
                    metrics[self._key("weight_version", name, "engine")] = version
                metrics["engine_restarts"] = self.engine_restarts
                self._log_step(step, batch, metrics)
                log.log(step + 1, metrics)
                self.history.append({"step": step + 1, **metrics})
        finally:
            if self.manager is not None and run.async_mode == "fully":
                try:
                    ray.get(self.manager.stop_stream.remote())
                except Exception as e:  # noqa: BLE001 - tear-down goes on (and a run's own error stays the one raised)
                    logger.warning("the rollout stream did not stop cleanly: %r", e)
            log.close()
        return self.history

    def _exports_hf_at(self, step: int) -> bool:
        interval = self.cfg.run.save_hf_interval
        return bool(self.trainers) and interval is not None and (step + 1) % interval == 0

    def _saves_at(self, step: int) -> bool:
        run = self.cfg.run
        if not run.save or not self.trainers:
            return False
        return step + 1 == run.num_rollout or (run.save_interval is not None and (step + 1) % run.save_interval == 0)

    def _launch_rollout(self, step: int) -> Any:
        if self.manager is None:
            return None
        if self.cfg.run.async_mode == "fully":   # the stream runs on its own; _wait_rollout takes the next batch
            return "stream"
        return self.manager.generate.remote(step)

    def _wait_rollout(self, pending: Any, step: int) -> RolloutBatch:
        import ray

        if pending is None:  # --debug-train-only
            return RolloutManager.load_debug(self.cfg.rollout.load_debug_rollout_data.format(step=step))
        if pending == "stream":
            return ray.get(self.manager.next_batch.remote(step, next(iter(self.weight_versions.values()))))
        return ray.get(pending)

    def _train_and_push(self, batch: RolloutBatch, step: int, timing: dict[str, float]) -> dict[str, float]:
        """Memory hand-over (colocated), train, push weights, hand memory back; train and push metrics."""
        import ray

        def timed(key: str, start: float) -> None:
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - start

        engines = [h for handles in self.engines.values() for h in handles]
        # the engines beside trainers: all of them when the policies share devices, else the trained policies' (a
        # frozen policy's engines have devices of their own and keep their memory and cache)
        beside = [(policy, h) for policy, handles in self.engines.items() for h in handles
                  if policy in self.trainers or self.cfg.run.policies_share_devices]
        # colocated, the engines' weights leave the device too (--release-engine-weights); a trained policy's are
        # discarded and come back empty just before its push fills them, a frozen policy's go to host memory
        weights = self.colocated and self.cfg.run.release_engine_weights
        if self.colocated:
            start = time.perf_counter()
            ray.get([h.release_memory.remote(weights=weights, keep_weights=policy not in self.trainers)
                     for policy, h in beside])
            timed("timing/onload_s", start)
        trained_versions = dict(self.weight_versions)   # the trainers' weights the batch is trained against
        metrics: dict[str, float] = {}
        for names in self._turns:   # every policy at once, or one after another when they share devices
            if self.colocated:
                start = time.perf_counter()
                ray.get([ref for name in names for ref in self.trainers[name].remote("onload")])
                timed("timing/onload_s", start)
            start = time.perf_counter()
            metrics.update(self._train(batch, names))
            timed("timing/train_s", start)
            if weights:
                start = time.perf_counter()
                ray.get([h.resume_memory.remote(weights=True, kv_cache=False) for name in names
                         for h in self.engines.get(name, [])])
                timed("timing/onload_s", start)
            if engines:
                start = time.perf_counter()
                metrics.update(self._push_weights(step + 1, names))
                timed("timing/push_s", start)
            if self.colocated:
                start = time.perf_counter()
                ray.get([ref for name in names for ref in self.trainers[name].remote("offload")])
                timed("timing/offload_s", start)
        if engines:
            metrics.update(version_lag_metrics([s for s in batch.samples if s.policy in self.trainers],
                                               trained_versions))
        if self.colocated:
            start = time.perf_counter()
            ray.get([h.resume_memory.remote() for _, h in beside])
            timed("timing/offload_s", start)
        if self._to_return:
            self._return_engines(step)
        return metrics

    def _log_step(self, step: int, batch: RolloutBatch, m: dict[str, Any]) -> None:
        policies = list(self.cfg.policies)
        train = " ".join(f"{p}: loss {_fmt(m, self._key('train', p, 'loss'), '.4f')} "
                         f"kl {_fmt(m, self._key('train', p, 'ppo_kl'), '.2e')} "
                         f"v{self.weight_versions[p]}" if p in self.trainers else f"{p}: frozen"
                         for p in policies) if self.trainers else "rollout only"
        failed = int(m.get("rollout/failed_samples", 0))
        line = (f"step {step + 1}/{self.cfg.run.num_rollout} | reward {_fmt(m, 'rollout/reward_mean')} | "
                f"eval {eval_rewards(m)} | len {_fmt(m, 'rollout/response_len_mean', '.1f')} | "
                f"{train} | failed {failed} (groups dropped {int(m.get('rollout/dropped_groups_failed', 0))}, "
                f"bad rows {int(m.get('rollout/skipped_rows', 0))}) | rollout {m.get('timing/rollout_wait_s', 0):.2f}s "
                f"train {m.get('timing/train_s', 0):.2f}s push {m.get('timing/push_s', 0):.2f}s "
                f"step {m.get('timing/step_s', 0):.2f}s | engine restarts {self.engine_restarts}")
        seconds = m.get("timing/step_s", 0.0)
        if seconds > 0:
            tokens = sum(s.response_length for s in batch.samples)
            line += f" | {len(batch.samples) / seconds:.1f} samples/s {tokens / seconds:.0f} tok/s"
        paces = [f"{p + ' ' if len(self.engines) > 1 else ''}{int(m[k + 'steps'])} steps x "
                 f"{m[k + 'step_ms']:.1f} ms ({m[k + 'requests_per_step']:.0f} req)"
                 for p in self.engines for k in [f"rollout/engine/{p + '/' if len(self.engines) > 1 else ''}"]
                 if k + "step_ms" in m]
        if paces:  # the engines' pace over the rollout: how many steps, how long each, how full
            line += " | engine " + ", ".join(paces)
        step_times = [h["timing/step_s"] for h in self.history if "timing/step_s" in h] + [seconds]
        line += f" | eta {eta(step_times, self.cfg.run.num_rollout - (step + 1))}"
        logger.info(line)
        if batch.failed:
            logger.warning("step %d failures: %s", step + 1, failure_summary(batch))

    # ---- tear-down --------------------------------------------------------------------------------------------

    def export_hf(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write each policy's current weights as an HF folder under out_dir/<policy>."""
        return {name: g.export_hf(Path(out_dir) / name) for name, g in self.trainers.items()}

    def hf_dir(self) -> Path | None:
        """Where HF exports go: --save-hf, else <--save>/hf; None without either."""
        run = self.cfg.run
        return Path(run.save_hf) if run.save_hf else Path(run.save) / "hf" if run.save else None

    def export_hf_step(self, step: int) -> dict[str, Path]:
        """Export each policy as <hf_dir>/<policy>/iter_<step> (1-based step), atomically: written to a hidden
        temporary folder beside it, then renamed (a crash leaves no partial iter_ folder; one of a resumed run's
        repeated step is replaced)."""
        import shutil

        from kiln_common.atomic_io import fsync_dir

        out: dict[str, Path] = {}
        for name, group in self.trainers.items():
            parent = self.hf_dir() / name
            parent.mkdir(parents=True, exist_ok=True)
            final = parent / f"iter_{step:07d}"
            tmp = parent / f".{final.name}.tmp.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                group.export_hf(tmp)
                if final.exists():
                    old = parent / f".{final.name}.old.{os.getpid()}"
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                fsync_dir(parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            out[name] = final
        return out

    def shutdown(self) -> None:
        """End every actor, release the placement group, and stop Ray if this driver started it."""
        import ray

        for group in self.trainers.values():
            try:
                group.shutdown()
            except Exception as e:  # noqa: BLE001 - tear-down goes on
                logger.warning("trainer group %s did not shut down cleanly: %r", group.name, e)
        for handles in self.engines.values():
            for h in handles:
                try:
                    ray.get(h.shutdown.remote(), timeout=30)
                except Exception as e:  # noqa: BLE001
                    logger.warning("engine did not shut down cleanly: %r", e)
                ray.kill(h)
        if self.manager is not None:
            ray.kill(self.manager)
        if self.teacher is not None and not isinstance(self.teacher, str):
            ray.kill(self.teacher)
        self.teacher = None
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
        self.trainers, self.engines, self.manager, self.pg = {}, {}, None, None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse flags, run the training, export each policy to <--save>/hf/<policy> at the end; the step metrics."""
    config = configure(sys.argv[1:] if argv is None else argv)
    driver = Driver(config)
    try:
        driver.setup()
        history = driver.run()
        if driver.hf_dir() is not None and driver.trainers:
            for name, path in driver.export_hf(driver.hf_dir()).items():
                logger.info("policy %s exported to %s", name, path)
        return history
    except CheckpointError as e:  # found before Ray started: one line and exit code 2, like a bad flag
        logger.error("%s", e)
        raise SystemExit(2) from None
    except EngineFailureError as e:  # engines down and no restart allowed: one line naming them and why
        logger.error("%s", e)
        raise SystemExit(1) from None
    finally:
        driver.shutdown()
