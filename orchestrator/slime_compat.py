"""slime's flag names, in one table: what each means in Kiln (docs/from_slime.md is the page for people).

Three kinds of entries:
- `Alias`: a slime flag for a concept Kiln has; it sets a Kiln flag (renamed, or to a constant for a slime
  switch, or with slime's value spelled the Kiln way). Accepted on the command line and in YAML; `--help`
  lists the slime name next to Kiln's.
- `Ignored`: a slime flag that means nothing in Kiln (Megatron kernel/fusion knobs, model-architecture
  flags Kiln reads from the HF config.json, logging extras); accepted with one warning line per flag and
  process. With `accepts`, only those values are harmless; any other value is refused with `refuse`.
- `Rejected`: a slime flag Kiln cannot honour; refused with one line saying why.

`ForeignValue` covers Kiln flags that slime also has but with values of its own (`--rm-type deepscaler`,
Megatron's `--attention-backend flash`), and `_special` the few flags whose meaning depends on others
(`--eval-prompt-data NAME PATH`, `--ref-load`, `--rollout-num-gpus[-per-engine]`, `--num-steps-per-rollout`,
`--kl-loss-coef`). Any other `--sglang-*` flag is an SGLang server knob Kiln's engine has no twin for:
ignored with a warning. A Kiln flag of the same name always wins over an entry here.

`translate(items, flags)` turns [(name, value)] (value: the command line's tokens, or a YAML value) into
Kiln's [(flag, value)], warning and refusing as above; `orchestrator.cli` calls it for both sources.

The flag tables of docs/from_slime.md are generated from these entries (`markdown_tables`;
`python -m orchestrator.slime_compat` rewrites them), and tests/test_slime_compat.py checks that no entry names a
Kiln flag (it would be dead: the Kiln flag wins), so an entry is deleted when Kiln gains the flag.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger("kiln.cli")

_NO_CONST = object()
DROP = object()  # a ForeignValue's value that is dropped (ignored) instead of translated


@dataclasses.dataclass(frozen=True)
class Alias:
    slime: str
    kiln: str
    const: Any = _NO_CONST  # slime's flag is a switch (no value) that sets the Kiln flag to this
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # slime value -> Kiln value
    note: str = ""  # for docs/from_slime.md's table

    @property
    def takes_value(self) -> bool:
        return self.const is _NO_CONST


@dataclasses.dataclass(frozen=True)
class Ignored:
    slime: str
    nargs: int | str  # 0 (a switch), 1, or "+" (several values)
    why: str
    accepts: tuple[str, ...] | None = None  # the only values that are harmless to ignore (compared as numbers
    refuse: str = ""  # when they are numbers); another value is refused with this reason


@dataclasses.dataclass(frozen=True)
class Rejected:
    slime: str
    nargs: int | str
    why: str


@dataclasses.dataclass(frozen=True)
class ForeignValue:
    flag: str  # a Kiln flag
    values: Mapping[str, Any]  # slime's value -> Kiln's value, or DROP (the flag is then ignored)
    why: str


_ARCH = "a model-architecture flag: Kiln reads the architecture from --hf-checkpoint's config.json"
_FUSION = "a Megatron kernel/fusion/precision knob with no Kiln twin (Kiln's trainer has its own kernels)"
_WANDB = "Kiln's wandb logging takes --use-wandb/--wandb-project; set WANDB_* environment variables for the rest"
_TB = "Kiln writes TensorBoard events (--use-tensorboard) to --tensorboard-dir; give that folder instead"
_OFFLOAD = "Kiln's colocated trainers and engines always give up their device memory in turn (--colocate)"

ALIASES: tuple[Alias, ...] = (
    # placement and engines
    Alias("rollout-num-gpus-per-engine", "tp-size", note="with `--colocate`: only 1 (Kiln's colocated engines span "
          "one device; rejected otherwise)"),
    Alias("sglang-ep-size", "ep-size", note="MoE experts split over each engine's tp ranks (a divisor of `--tp-size`)"),
    Alias("sglang-mem-fraction-static", "mem-fraction-static"),
    Alias("sglang-context-length", "context-length"),
    Alias("rollout-max-context-len", "context-length", note="the engine's context length"),
    Alias("sglang-chunked-prefill-size", "chunked-prefill-size"),
    Alias("sglang-max-running-requests", "max-running-requests"),
    Alias("sglang-server-concurrency", "rollout-concurrency", note="generate calls in flight per engine"),
    Alias("sglang-max-total-tokens", "max-total-tokens"),
    Alias("sglang-page-size", "page-size"),
    Alias("sglang-schedule-policy", "schedule-policy"),
    Alias("sglang-disable-radix-cache", "disable-radix-cache"),
    Alias("sglang-cuda-graph-max-bs", "cuda-graph-max-bs"),
    Alias("sglang-disable-cuda-graph", "disable-cuda-graph"),
    Alias("sglang-disable-overlap-schedule", "disable-overlap-schedule"),
    Alias("sglang-random-seed", "random-seed"),
    Alias("sglang-dtype", "dtype"),
    Alias("sglang-kv-cache-dtype", "kv-cache-dtype", note="`auto` or `fp8_e4m3` (per-head scales from the weights)"),
    Alias("sglang-served-model-name", "served-model-name"),
    Alias("sglang-attention-backend", "attention-backend", values={"torch_native": "torch"}),
    Alias("mask-offpolicy-in-partial-rollout", "offpolicy-tokens", const="mask"),
    Alias("use-fault-tolerance", "fault-tolerance"),
    Alias("rollout-health-check-interval", "health-check-interval"),
    Alias("rollout-health-check-timeout", "engine-health-timeout"),
    Alias("check-weight-update-equal", "check-weight-update"),
    Alias("use-rollout-routing-replay", "use-routing-replay", const=True,
          note="the engine's recorded experts replayed in the trainer (R3); Kiln has no trainer-side R2"),
    # trainer parallelism and memory
    Alias("tensor-model-parallel-size", "tensor-parallel-size"),
    Alias("pipeline-model-parallel-size", "pipeline-parallel-size"),
    Alias("recompute-granularity", "recompute", note="`full` / `selective` as in slime"),
    Alias("log-probs-chunk-size", "logprob-chunk-tokens", note="tokens per chunk of the fused log-prob"),
    # optimiser
    Alias("lr-warmup-iters", "lr-warmup-steps"),
    Alias("lr-decay-iters", "lr-decay-steps"),
    # RL loss and advantages
    Alias("kl-loss-coef", "kl-coef", note="slime applies it only with `--use-kl-loss`; Kiln's one `--kl-coef` goes "
          "to the loss with `--use-kl-loss`, else to the reward. `--kl-loss-coef A --kl-coef B` with both non-zero "
          "and different is rejected"),
    Alias("eps-clip-c", "dual-clip-c"),
    Alias("tis-clip", "tis-cap"),
    Alias("disable-grpo-std-normalization", "normalize-advantages-std", const=False),
    Alias("use-rollout-logprobs", "recompute-old-logprobs", const=False),
    Alias("calculate-per-token-loss", "loss-agg-mode", const="token_mean", note="Kiln's default already; slime's "
          "default (per-sample mean) is Kiln's `--loss-agg-mode seq_mean_token_mean`"),
)

IGNORED: tuple[Ignored, ...] = (
    *(Ignored(name, 1, _ARCH) for name in (
        "num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups", "kv-channels",
        "vocab-size", "padded-vocab-size", "normalization", "norm-epsilon", "rotary-base", "seq-length",
        "max-position-embeddings", "position-embedding-type", "rotary-percent", "make-vocab-size-divisible-by",
        "num-experts", "moe-ffn-hidden-size", "moe-router-topk")),
    *(Ignored(name, 0, _ARCH) for name in (
        "swiglu", "group-query-attention", "use-rotary-position-embeddings", "disable-bias-linear",
        "add-qkv-bias", "qk-layernorm", "untie-embeddings-and-output-weights")),
    Ignored("attention-dropout", 1, "Kiln trains without dropout", accepts=("0",),
            refuse="Kiln's trainer has no dropout; drop the flag or pass 0"),
    Ignored("hidden-dropout", 1, "Kiln trains without dropout", accepts=("0",),
            refuse="Kiln's trainer has no dropout; drop the flag or pass 0"),
    *(Ignored(name, 0, _FUSION) for name in (
        "accumulate-allreduce-grads-in-fp32", "attention-softmax-in-fp32", "no-gradient-accumulation-fusion",
        "no-masked-softmax-fusion", "no-bias-gelu-fusion", "no-bias-swiglu-fusion", "no-bias-dropout-fusion",
        "no-rope-fusion", "use-flash-attn", "overlap-grad-reduce", "overlap-param-gather", "sequence-parallel")),
    Ignored("transformer-impl", 1, _FUSION),
    *(Ignored(name, 0, _FUSION) for name in ("moe-grouped-gemm", "moe-permute-fusion")),
    Ignored("moe-token-dispatcher-type", 1, "Kiln's MoE layer dispatches with all-to-all"),
    Ignored("moe-router-dtype", 1, "Kiln's MoE router runs in float32", accepts=("fp32",),
            refuse="Kiln's MoE router runs in float32; drop the flag or pass fp32"),
    Ignored("moe-router-score-function", 1, "Kiln's MoE router is a softmax (Qwen3-MoE)", accepts=("softmax",),
            refuse="Kiln's MoE router is a softmax top-k (Qwen3-MoE); sigmoid routers are not supported"),
    Ignored("megatron-to-hf-mode", 1, "Kiln's trainer is built from the HF checkpoint; there is no conversion"),
    Ignored("ref-load", 1, "a Megatron torch_dist copy of the model: Kiln's reference model is --hf-checkpoint "
            "(give --ref-checkpoint HF_DIR for another one)"),
    Ignored("train-backend", 1, "Kiln has one trainer", accepts=("megatron",),
            refuse="Kiln has one trainer (Megatron-style, built from the HF checkpoint); there is no FSDP backend"),
    Ignored("optimizer", 1, "Kiln's optimizer is AdamW", accepts=("adam",),
            refuse="Kiln's optimizer is AdamW (--lr, --adam-beta1/2, --weight-decay); there is no SGD"),
    Ignored("micro-batch-size", 1, "Kiln packs micro-batches by --max-tokens-per-gpu"),
    Ignored("use-dynamic-batch-size", 0, "Kiln always packs micro-batches by --max-tokens-per-gpu"),
    Ignored("recompute-method", 1, "Kiln's --recompute full recomputes every layer (slime's uniform, 1 layer)"),
    Ignored("recompute-num-layers", 1, "Kiln's --recompute full recomputes every layer (slime's uniform, 1 layer)"),
    Ignored("expert-tensor-parallel-size", 1, "Kiln's trainer has no such parallelism", accepts=("1",),
            refuse="Kiln's trainer splits experts over data-parallel ranks only (--expert-model-parallel-size); "
                   "pass 1 or drop the flag"),
    Ignored("tis-clip-low", 1, "Kiln's TIS caps from above only", accepts=("0",),
            refuse="Kiln's TIS has an upper cap only (--tis-cap); drop the flag or pass 0"),
    Ignored("eval-top-p", 1, "Kiln evaluates with top-p 1", accepts=("1",),
            refuse="--eval-prompt-data is evaluated with top-p 1 (--eval-temperature is its knob); drop the flag, "
                   "pass 1, or give the set a top_p in --eval-config"),
    Ignored("eval-top-k", 1, "Kiln evaluates with top-k off", accepts=("-1",),
            refuse="--eval-prompt-data is evaluated with top-k off; drop the flag, pass -1, or give the set a top_k "
                   "in --eval-config"),
    Ignored("distributed-backend", 1, "Kiln picks NCCL on GPUs and gloo on CPU"),
    Ignored("distributed-timeout-minutes", 1, "Kiln's weight pushes time out after --weight-sync-timeout"),
    Ignored("tb-project-name", 1, _TB),
    Ignored("tb-experiment-name", 1, _TB),
    *(Ignored(name, 1, _WANDB) for name in (
        "wandb-group", "wandb-key", "wandb-team", "wandb-host", "wandb-mode", "wandb-dir", "wandb-run-id")),
    Ignored("disable-wandb-random-suffix", 0, _WANDB),
    Ignored("offload", 0, _OFFLOAD),
    Ignored("offload-train", 0, _OFFLOAD),
    Ignored("offload-rollout", 0, _OFFLOAD),
    Ignored("no-save-optim", 0, "Kiln's checkpoints always hold the optimizer state (resumes are exact)"),
    Ignored("log-passrate", 0, "Kiln logs its own reward statistics each step"),
)

REJECTED: tuple[Rejected, ...] = (
    Rejected("rollout-function-path", 1, "Kiln's rollout loop is fixed; customise it with "
             "--custom-generate-function-path (per sample) and --dynamic-sampling-filter-path (per group)"),
    Rejected("custom-convert-samples-to-train-data-path", 1, "Kiln trains on Sample objects directly"),
    Rejected("custom-megatron-init-path", 1, "Kiln's trainer is not Megatron-LM"),
    Rejected("custom-model-provider-path", 1, "Kiln's trainer builds the model from the HF config"),
    Rejected("normalize-advantages", 0, "Kiln normalizes advantages per group (--normalize-advantages-std), "
             "it has no batch-wide whitening"),
    Rejected("disable-rewards-normalization", 0, "Kiln's group-relative estimators always subtract the group "
             "mean; pick another --advantage-estimator (e.g. reinforce_plus_plus)"),
    Rejected("use-opsm", 0, "Kiln has no off-policy sequence masking"),
    Rejected("keep-old-actor", 0, "Kiln's old log-probs come from the trainer's current weights before the update "
             "(or the rollout with --no-recompute-old-logprobs)"),
    Rejected("ref-update-interval", 1, "Kiln's reference model is frozen"),
    Rejected("rollout-external-engine-addrs", "+", "Kiln starts its own engines (weights are pushed into them)"),
    Rejected("rollout-buffer-url", 1, "Kiln has no external rollout buffer"),
    Rejected("enable-mtp-training", 0, "Kiln does not train multi-token-prediction layers"),
    Rejected("fp16", 0, "Kiln trains in bf16 (--bf16) or fp32 (--no-bf16), not fp16"),
)

FOREIGN_VALUES: tuple[ForeignValue, ...] = (
    ForeignValue("rm-type", {"deepscaler": "math", "dapo": "math"},
                 "read as Kiln's math reward (the last \\boxed{} or number against the label; slime's deepscaler "
                 "also scores 0 when there is no </think>)"),
    ForeignValue("loss-type", {"policy_loss": "policy", "sft_loss": "sft", "custom_loss": "custom"},
                 "spelled the Kiln way"),
    ForeignValue("attention-backend", {v: DROP for v in ("flash", "fused", "unfused", "local", "auto")},
                 "ignored: that is Megatron's trainer attention kernel; Kiln's --attention-backend chooses the "
                 "engine's (torch, triton, flashinfer)"),
)

_SGLANG_PREFIX = "sglang-"
_SPECIAL = ("eval-prompt-data", "ref-load", "rollout-num-gpus", "num-steps-per-rollout")
# names handled by _special before the table; listed in docs/from_slime.md like the others
SPECIAL_DOC = {
    "eval-prompt-data": "--eval-prompt-data (slime's NAME PATH pair: the name is dropped; several pairs rejected)",
    "ref-load": "an HF folder other than --hf-checkpoint: --ref-checkpoint; else ignored",
    "rollout-num-gpus": "--rollout-num-engines = it / --rollout-num-gpus-per-engine",
    "num-steps-per-rollout": "--global-batch-size = rollout-batch-size × n-samples-per-prompt / it",
}

_warned: set[str] = set()


class CompatError(ValueError):
    """A slime flag Kiln cannot honour (one line, naming the flag and why)."""


def warn_once(name: str, message: str) -> None:
    """Log `--name: message` once per process and flag."""
    if name not in _warned:
        _warned.add(name)
        logger.warning("--%s: %s", name, message)


def reset_warnings() -> None:
    """Forget which flags were warned about (tests)."""
    _warned.clear()


def tables(kiln_flags: Sequence[str]) -> tuple[dict[str, Alias], dict[str, Ignored], dict[str, Rejected],
                                                dict[str, ForeignValue]]:
    """The entries that apply next to these Kiln flags: a Kiln flag's own name wins; aliases of absent flags drop."""
    kiln = set(kiln_flags)
    aliases = {a.slime: a for a in ALIASES if a.kiln in kiln and a.slime not in kiln}
    ignored = {i.slime: i for i in IGNORED if i.slime not in kiln}
    rejected = {r.slime: r for r in REJECTED if r.slime not in kiln}
    foreign = {f.flag: f for f in FOREIGN_VALUES if f.flag in kiln}
    return aliases, ignored, rejected, foreign


def known_names(kiln_flags: Sequence[str]) -> set[str]:
    """Every slime name accepted next to these Kiln flags (aliases, ignored, rejected, special)."""
    aliases, ignored, rejected, _ = tables(kiln_flags)
    kiln = set(kiln_flags)
    return set(aliases) | set(ignored) | set(rejected) | {s for s in _SPECIAL if s not in kiln}


def _same(value: str, accepted: str) -> bool:
    try:
        return float(value) == float(accepted)
    except ValueError:
        return value == accepted


def _scalar(value: Any) -> Any:
    """One value of an item: the single token of a command-line flag, or a YAML scalar."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _number(value: Any, name: str) -> int:
    try:
        return int(float(_scalar(value)))
    except (TypeError, ValueError):
        raise CompatError(f"--{name}: expected an integer, got {_scalar(value)!r}") from None


def translate(items: Sequence[tuple[str, Any]], flags: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """slime's [(name, value)] -> Kiln's [(flag, value)], warning about ignored ones, CompatError for refused ones.

    `flags`: Kiln's flag names (a mapping; only the keys are read). A value is a list of command-line tokens
    (empty for a switch) or a YAML value; translated values keep that form (a switch's constant is a Python value).
    """
    aliases, ignored, rejected, foreign = tables(list(flags))
    given = {name: value for name, value in items}
    _colocated_tp(given)
    out: list[tuple[str, Any]] = []
    for name, value in items:
        if name == "eval-prompt-data" and name in flags and isinstance(value, list):
            out.append((name, _eval_pairs([str(v) for v in value])))
        elif name in flags:
            fv = foreign.get(name)
            key = _scalar(value)
            if fv is not None and isinstance(key, str) and key in fv.values:
                warn_once(name, f"{key!r} is slime's; {fv.why}")
                if fv.values[key] is not DROP:
                    out.append((name, [fv.values[key]] if isinstance(value, list) else fv.values[key]))
                continue
            out.append((name, value))
        elif name in _SPECIAL:
            out.extend(_special(name, value, given, flags))
        elif name in aliases:
            alias = aliases[name]
            if not alias.takes_value:
                if value not in ([], None, True):
                    if value is False:  # YAML `slime_switch: false` = slime's default = leave Kiln's alone
                        continue
                    raise CompatError(f"--{name} is a switch; it takes no value (got {value!r})")
                out.append((alias.kiln, alias.const))
                continue
            key = _scalar(value)
            if isinstance(key, str) and key in alias.values:
                value = [alias.values[key]] if isinstance(value, list) else alias.values[key]
            out.append((alias.kiln, value))
        elif name in rejected:
            raise CompatError(f"--{name} (slime) is not supported: {rejected[name].why}")
        elif name in ignored:
            entry = ignored[name]
            if entry.accepts is not None:
                key = _scalar(value)
                if not any(_same(str(key), ok) for ok in entry.accepts):
                    raise CompatError(f"--{name} {key} (slime) is not supported: {entry.refuse}")
            warn_once(name, f"ignored (slime flag): {entry.why}")
        elif name.startswith(_SGLANG_PREFIX):
            warn_once(name, "ignored (slime's SGLang server flag): Kiln's engine has no twin for it")
        else:
            out.append((name, value))  # unknown: the caller's parser reports it
    _check_kl(given)
    return out


def _check_kl(given: Mapping[str, Any]) -> None:
    if "kl-loss-coef" in given and "kl-coef" in given:
        try:
            loss, reward = float(_scalar(given["kl-loss-coef"])), float(_scalar(given["kl-coef"]))
        except (TypeError, ValueError):
            return
        if loss and reward and loss != reward:
            raise CompatError(f"--kl-loss-coef {loss} with --kl-coef {reward} (slime: KL in the loss and in the "
                              "reward) is not supported: Kiln has one KL coefficient, in the loss with "
                              "--use-kl-loss, else in the reward")


def _special(name: str, value: Any, given: Mapping[str, Any], flags: Mapping[str, Any]) -> list[tuple[str, Any]]:
    if name == "eval-prompt-data":  # only reached when Kiln has no flag of this name
        return []
    if name == "ref-load":
        path = _scalar(value)
        hf = _scalar(given.get("hf-checkpoint"))
        if isinstance(path, str) and (Path(path) / "config.json").is_file() and path != hf:
            return [("ref-checkpoint", value)]
        warn_once(name, f"ignored (slime flag): {next(i.why for i in IGNORED if i.slime == name)}")
        return []
    if name == "rollout-num-gpus":
        per_engine = _number(given.get("rollout-num-gpus-per-engine", given.get("tp-size", [1])), "tp-size")
        gpus = _number(value, name)
        if "rollout-num-engines" in given:
            warn_once(name, "ignored (slime flag): --rollout-num-engines is given")
            return []
        if gpus % per_engine:
            raise CompatError(f"--rollout-num-gpus {gpus} is not a multiple of --rollout-num-gpus-per-engine "
                              f"{per_engine}")
        engines = gpus // per_engine
        return [("rollout-num-engines", [str(engines)] if isinstance(value, list) else engines)]
    if name == "num-steps-per-rollout":
        steps = _number(value, name)
        default = {"rollout-batch-size": 32, "n-samples-per-prompt": 8}
        for flag in default:
            if flag in flags and getattr(flags[flag], "default", None) is not None:
                default[flag] = flags[flag].default
        batch = _number(given.get("rollout-batch-size", default["rollout-batch-size"]), "rollout-batch-size")
        n = _number(given.get("n-samples-per-prompt", default["n-samples-per-prompt"]), "n-samples-per-prompt")
        if steps < 1 or (batch * n) % steps:
            raise CompatError(f"--num-steps-per-rollout {steps} does not divide rollout-batch-size × "
                              f"n-samples-per-prompt = {batch * n}")
        if "global-batch-size" in given:
            raise CompatError("--num-steps-per-rollout and --global-batch-size both set the optimizer batch; "
                              "give one")
        gbs = batch * n // steps
        return [("global-batch-size", [str(gbs)] if isinstance(value, list) else gbs)]
    raise AssertionError(name)


def _colocated_tp(given: Mapping[str, Any]) -> None:
    """slime's colocated engines may span several GPUs; Kiln's span one: refuse `--colocate` with more."""
    if "rollout-num-gpus-per-engine" not in given:
        return
    colocate = given.get("colocate", False)  # slime's default: not colocated (Kiln's --no-colocate/--colocate)
    if colocate in (True, []) and _number(given["rollout-num-gpus-per-engine"], "rollout-num-gpus-per-engine") > 1:
        raise CompatError(f"--rollout-num-gpus-per-engine {_scalar(given['rollout-num-gpus-per-engine'])} with "
                          "--colocate (slime) is not supported: Kiln's colocated engines span one device each; "
                          "pass 1, or --no-colocate with --rollout-num-engines N")


def _eval_pairs(tokens: list[str]) -> list[str]:
    """slime's `--eval-prompt-data NAME PATH`: Kiln's one PATH (the name dropped with a warning)."""
    if len(tokens) <= 1:
        return tokens
    if len(tokens) == 2:
        warn_once("eval-prompt-data", f"slime's dataset name {tokens[0]!r} dropped (logged as eval/...; name sets "
                  f"in --eval-config): {tokens[1]}")
        return [tokens[1]]
    raise CompatError(f"--eval-prompt-data {' '.join(tokens)} (slime: several NAME PATH pairs) is not supported: "
                      "Kiln's --eval-prompt-data is one file; list several sets (name, path, ...) in "
                      "--eval-config FILE.yaml")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_tables() -> str:
    """docs/from_slime.md's three flag tables (aliases, ignored, rejected), generated from the entries above."""
    out = ["### Aliases: slime's name for a Kiln flag", "", "| slime flag | Kiln | notes |", "| --- | --- | --- |"]
    for a in ALIASES:
        if a.takes_value:
            kiln = f"`--{a.kiln}`" + (" (" + ", ".join(f"`{k}` → `{v}`" for k, v in a.values.items()) + ")"
                                      if a.values else "")
        else:
            const = str(a.const).lower() if isinstance(a.const, bool) else a.const
            kiln = f"`--{a.kiln} {const}`"
        out.append(f"| `--{a.slime}` | {kiln} | {_cell(a.note)} |")
    out += ["", "### Ignored: accepted, one warning line each", "", "| slime flag | Kiln | why |",
            "| --- | --- | --- |"]
    for i in IGNORED:
        takes = " X" if i.nargs else ""
        if i.accepts is None:
            out.append(f"| `--{i.slime}`{takes} | ignored | {_cell(i.why)} |")
        else:
            out.append(f"| `--{i.slime}`{takes} | ignored for {' / '.join(i.accepts)}, else rejected | "
                       f"{_cell(i.refuse)} |")
    out += ["", "### Rejected: Kiln cannot honour them", "", "| slime flag | Kiln | why |", "| --- | --- | --- |"]
    for r in REJECTED:
        out.append(f"| `--{r.slime}`{' X' if r.nargs else ''} | rejected | {_cell(r.why)} |")
    return "\n".join(out) + "\n"


DOC = Path(__file__).resolve().parents[1] / "docs" / "from_slime.md"
DOC_BEGIN = "<!-- flag tables: generated by `python -m orchestrator.slime_compat` from orchestrator/slime_compat.py -->"
DOC_END = "<!-- end of the generated flag tables -->"


def doc_tables(text: str) -> str:
    """The generated part of docs/from_slime.md's text (between the DOC_BEGIN and DOC_END lines)."""
    return text.split(DOC_BEGIN + "\n", 1)[1].split(DOC_END + "\n", 1)[0]


def with_tables(text: str) -> str:
    """docs/from_slime.md's text with markdown_tables() between its DOC_BEGIN and DOC_END lines."""
    head, rest = text.split(DOC_BEGIN + "\n", 1)
    return head + DOC_BEGIN + "\n\n" + markdown_tables() + "\n" + DOC_END + "\n" + rest.split(DOC_END + "\n", 1)[1]


if __name__ == "__main__":   # rewrite docs/from_slime.md's flag tables from the entries
    DOC.write_text(with_tables(DOC.read_text()))
    print(f"{DOC}: flag tables rewritten", file=sys.stderr)
