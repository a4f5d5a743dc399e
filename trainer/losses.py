"""RL policy losses (PPO, GSPO, REINFORCE), KL estimators and loss aggregation.

Every tensor argument is flat over one micro-batch's response tokens: the sequences'
response tokens concatenated, `[T]`, with `seq_lens` `[S]` saying how many belong to each
sequence. Losses and metrics are divided by a GLOBAL normaliser (loss tokens or sequences of
the whole step's batch), so summing them over the micro-batches of a step gives the batch
value whatever the split. Positions with `loss_mask == 0` (environment / tool text) never
contribute a value or a gradient, even when their log-probs are garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from kiln_common.tensors import to_device

POLICY_LOSSES = ("ppo", "gspo", "reinforce")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")

# exp() of a log-ratio beyond this overflows float32 into inf and turns gradients into NaN.
_MAX_LOG_RATIO = 20.0
_LOW_VAR_KL_BOUND = 10.0


@dataclass
class LossConfig:
    """How the policy loss is formed; see docs/losses.md."""

    policy_loss: str = "ppo"
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    dual_clip_c: float | None = None
    loss_agg_mode: str = "token_mean"
    kl_coef: float = 0.0
    kl_loss_type: str = "k3"
    use_kl_loss: bool = False
    entropy_coef: float = 0.0
    use_tis: bool = False
    tis_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss={self.policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
        if self.kl_loss_type not in KL_TYPES:
            raise ValueError(f"kl_loss_type={self.kl_loss_type!r}; valid: {', '.join(KL_TYPES)}")
        if not 0.0 < self.eps_clip < 1.0:
            raise ValueError(f"eps_clip={self.eps_clip}; must be in (0, 1)")
        if self.eps_clip_high is not None and not self.eps_clip_high > 0.0:
            raise ValueError(f"eps_clip_high={self.eps_clip_high}; must be > 0 (or None to use eps_clip)")
        if self.dual_clip_c is not None:
            if not self.dual_clip_c > 1.0:
                raise ValueError(f"dual_clip_c={self.dual_clip_c}; must be > 1 (or None to disable dual clip)")
            if self.policy_loss == "reinforce":
                raise ValueError("dual_clip_c is set but policy_loss='reinforce' has no clipping; "
                                 "use policy_loss='ppo' or 'gspo', or dual_clip_c=None")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef={self.kl_coef}; must be >= 0")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"entropy_coef={self.entropy_coef}; must be >= 0 (it is a bonus: loss -= coef * entropy)")
        if not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap={self.tis_cap}; must be > 0")

    @property
    def clip_high(self) -> float:
        """Upper clip range: eps_clip_high if set (clip-higher), else eps_clip."""
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


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

    pg = -advantages * ratio  # [T]
    metrics: dict[str, Tensor] = {}
    if cfg.policy_loss == "reinforce":
        clipped = torch.zeros_like(keep)
    else:
        pg_clipped = -advantages * ratio.clamp(1.0 - cfg.eps_clip, 1.0 + cfg.clip_high)
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

    pg_loss = agg(pg)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    metrics["pg_clipfrac"] = agg(clipped.to(logp.dtype)).detach()
    metrics["ppo_kl"] = agg(-token_log_ratio).detach()

    if ref_logp is not None:
        safe_ref = torch.where(keep, ref_logp, logp.detach())  # masked tokens: KL 0 and a finite gradient
        kl_loss = agg(kl_estimate(logp, safe_ref, cfg.kl_loss_type))
        metrics["kl_loss"] = kl_loss.detach()
        if cfg.use_kl_loss:
            loss = loss + cfg.kl_coef * kl_loss
    if entropy is not None:
        entropy_mean = agg(entropy)
        metrics["entropy"] = entropy_mean.detach()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy_mean
    if rollout_logp is not None:
        metrics["train_rollout_logp_absdiff"] = agg((old_logp - rollout_logp).abs()).detach()
    return loss, metrics
