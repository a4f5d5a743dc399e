"""RL policy losses (PPO, GSPO, CISPO, REINFORCE), MIS rejection, the SFT loss, the critic's value loss, KL
estimators, aggregation.

Every tensor argument is flat over one micro-batch's response tokens: the sequences'
response tokens concatenated, `[T]`, with `seq_lens` `[S]` saying how many belong to each
sequence. Losses and metrics are divided by a GLOBAL normaliser (loss tokens or sequences of
the whole step's batch), so summing them over the micro-batches of a step gives the batch
value whatever the split. Positions with `loss_mask == 0` (environment / tool text) never
contribute a value or a gradient, even when their log-probs are garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from kiln_common.tensors import to_device
from trainer.hooks import load_hook

LOSS_TYPES = ("policy", "sft", "custom")
_LOSS_TYPE_ALIASES = {"policy_loss": "policy", "sft_loss": "sft", "custom_loss": "custom"}  # slime's spellings
POLICY_LOSSES = ("ppo", "gspo", "reinforce", "cispo")
MIS_LEVELS = ("token", "sequence", "geometric")
# (eps_clip, eps_clip_high) used when the flags are left at None; None = no bound on that side.
DEFAULT_CLIP = {"ppo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (None, 0.28), "reinforce": (None, None)}
# A custom loss is called as fn(*CUSTOM_LOSS_ARGS, **{k: ... for k in CUSTOM_LOSS_KWARGS}) -> (loss, metrics).
CUSTOM_LOSS_ARGS = ("logp", "old_logp", "advantages", "loss_mask", "seq_lens", "cfg")
CUSTOM_LOSS_KWARGS = ("ref_logp", "rollout_logp", "entropy", "global_num_tokens", "global_num_seqs")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")

# exp() of a log-ratio beyond this overflows float32 into inf and turns gradients into NaN.
_MAX_LOG_RATIO = 20.0
_LOW_VAR_KL_BOUND = 10.0


@dataclass
class LossConfig:
    """How the policy loss is formed; see docs/losses.md."""

    loss_type: str = "policy"  # policy (policy_loss), sft (NLL of the loss-mask tokens), custom (a function)
    policy_loss: str = "ppo"  # ppo, gspo (sequence-level ratio), reinforce, cispo (clipped IS weight)
    eps_clip: float | None = None  # lower clip range; None: 0.2 for ppo, 3e-4 for gspo, no lower bound for cispo
    eps_clip_high: float | None = None  # upper clip range; None: eps_clip if set, else 0.2 / 4e-4 gspo / 0.28 cispo
    dual_clip_c: float | None = None
    loss_agg_mode: str = "token_mean"
    kl_coef: float = 0.0
    kl_loss_type: str = "k3"
    use_kl_loss: bool = False
    entropy_coef: float = 0.0
    use_tis: bool = False
    tis_cap: float = 2.0
    use_mis: bool = False  # reject tokens whose exp(old_logp - rollout_logp) is outside [mis_lower, mis_upper]
    mis_level: str = "token"  # token; sequence (product of the ratios); geometric (their geometric mean)
    mis_lower: float = 0.5  # MIS lower bound on the trainer/rollout ratio (0: none)
    mis_upper: float = 2.0  # MIS upper bound on the trainer/rollout ratio
    custom_loss_function_path: str | None = None  # 'pkg.mod:fn' for loss_type=custom; see docs/losses.md

    def __post_init__(self) -> None:
        self.loss_type = _LOSS_TYPE_ALIASES.get(self.loss_type, self.loss_type)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if (self.loss_type == "custom") != (self.custom_loss_function_path is not None):
            raise ValueError(f"loss_type={self.loss_type!r} with custom_loss_function_path="
                             f"{self.custom_loss_function_path!r}: loss_type='custom' and the path go together")
        if self.loss_type == "custom":
            load_custom_loss_function(self.custom_loss_function_path)
        if self.loss_type == "sft":
            unused = [name for name, on in (("use_tis", self.use_tis), ("use_mis", self.use_mis),
                                            ("use_kl_loss", self.use_kl_loss), ("kl_coef", self.kl_coef > 0)) if on]
            if unused:
                raise ValueError(f"loss_type='sft' is the plain NLL; {', '.join(unused)} would have no effect: "
                                 "turn them off")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss={self.policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
        if self.kl_loss_type not in KL_TYPES:
            raise ValueError(f"kl_loss_type={self.kl_loss_type!r}; valid: {', '.join(KL_TYPES)}")
        if self.eps_clip_high is not None and not self.eps_clip_high > 0.0:
            raise ValueError(f"eps_clip_high={self.eps_clip_high}; must be > 0 (or None to use eps_clip)")
        if self.eps_clip is not None and not 0.0 < self.eps_clip < 1.0:
            raise ValueError(f"eps_clip={self.eps_clip}; must be in (0, 1) (or None for the loss's default)")
        if self.dual_clip_c is not None:
            if not self.dual_clip_c > 1.0:
                raise ValueError(f"dual_clip_c={self.dual_clip_c}; must be > 1 (or None to disable dual clip)")
            if self.policy_loss in ("reinforce", "cispo"):
                raise ValueError(f"dual_clip_c is set but policy_loss={self.policy_loss!r} has no PPO clipping; "
                                 "use policy_loss='ppo' or 'gspo', or dual_clip_c=None")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef={self.kl_coef}; must be >= 0")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"entropy_coef={self.entropy_coef}; must be >= 0 (it is a bonus: loss -= coef * entropy)")
        if not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap={self.tis_cap}; must be > 0")
        if self.mis_level not in MIS_LEVELS:
            raise ValueError(f"mis_level={self.mis_level!r}; valid: {', '.join(MIS_LEVELS)}")
        if not 0.0 <= self.mis_lower <= 1.0 <= self.mis_upper or not self.mis_lower < self.mis_upper:
            raise ValueError(f"mis_lower={self.mis_lower}, mis_upper={self.mis_upper}; need "
                             "0 <= mis_lower <= 1 <= mis_upper and mis_lower < mis_upper")

    @property
    def clip_low(self) -> float | None:
        """Lower clip range (ratio >= 1 - clip_low): eps_clip if set, else the loss's default (None: no bound)."""
        return DEFAULT_CLIP[self.policy_loss][0] if self.eps_clip is None else self.eps_clip

    @property
    def clip_high(self) -> float | None:
        """Upper clip range (ratio <= 1 + clip_high): eps_clip_high if set, else eps_clip, else the default."""
        if self.eps_clip_high is not None:
            return self.eps_clip_high
        return DEFAULT_CLIP[self.policy_loss][1] if self.eps_clip is None else self.eps_clip


def load_custom_loss_function(path: str) -> Callable:
    """The custom loss at `path`, checked to accept compute_policy_loss's arguments (docs/losses.md)."""
    return load_hook(path, "custom loss function", CUSTOM_LOSS_ARGS, CUSTOM_LOSS_KWARGS)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs; [T] -> [T]."""
    if kind not in KL_TYPES:
        raise ValueError(f"kl kind={kind!r}; valid: {', '.join(KL_TYPES)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp has shape {tuple(logp.shape)} but ref_logp has {tuple(ref_logp.shape)}")
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "k3":
        return torch.expm1(-diff) + diff
    # low_var_kl: k3 clamped; the log-ratio is clamped first so exp() cannot overflow (no value change).
    diff = diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.expm1(-diff) + diff).clamp(-_LOW_VAR_KL_BOUND, _LOW_VAR_KL_BOUND)


def _seq_ids(seq_lens: Tensor, num_tokens: int, device: torch.device) -> Tensor:
    """Sequence index of every token, on `device`; [S] lengths -> [T]."""
    return torch.repeat_interleave(
        torch.arange(len(seq_lens), device=device), to_device(seq_lens, device), output_size=num_tokens)


def _check_flat(seq_lens: Tensor, logp_name: str, logp: Tensor, **tensors: Tensor | None) -> None:
    """Raise ValueError unless every tensor is flat [T] like `logp` and seq_lens is a non-negative [S] summing to T."""
    if logp.dim() != 1:
        raise ValueError(f"{logp_name} has shape {tuple(logp.shape)}; expected flat [T] over the response tokens")
    num_tokens = logp.shape[0]
    for name, t in tensors.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{num_tokens}] like {logp_name}")
    if seq_lens.dim() != 1 or seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool:
        raise ValueError("seq_lens must be a 1-D integer tensor [S], "
                         f"got {seq_lens.dtype} shape {tuple(seq_lens.shape)}")
    total = int(seq_lens.sum())
    if total != num_tokens or (len(seq_lens) and int(seq_lens.min()) < 0):
        raise ValueError(f"seq_lens {seq_lens.tolist()} must be >= 0 and sum to the {num_tokens} tokens, "
                         f"got sum {total}")


def aggregate(values: Tensor, loss_mask: Tensor, seq_lens: Tensor, mode: str, *,
              global_num_tokens: int, global_num_seqs: int) -> Tensor:
    """Reduce per-token values [T] to this micro-batch's share of the batch value (a 0-d tensor)."""
    _check_flat(seq_lens, "values", values, loss_mask=loss_mask)
    return _aggregate(values, loss_mask.bool(), seq_lens, mode, global_num_tokens, global_num_seqs)


def _aggregate(values: Tensor, keep: Tensor, seq_lens: Tensor, mode: str,
               global_num_tokens: int, global_num_seqs: int) -> Tensor:
    """aggregate() on already checked inputs; `keep` is the boolean loss mask [T]."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    # [T]; where, not *, so NaN/inf at masked tokens vanish
    masked = torch.where(keep, values, torch.zeros_like(values))
    if mode == "token_mean":
        if global_num_tokens < 1:
            raise ValueError(f"global_num_tokens={global_num_tokens}; must be >= 1 "
                             "(pass max(1, n) for a batch without loss tokens)")
        return masked.sum() / global_num_tokens
    if global_num_seqs < 1:
        raise ValueError(f"global_num_seqs={global_num_seqs}; must be >= 1")
    if mode == "seq_mean_token_sum":
        return masked.sum() / global_num_seqs
    seq_ids = _seq_ids(seq_lens, values.shape[0], values.device)
    seq_sums = masked.new_zeros(len(seq_lens)).index_add(0, seq_ids, masked)  # [S]
    seq_counts = masked.new_zeros(len(seq_lens)).index_add(0, seq_ids, keep.to(masked.dtype))  # [S]
    return (seq_sums / seq_counts.clamp(min=1)).sum() / global_num_seqs


def _gspo_log_ratio(logp: Tensor, token_log_ratio: Tensor, keep: Tensor, seq_lens: Tensor) -> Tensor:
    """Per-token log of the GSPO sequence ratio: value mean_seq(logp - old), gradient d logp_t; [T]."""
    seq_ids = _seq_ids(seq_lens, logp.shape[0], logp.device)
    detached = token_log_ratio.detach()
    seq_sums = detached.new_zeros(len(seq_lens)).index_add(0, seq_ids, detached)  # [S]
    seq_counts = detached.new_zeros(len(seq_lens)).index_add(0, seq_ids, keep.to(detached.dtype))  # [S]
    seq_log_ratio = (seq_sums / seq_counts.clamp(min=1)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [S]
    return torch.where(keep, logp - logp.detach() + seq_log_ratio[seq_ids], torch.zeros_like(logp))


def mis_accept_mask(old_logp: Tensor, rollout_logp: Tensor, loss_mask: Tensor, seq_lens: Tensor,
                    cfg: LossConfig) -> Tensor:
    """MIS: which tokens [T] keep their loss; the ratio is exp(old_logp - rollout_logp), trainer over engine.

    Level token: each token's own ratio; sequence: the product over the sequence's policy tokens; geometric:
    their geometric mean. A token (or every token of a sequence) is rejected when the ratio is outside
    [mis_lower, mis_upper]; compared in log space, so no overflow. Positions with loss_mask 0 are returned True.
    """
    _check_flat(seq_lens, "old_logp", old_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    keep = loss_mask.bool()
    log_w = torch.where(keep, old_logp.detach() - rollout_logp, torch.zeros_like(old_logp))  # [T]
    if cfg.mis_level != "token":
        seq_ids = _seq_ids(seq_lens, log_w.shape[0], log_w.device)
        seq_log_w = log_w.new_zeros(len(seq_lens)).index_add(0, seq_ids, log_w)  # [S], log of the product
        if cfg.mis_level == "geometric":
            counts = log_w.new_zeros(len(seq_lens)).index_add(0, seq_ids, keep.to(log_w.dtype))
            seq_log_w = seq_log_w / counts.clamp(min=1)
        log_w = seq_log_w[seq_ids]
    lower = math.log(cfg.mis_lower) if cfg.mis_lower > 0 else -math.inf
    inside = (log_w >= lower) & (log_w <= math.log(cfg.mis_upper))
    return inside | ~keep


def compute_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_mask: Tensor, seq_lens: Tensor,
                        cfg: LossConfig, *, ref_logp: Tensor | None = None, rollout_logp: Tensor | None = None,
                        entropy: Tensor | None = None, global_num_tokens: int,
                        global_num_seqs: int) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the RL loss, and its metrics (detached sums over the same normaliser)."""
    _check_flat(seq_lens, "logp", logp, old_logp=old_logp, advantages=advantages, loss_mask=loss_mask,
                ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy)
    if cfg.use_kl_loss and ref_logp is None:
        raise ValueError("cfg.use_kl_loss is set but ref_logp is None; pass the reference model's log-probs")
    if cfg.use_tis and rollout_logp is None:
        raise ValueError("cfg.use_tis is set but rollout_logp is None; pass the engine's rollout log-probs")
    if cfg.use_mis and rollout_logp is None:
        raise ValueError("cfg.use_mis is set but rollout_logp is None; pass the engine's rollout log-probs")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"cfg.entropy_coef={cfg.entropy_coef} but entropy is None; pass per-token entropy (with grad)")

    keep = loss_mask.bool()
    agg = partial(_aggregate, keep=keep, seq_lens=seq_lens, mode=cfg.loss_agg_mode,
                  global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    zeros = torch.zeros_like(logp)
    token_log_ratio = torch.where(keep, logp - old_logp, zeros)  # [T]
    if cfg.policy_loss == "gspo":
        log_ratio = _gspo_log_ratio(logp, token_log_ratio, keep, seq_lens)
    else:
        log_ratio = token_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)  # [T]
    advantages = advantages.to(logp.dtype)
    low = None if cfg.clip_low is None else 1.0 - cfg.clip_low
    high = None if cfg.clip_high is None else 1.0 + cfg.clip_high

    metrics: dict[str, Tensor] = {}
    if cfg.policy_loss == "reinforce":
        pg = -advantages * ratio  # [T]
        clipped = torch.zeros_like(keep)
    elif cfg.policy_loss == "cispo":
        # -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp: every token keeps its gradient, the weight is capped.
        weight = ratio.detach().clamp(min=low, max=high)
        clipped = weight != ratio.detach()
        pg = -advantages * weight * torch.where(keep, logp, zeros)
    else:
        pg = -advantages * ratio
        pg_clipped = -advantages * ratio.clamp(low, high)
        clipped = pg_clipped > pg
        pg = torch.maximum(pg, pg_clipped)
        if cfg.dual_clip_c is not None:
            lower_bound = -advantages * cfg.dual_clip_c  # caps the loss of negative-advantage tokens
            dual_clipped = (advantages < 0) & (pg > lower_bound)
            pg = torch.where(dual_clipped, lower_bound, pg)
            metrics["pg_clipfrac_lower"] = agg(dual_clipped.to(logp.dtype)).detach()

    if cfg.use_tis:
        log_w = torch.where(keep, old_logp - rollout_logp, zeros).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).detach()
        raw_w = torch.exp(log_w)  # [T]
        pg = pg * raw_w.clamp(max=cfg.tis_cap)
        metrics["tis_clipfrac"] = agg((raw_w > cfg.tis_cap).to(logp.dtype))

    # MIS: rejected tokens contribute 0 to every term (value and gradient); the normaliser is unchanged.
    accept = mis_accept_mask(old_logp, rollout_logp, loss_mask, seq_lens, cfg) if cfg.use_mis else keep
    if cfg.use_mis:
        metrics["mis_reject_frac"] = agg((~accept).to(logp.dtype)).detach()
        pg = torch.where(accept, pg, zeros)

    pg_loss = agg(pg)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    metrics["pg_clipfrac"] = agg(clipped.to(logp.dtype)).detach()
    metrics["ppo_kl"] = agg(-token_log_ratio).detach()

    if ref_logp is not None:
        safe_ref = torch.where(keep & accept, ref_logp, logp.detach())  # masked/rejected: KL 0, a finite gradient
        kl_loss = agg(kl_estimate(logp, safe_ref, cfg.kl_loss_type))
        metrics["kl_loss"] = kl_loss.detach()
        if cfg.use_kl_loss:
            loss = loss + cfg.kl_coef * kl_loss
    if entropy is not None:
        entropy_mean = agg(torch.where(accept, entropy, torch.zeros_like(entropy)))
        metrics["entropy"] = entropy_mean.detach()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy_mean
    if rollout_logp is not None:   # the engine-vs-trainer mismatch on the rollout tokens (FP8 rollout widens it)
        metrics["train_rollout_logp_absdiff"] = agg((old_logp - rollout_logp).abs()).detach()
        engine_logp = torch.where(keep, rollout_logp, old_logp).clamp(min=old_logp - _MAX_LOG_RATIO)
        metrics["train_rollout_kl"] = agg(kl_estimate(engine_logp, old_logp, "k3")).detach()  # KL(engine || trainer)
    return loss, metrics


def compute_sft_loss(logp: Tensor, loss_mask: Tensor, seq_lens: Tensor, cfg: LossConfig, *,
                     entropy: Tensor | None = None, global_num_tokens: int,
                     global_num_seqs: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised loss: aggregate(-logp) over the loss-mask tokens (token_mean: their mean NLL), minus the bonus."""
    _check_flat(seq_lens, "logp", logp, loss_mask=loss_mask, entropy=entropy)
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"cfg.entropy_coef={cfg.entropy_coef} but entropy is None; pass per-token entropy (with grad)")
    keep = loss_mask.bool()
    agg = partial(_aggregate, keep=keep, seq_lens=seq_lens, mode=cfg.loss_agg_mode,
                  global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    nll = agg(-logp)
    loss = nll
    metrics = {"sft_loss": nll.detach()}
    if entropy is not None:
        entropy_mean = agg(entropy)
        metrics["entropy"] = entropy_mean.detach()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy_mean
    return loss, metrics


def compute_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, loss_mask: Tensor, seq_lens: Tensor, *,
                       value_clip: float | None, loss_agg_mode: str = "token_mean", global_num_tokens: int,
                       global_num_seqs: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's share of the PPO value loss, 0.5 * agg(max((V - R)^2, (V_clip - R)^2)), and its metrics.

    V_clip = V_old + clip(V - V_old, -value_clip, value_clip) (PPO's value clipping); value_clip None:
    0.5 * agg((V - R)^2). All flat [T]; R the returns (GAE: A + V_old), V_old the values of the rollout.
    """
    _check_flat(seq_lens, "values", values, old_values=old_values, returns=returns, loss_mask=loss_mask)
    if value_clip is not None and not value_clip > 0:
        raise ValueError(f"value_clip={value_clip}; must be > 0 (or None: no clipping)")
    keep = loss_mask.bool()
    agg = partial(_aggregate, keep=keep, seq_lens=seq_lens, mode=loss_agg_mode,
                  global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    returns = returns.to(values.dtype)
    loss_unclipped = (values - returns).square()  # [T]
    metrics: dict[str, Tensor] = {}
    if value_clip is None:
        per_token = loss_unclipped
    else:
        old_values = old_values.to(values.dtype)
        clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
        loss_clipped = (clipped_values - returns).square()
        per_token = torch.maximum(loss_unclipped, loss_clipped)
        metrics["value_clipfrac"] = agg((loss_clipped > loss_unclipped).to(values.dtype)).detach()
    loss = 0.5 * agg(per_token)
    metrics["value_loss"] = loss.detach()
    metrics["values_mean"] = agg(values).detach()
    metrics["returns_mean"] = agg(returns).detach()
    return loss, metrics


def compute_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor | None, loss_mask: Tensor,
                 seq_lens: Tensor, cfg: LossConfig, *, ref_logp: Tensor | None = None,
                 rollout_logp: Tensor | None = None, entropy: Tensor | None = None, global_num_tokens: int,
                 global_num_seqs: int, custom_fn: Callable | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of `cfg.loss_type`: compute_policy_loss, compute_sft_loss or `custom_fn` (same arguments)."""
    if cfg.loss_type == "sft":
        return compute_sft_loss(logp, loss_mask, seq_lens, cfg, entropy=entropy,
                                global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    fn = compute_policy_loss
    if cfg.loss_type == "custom":
        if custom_fn is None:
            raise ValueError("loss_type='custom' needs custom_fn: "
                             "load_custom_loss_function(cfg.custom_loss_function_path)")
        fn = custom_fn
    out = fn(logp, old_logp, advantages, loss_mask, seq_lens, cfg, ref_logp=ref_logp, rollout_logp=rollout_logp,
             entropy=entropy, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    if cfg.loss_type == "custom":
        name = cfg.custom_loss_function_path
        if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].dim() == 0
                and isinstance(out[1], dict)):
            raise TypeError(f"custom loss function {name!r} must return (0-d loss tensor, dict of metrics), "
                            f"got {type(out).__name__}")
        bad = [k for k, v in out[1].items() if not (isinstance(k, str) and torch.is_tensor(v) and v.dim() == 0)]
        if bad:
            raise TypeError(f"custom loss function {name!r}: metrics {bad} are not str -> 0-d tensor")
    return out
