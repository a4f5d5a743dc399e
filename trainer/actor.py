"""TrainerActor: one megatron-core policy trainer rank (plain class; the driver wraps it in ray.remote)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kiln_common.atomic_io import FileDigest, atomic_torch_save
from kiln_common.tensors import to_device
from kiln_common.sample import Sample, Status
from trainer import attention, bridge, megatron_compat, moe
from trainer.advantages import (compute_advantages, compute_gae, custom_advantages, load_custom_advantage_function,
                                opd_penalty, overlong_penalty)
from trainer.batching import (CostModel, MicroBatch, data_parallel_shares, pack_micro_batches,
                              plan_micro_batches, split_global_batches)
from trainer.config import TrainerConfig
from trainer.context_parallel import ContextParallel, gather_shards
from trainer.critic import ValueModel, critic_optimizer_config, drop_output_layer
from trainer.logprobs import chunked_logprobs
from trainer.losses import compute_loss, compute_value_loss, kl_estimate, load_custom_loss_function
from trainer.optimizer import PolicyOptimizer, build_optimizer
from trainer.pipeline import PipelineSchedule

logger = logging.getLogger(__name__)

MODELS = ("actor", "ref", "teacher")



def flatten_parameters(model: torch.nn.Module, device: torch.device, pin_memory: bool = False) -> int:
    """Put every parameter of `model` into one contiguous buffer per dtype on `device`, as views; returns bytes moved.

    Like megatron's DDP parameter buffer: offload and onload move one buffer per dtype, and a colocated
    weight push shares one CUDA IPC handle per buffer (one per parameter otherwise), from which the
    engine copies its weights in place. Values are copied exactly; the Parameter objects stay the same,
    so the optimizer and autograd hooks are unaffected. A dtype whose parameters already share one
    buffer on `device` is left alone. Bytes count only those that changed device.
    """
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in dict.fromkeys(model.parameters()):  # a tied parameter once
        groups.setdefault(p.dtype, []).append(p)
    moved = 0
    with torch.no_grad():
        for dtype, params in groups.items():
            base = params[0].untyped_storage().data_ptr()
            if all(p.device == device and p.untyped_storage().data_ptr() == base for p in params):
                continue  # already one buffer on `device`
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device, pin_memory=pin_memory)
            offset = 0
            for p in params:
                view = flat[offset:offset + p.numel()].view(p.shape)
                view.copy_(p.data, non_blocking=True)
                if p.device != device:
                    moved += p.numel() * p.element_size()
                p.data = view
                offset += p.numel()
    return moved


class TrainerActor:
    """One rank of the policy trainer: megatron GPTModel (TP/PP/DP), AdamW, RL train step, checkpoints."""

    def __init__(self, config: TrainerConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        mp = config.tensor_parallel_size * config.pipeline_parallel_size * config.context_parallel_size
        if world_size % mp:
            raise ValueError(f"world_size {world_size} is not a multiple of TP*PP*CP = {mp}")
        self.cfg = config
        self.rank, self.world_size = rank, world_size
        self.master_addr, self.master_port = master_addr, int(master_port)
        self.model = self.ref_model = self.optimizer = None
        self.critic = self.critic_optimizer = self.teacher_model = None
        self.step = 0
        path = config.loss.custom_loss_function_path
        self.custom_loss = load_custom_loss_function(path) if config.loss.loss_type == "custom" else None
        path = config.custom_advantage_function_path
        self.custom_advantage = load_custom_advantage_function(path) if path is not None else None

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    def init(self) -> None:
        """Join the process group, set up megatron parallel state, build and load the model(s) and optimizer."""
        from megatron.core import parallel_state

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(self.rank % torch.cuda.device_count())
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self._owns_process_group = not dist.is_initialized()
        if self._owns_process_group:
            dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://{self.master_addr}:"
                                    f"{self.master_port}", rank=self.rank, world_size=self.world_size)
        megatron_compat.apply()
        parallel_state.initialize_model_parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size,
                                                 context_parallel_size=cfg.context_parallel_size,
                                                 expert_model_parallel_size=cfg.expert_model_parallel_size)
        megatron_compat.model_parallel_manual_seed(cfg.seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = cfg.context_parallel_size
        # gradients are partial over the CP ranks (each holds part of every sequence): reduce over DP x CP
        self.grad_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.params_dtype = torch.bfloat16 if on_gpu and cfg.bf16 else torch.float32
        self.autocast = on_gpu and not cfg.bf16  # fp32 parameters computing in bf16
        self.pipeline = PipelineSchedule(self.pp_group, dtype=self.params_dtype, device=self.device)
        self.spec = bridge.load_spec(cfg.hf_checkpoint)
        self.cost_model = CostModel.for_model(self.spec)  # balance_data: a sequence's compute ~ n + w n^2
        self.model = self._build(cfg.hf_checkpoint, trainable=True)
        self.replay = moe.install_routing_replay(self.model, self.spec) if cfg.use_routing_replay else None
        if cfg.use_reference:
            ref_dir = cfg.ref_checkpoint or cfg.hf_checkpoint
            if bridge.load_spec(ref_dir) != self.spec:
                raise ValueError(f"ref_checkpoint {ref_dir} has a different architecture than {cfg.hf_checkpoint}")
            self.ref_model = self._build(ref_dir, trainable=False)
        if cfg.use_opd and cfg.opd_type == "megatron":
            teacher_spec = bridge.load_spec(cfg.opd_teacher_load)
            if teacher_spec.vocab_size != self.spec.vocab_size:
                raise ValueError(f"opd_teacher_load {cfg.opd_teacher_load} has another vocabulary than "
                                 f"{cfg.hf_checkpoint}; the teacher scores the student's tokens")
            if self.pipeline.size > 1 and teacher_spec != self.spec:
                raise ValueError("with pipeline parallelism the trainer's OPD teacher must have the policy's "
                                 "architecture; serve another one (opd_type='engine')")
            self.teacher_model = self._build(cfg.opd_teacher_load, trainable=False, check_spec=False)
        embedding_group = parallel_state.get_embedding_group(check_initialized=False)
        if cfg.use_critic:
            self.critic = self._build_critic(cfg.critic.critic_load or cfg.hf_checkpoint)
            self.critic_optimizer = PolicyOptimizer(self.critic, critic_optimizer_config(cfg), dp_group=self.grad_group,
                                                    tp_group=self.tp_group, tp_rank=self.tp_rank,
                                                    pp_group=self.pp_group, embedding_group=embedding_group)
        self.optimizer = build_optimizer(self.model, cfg, dp_group=self.grad_group, tp_group=self.tp_group,
                                         tp_rank=self.tp_rank, pp_group=self.pp_group,
                                         embedding_group=embedding_group)
        self.vocab_start = self.tp_rank * (self.model.vocab_size // cfg.tensor_parallel_size)

    def _build(self, hf_dir: str, *, trainable: bool, check_spec: bool = True, flatten: bool = True):
        """A GPTModel for this rank with weights loaded from `hf_dir` (its own architecture if not check_spec)."""
        spec = self.spec if check_spec else bridge.load_spec(hf_dir)
        tconfig = bridge.build_transformer_config(spec, tp_size=self.cfg.tensor_parallel_size,
                                                  pp_size=self.cfg.pipeline_parallel_size,
                                                  params_dtype=self.params_dtype, recompute=self.cfg.recompute,
                                                  ep_size=self.cfg.expert_model_parallel_size,
                                                  moe_aux_loss_coeff=self.cfg.moe_aux_loss_coeff)
        model = bridge.build_gpt_model(spec, tconfig, vocab_pad_multiple=self.cfg.vocab_pad_multiple,
                                       pre_process=self.pipeline.is_first, post_process=self.pipeline.is_last)
        bridge.load_hf_checkpoint(model, spec, hf_dir)
        if flatten:
            flatten_parameters(model, self.device)
        if not trainable:  # frozen by use: no optimizer, forward under no_grad only. Its parameters keep
            model.eval()  # requires_grad so megatron runs the same linear path as the policy's (bit-equal log-probs)
        return model

    def _build_critic(self, hf_dir: str) -> ValueModel:
        """The critic: a trunk loaded from `hf_dir` (the policy's architecture) and a zero value head."""
        if bridge.load_spec(hf_dir) != self.spec:
            raise ValueError(f"critic_load {hf_dir} has a different architecture than {self.cfg.hf_checkpoint}")
        gpt = self._build(hf_dir, trainable=True, flatten=False)
        drop_output_layer(gpt)
        critic = ValueModel(gpt, self.spec.hidden_size, self.device)
        flatten_parameters(critic, self.device)
        return critic

    def shutdown(self) -> None:
        """Tear down megatron parallel state, and the process group if `init` created it."""
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------
    # samples
    # ------------------------------------------------------------------------------------------

    def _screen(self, samples: list[Sample], *, need_reward: bool) -> list[int]:
        """Indices of usable samples; the others are marked FAILED with the reason in `error`."""
        good = []
        for i, s in enumerate(samples):
            try:
                self._check_sample(s, need_reward=need_reward)
            except ValueError as e:
                s.status, s.error = Status.FAILED, f"trainer: {e}"
                logger.warning("sample %s marked failed: %s", s.index, e)
                continue
            good.append(i)
        return good

    def _check_sample(self, s: Sample, *, need_reward: bool) -> None:
        s.validate()
        if self.replay is not None and s.routed_experts is not None:
            try:
                moe.check_routed_experts(s.routed_experts, len(s.tokens), self.spec)
            except ValueError as e:
                raise ValueError(f"sample {s.index}: {e}") from None
        if s.status in (Status.FAILED, Status.ABORTED):
            raise ValueError(f"sample {s.index} has status {s.status.value}")
        if s.response_length < 1 or s.prompt_length < 1:
            raise ValueError(f"sample {s.index}: needs >= 1 prompt and >= 1 response token, got prompt "
                             f"{s.prompt_length}, response {s.response_length}")
        bad = [t for t in s.tokens if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"sample {s.index}: token ids {bad[:5]} outside [0, {self.spec.vocab_size})")
        limit = min(self.cfg.max_tokens_per_gpu * self.cfg.context_parallel_size, self.spec.max_position_embeddings)
        if len(s.tokens) > limit:
            raise ValueError(f"sample {s.index}: {len(s.tokens)} tokens exceed the limit {limit} "
                             "(max_tokens_per_gpu / max_position_embeddings)")
        if need_reward:
            self._reward(s)
            if not self.cfg.recompute_old_logprobs and len(s.rollout_logprobs) != s.response_length:
                raise ValueError(f"sample {s.index}: recompute_old_logprobs=False needs rollout_logprobs")
            if self.cfg.loss.use_tis and len(s.rollout_logprobs) != s.response_length:
                raise ValueError(f"sample {s.index}: loss.use_tis needs rollout_logprobs")
            if self.cfg.loss.use_mis and len(s.rollout_logprobs) != s.response_length:
                raise ValueError(f"sample {s.index}: loss.use_mis needs rollout_logprobs")
            if self.cfg.use_opd and self.cfg.opd_type == "engine" and len(s.teacher_logprobs) != s.response_length:
                raise ValueError(f"sample {s.index}: use_opd (opd_type 'engine') needs the teacher's log-probs "
                                 f"(teacher_logprobs: {len(s.teacher_logprobs)} for {s.response_length} tokens)")
            if self.cfg.use_opd and not all(map(math.isfinite, s.teacher_logprobs)):
                raise ValueError(f"sample {s.index}: teacher_logprobs are not all finite")

    def _reward(self, s: Sample) -> float:
        reward = s.reward
        if isinstance(reward, dict):
            if self.cfg.reward_key is None or self.cfg.reward_key not in reward:
                raise ValueError(f"sample {s.index}: reward is a dict with keys {sorted(reward)}; set reward_key "
                                 f"to one of them (now {self.cfg.reward_key!r})")
            reward = reward[self.cfg.reward_key]
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            raise ValueError(f"sample {s.index}: reward {reward!r} is not a finite number")
        return float(reward)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def _plan(self, indices: list[int], samples: list[Sample]) -> tuple[list[MicroBatch], dict[str, float]]:
        """This rank's micro-batches of samples[indices] (balanced with balance_data), and the imbalance metrics."""
        return plan_micro_batches(indices, [s.tokens for s in samples], [s.response_length for s in samples],
                                  dp_size=self.dp_size, dp_rank=self.dp_rank,
                                  max_tokens=self.cfg.max_tokens_per_gpu * self.cfg.context_parallel_size,
                                  packed=self.cfg.pack_sequences, balance=self.cfg.balance_data, cost=self.cost_model)

    def _stage_output(self, model, mb: MicroBatch, input_tensor: torch.Tensor | None) -> torch.Tensor:
        """This stage's output for `mb` [width, rows, H] (final-norm hidden states on the last stage)."""
        cp = self._context_parallel(mb)
        if cp is not None:  # this CP rank's two chunks of every sequence
            tokens = to_device(cp.local_tokens(mb.tokens), self.device)  # [1, T_local]
            positions = to_device(cp.positions.unsqueeze(0), self.device)
            packed = attention.packed_seq_params(mb.lengths, self.device, context_parallel=cp)
        else:
            tokens = to_device(mb.tokens, self.device)  # packed [1, total] or padded [rows, max_len]
            positions = to_device(mb.position_ids(), self.device)
            packed = attention.packed_seq_params(mb.lengths, self.device) if mb.packed else None
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp:
            return bridge.stage_forward(model, tokens, positions, packed, input_tensor)

    def _context_parallel(self, mb: MicroBatch) -> ContextParallel | None:
        """This CP rank's share of the packed micro-batch `mb`, or None without context parallelism."""
        if self.cp_size == 1:
            return None
        if not mb.packed:
            raise ValueError("context parallelism needs packed micro-batches (pack_sequences=True)")
        return ContextParallel.build(mb.lengths, self.cp_group, self.cp_size, self.cp_rank)

    def _replay_routing(self, mb: MicroBatch, samples: list[Sample]) -> None:
        """With routing replay, hand the policy's routers the recorded experts of `mb`'s samples (trainer.moe)."""
        if self.replay is None:
            return
        ids, valid = moe.micro_batch_routing([samples[i].routed_experts for i in mb.indices], mb.lengths, mb.packed,
                                             mb.tokens.shape[1], self.spec)
        self.replay.set_micro_batch(to_device(ids, self.device), to_device(valid, self.device))

    def _routing_disagreement(self) -> tuple[float, float]:
        """(Fraction of replayed (token, MoE layer, slot) the policy's own top-k would not have chosen, how many
        were replayed) over this step's policy forwards."""
        counts = self.replay.counts(self.device)  # [mismatched, total], this rank's share and stage
        for group in (self.pp_group, self.dp_group):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(counts, group=group)
        mismatched, total = counts.tolist()
        return mismatched / total if total else 0.0, total

    def _activation_shape(self, mb: MicroBatch) -> tuple[int, int, int]:
        """Shape of the activations passed between pipeline stages for `mb`: [width, rows, H]."""
        return mb.tokens.shape[1], mb.tokens.shape[0], self.spec.hidden_size

    def _response_hidden(self, mb: MicroBatch, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's hidden states [width, rows, H] at the positions that predict response tokens: [T, H]."""
        hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [rows * width, H]
        return hidden[to_device(mb.response_positions(), self.device)]

    def _log_probs(self, model, mb: MicroBatch, hidden: torch.Tensor, *, with_entropy: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the micro-batch's response tokens, flat [T]; logits only for those tokens."""
        weight = bridge.output_weight(model)  # [V_local, H]
        cp = self._context_parallel(mb)
        targets = mb.response_targets()
        if cp is not None:  # the response tokens predicted from this rank's positions, then summed over CP
            local, places = cp.split_positions(mb.response_positions())
            hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])[to_device(local, self.device)]
            targets = targets[places]
        else:
            hidden = self._response_hidden(mb, hidden)  # [T, H]
        logp, entropy = chunked_logprobs(hidden.to(weight.dtype), weight, to_device(targets, self.device),
                                         vocab_start=self.vocab_start, vocab_size=self.spec.vocab_size,
                                         temperature=self.cfg.temperature,
                                         group=self.tp_group, with_entropy=with_entropy,
                                         chunk_tokens=self.cfg.logprob_chunk_tokens)
        if cp is not None:
            total = sum(mb.response_lengths)
            logp = gather_shards(logp, places, total, cp)
            entropy = None if entropy is None else gather_shards(entropy, places, total, cp)
        return logp, entropy

    def _log_probs_all(self, model, samples: list[Sample]) -> list[torch.Tensor]:
        """Per-sample response log-probs of `samples` (all valid), computed in DP shares and shared with every rank."""
        return self._per_token_all(model, samples, lambda mb, hidden: self._log_probs(model, mb, hidden,
                                                                                      with_entropy=False)[0])

    def _values_all(self, samples: list[Sample]) -> list[torch.Tensor]:
        """The critic's per-sample response-token values of `samples` (all valid), shared with every rank."""
        return self._per_token_all(self.critic.gpt, samples,
                                   lambda mb, hidden: self.critic.values(self._response_hidden(mb, hidden)))

    @torch.no_grad()
    def _per_token_all(self, model, samples: list[Sample], head) -> list[torch.Tensor]:
        """Per-sample response-token values of head(mb, last-stage hidden) -> [T], in DP shares, on every rank."""
        lengths = [s.response_length for s in samples]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        flat = torch.zeros(offsets[-1], dtype=torch.float32, device=self.device)  # [all response tokens]
        micro_batches, _ = self._plan(list(range(len(samples))), samples)

        def forward(mb: MicroBatch, input_tensor: torch.Tensor | None) -> torch.Tensor | None:
            if model is self.model:
                self._replay_routing(mb, samples)
            hidden = self._stage_output(model, mb, input_tensor)
            if not self.pipeline.is_last:
                return hidden
            out = head(mb, hidden)
            for i, piece in zip(mb.indices, out.split(mb.response_lengths)):
                flat[offsets[i]:offsets[i + 1]] = piece
            return None

        self.pipeline.forward_only(micro_batches, forward, self._activation_shape)
        if self.pipeline.size > 1:  # only the last stage filled it: a sum shares it
            dist.all_reduce(flat, group=self.pp_group)
        if self.dp_size > 1:  # shares are disjoint: a sum gathers them
            dist.all_reduce(flat, group=self.dp_group)
        return [t.cpu() for t in flat.split(lengths)]

    def compute_log_probs(self, samples: list[Sample], model: str = "actor") -> list[torch.Tensor]:
        """Response-token log-probs (of logits / temperature) per sample; empty for samples marked failed."""
        if model not in MODELS:
            raise ValueError(f"model={model!r}; valid: {MODELS}")
        net = {"actor": self.model, "ref": self.ref_model, "teacher": self.teacher_model}[model]
        if net is None:
            raise ValueError(f"model={model!r} is not built: a reference model needs loss.kl_coef > 0, a teacher "
                             "use_opd with opd_type='megatron'")
        good = self._screen(samples, need_reward=False)
        values = self._log_probs_all(net, [samples[i] for i in good])
        out = [torch.zeros(0) for _ in samples]
        for i, v in zip(good, values):
            out[i] = v
        return out

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One RL update on a rollout (one optimizer step per global batch); returns step metrics."""
        cfg = self.cfg
        sft = cfg.loss.loss_type == "sft"  # no rewards, old log-probs or advantages: NLL of the loss-mask tokens
        good_idx = self._screen(samples, need_reward=not sft)
        batch = [samples[i] for i in good_idx]
        metrics: dict[str, float] = {"num_samples": float(len(batch)), "num_failed": float(len(samples) - len(batch))}
        if not batch:
            logger.warning("train_step: no usable samples out of %d; no update", len(samples))
            return metrics
        lengths = [s.response_length for s in batch]
        masks = [torch.tensor(s.loss_mask, dtype=torch.float32) for s in batch]
        has_rollout = all(len(s.rollout_logprobs) == s.response_length for s in batch)
        rollout = [torch.tensor(s.rollout_logprobs, dtype=torch.float32) for s in batch] if has_rollout else None

        if self.replay is not None:
            self.replay.reset_counts()
        start = self._clock()
        self.model.eval()
        old = ref = advantages = values = returns = None
        global_batches = [list(r) for r in split_global_batches(len(batch), cfg.global_batch_size)]
        old_from_update = (not sft and cfg.recompute_old_logprobs and cfg.old_logprobs_from_update
                           and len(global_batches) == 1 and not cfg.kl_in_reward and not cfg.use_opd)
        if not sft and self.step == 0 and self.rank == 0 and cfg.recompute_old_logprobs:
            if old_from_update:
                source = "from the update's own forward (one optimizer step per train step)"
            elif not cfg.old_logprobs_from_update:
                source = "a separate pass over the rollout (--no-old-logprobs-from-update)"
            elif len(global_batches) > 1:
                source = f"a separate pass over the rollout ({len(global_batches)} optimizer steps per train step)"
            else:
                source = "a separate pass over the rollout (needed before the update: KL in the reward or OPD)"
            logger.info("old log-probs: %s", source)
        if not sft:
            if old_from_update:
                old = None  # the update's forward gives them: logp.detach() (_train_global_batch)
            else:
                old = self._log_probs_all(self.model, batch) if cfg.recompute_old_logprobs else rollout
            ref = self._log_probs_all(self.ref_model, batch) if self.ref_model is not None else None
            if self.critic is not None:
                self.critic.eval()
                values = self._values_all(batch)
            advantages, returns = self._advantages(batch, lengths, masks, old, ref, values, metrics)
            if cfg.use_opd:
                advantages = self._opd(batch, masks, old, advantages, metrics)
        per_sample = {"old": old, "adv": advantages, "mask": masks, "ref": ref, "rollout": rollout,
                      "values": values, "returns": returns}

        passes_done = self._clock()
        self.model.train()
        train_policy = self.critic is None or self.step >= cfg.critic.num_critic_only_steps
        step_metrics = []
        for r in global_batches:
            m = self._train_global_batch(batch, r, per_sample) if train_policy else {}
            if self.critic is not None:
                self.critic.train()
                m.update(self._train_critic_batch(batch, r, per_sample))
            step_metrics.append(m)
        optimizer_s = sum(m.pop("time_optimizer_s", 0.0) for m in step_metrics)  # summed, not averaged
        for key in step_metrics[0]:
            values = [m[key] for m in step_metrics]
            metrics[key] = values[-1] if key in ("lr", "critic_lr") else sum(values) / len(values)
        # where the train phase went (CUDA synchronised at each boundary): the passes before the update
        # (old log-probs unless from the update, reference, critic values) with the advantages, then the update
        # (forward / backward of every micro-batch and the optimizer steps, of which the optimizer alone)
        updated = self._clock()
        times = torch.tensor([passes_done - start, updated - passes_done, optimizer_s], dtype=torch.float64,
                             device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:  # the slowest rank's, the same on every rank
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        metrics.update(zip(("time_passes_s", "time_update_s", "time_optimizer_s"), times.tolist()))
        metrics["optimizer_steps"] = float(len(step_metrics))
        metrics["tokens"] = float(sum(len(s.tokens) for s in batch))
        if self.replay is not None:
            metrics["routing_disagreement"], metrics["routing_replayed_slots"] = self._routing_disagreement()
        self.step += 1
        if self.rank == 0:
            logger.info("step %d: %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def _advantages(self, batch: list[Sample], lengths: list[int], masks: list[torch.Tensor],
                    old: list[torch.Tensor], ref: list[torch.Tensor] | None, values: list[torch.Tensor] | None,
                    metrics: dict[str, float]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-token advantages, and the critic's value targets (GAE returns; else None): rewards (DAPO overlong
        shaping first, if on), then the estimator or the hook."""
        cfg = self.cfg
        rewards = torch.tensor([self._reward(s) for s in batch], dtype=torch.float64)
        if cfg.overlong_buffer_len > 0:
            penalty = overlong_penalty(lengths, cfg.rollout_max_response_len, cfg.overlong_buffer_len,
                                       cfg.overlong_penalty_factor)
            rewards = rewards + penalty
            metrics["overlong_penalty_mean"] = penalty.mean().item()
            metrics["overlong_frac"] = (penalty < 0).double().mean().item()
        rewards = rewards.to(torch.float32)
        group_index = torch.tensor([s.group_index for s in batch])
        if cfg.advantage_estimator == "custom":
            return custom_advantages(self.custom_advantage, rewards, group_index, lengths, loss_masks=masks,
                                     samples=batch, name=f"custom advantage function "
                                                         f"{cfg.custom_advantage_function_path!r}"), None
        kl = [kl_estimate(o, r, cfg.loss.kl_loss_type) for o, r in zip(old, ref)] if cfg.kl_in_reward else None
        kl_coef = cfg.loss.kl_coef if cfg.kl_in_reward else 0.0
        if cfg.advantage_estimator == "gae":
            return compute_gae(rewards, values, lengths, gamma=cfg.gamma, lambd=cfg.lambd, kl=kl, kl_coef=kl_coef,
                               loss_masks=masks, whiten=cfg.normalize_advantages_std)
        return compute_advantages(
            cfg.advantage_estimator, rewards, group_index, lengths, normalize_std=cfg.normalize_advantages_std,
            gamma=cfg.gamma, kl=kl, kl_coef=kl_coef, loss_masks=masks), None

    def _opd(self, batch: list[Sample], masks: list[torch.Tensor], old: list[torch.Tensor],
             advantages: list[torch.Tensor], metrics: dict[str, float]) -> list[torch.Tensor]:
        """On-policy distillation: advantages minus opd_kl_coef * (old_logp - teacher_logp) per policy token."""
        cfg = self.cfg
        if cfg.opd_type == "megatron":
            teacher = self._log_probs_all(self.teacher_model, batch)
        else:
            teacher = [torch.tensor(s.teacher_logprobs, dtype=torch.float32) for s in batch]
        penalty = opd_penalty(old, teacher, cfg.opd_kl_coef, masks)
        keep = torch.cat(masks).bool()
        gap = (torch.cat(old).double() - torch.cat(teacher).double())[keep]  # [policy tokens]
        metrics["opd_reverse_kl"] = gap.mean().item() if gap.numel() else 0.0
        metrics["opd_teacher_logp_mean"] = torch.cat(teacher).double()[keep].mean().item() if gap.numel() else 0.0
        return [a - p.to(a.dtype) for a, p in zip(advantages, penalty)]

    def _train_critic_batch(self, batch: list[Sample], chunk: list[int], per_sample: dict) -> dict[str, float]:
        """The critic's value loss over this rank's micro-batches of `chunk`, then one critic optimizer step."""
        cfg = self.cfg
        num_tokens = max(1, int(sum(per_sample["mask"][i].sum() for i in chunk)))
        share = data_parallel_shares([len(batch[i].tokens) for i in chunk], self.dp_size)[self.dp_rank]
        share = [chunk[j] for j in share]
        sums: dict[str, torch.Tensor] = {}
        self.critic_optimizer.zero_grad()

        def flat(mb: MicroBatch, key: str) -> torch.Tensor:
            return to_device(torch.cat([per_sample[key][i] for i in mb.indices]), self.device)

        def forward(mb: MicroBatch, input_tensor: torch.Tensor | None) -> torch.Tensor:
            hidden = self._stage_output(self.critic.gpt, mb, input_tensor)
            values = self.critic.values(self._response_hidden(mb, hidden))  # [T]
            loss, parts = compute_value_loss(values, flat(mb, "values"), flat(mb, "returns"), flat(mb, "mask"),
                                             torch.tensor(mb.response_lengths), value_clip=cfg.critic.value_clip,
                                             global_num_tokens=num_tokens, global_num_seqs=len(chunk))
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            return loss

        self.pipeline.forward_backward(pack_micro_batches(share, [s.tokens for s in batch],
                                                          [s.response_length for s in batch], cfg.max_tokens_per_gpu,
                                                          packed=cfg.pack_sequences),
                                       forward, self._activation_shape)
        keys = ["value_loss", "values_mean", "returns_mean"] + (["value_clipfrac"] if cfg.critic.value_clip else [])
        reduced = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=self.device)
                               for k in keys])
        if self.dp_size > 1:
            dist.all_reduce(reduced, group=self.dp_group)
        grad_norm, lr = self.critic_optimizer.step()
        return {**dict(zip(keys, reduced.tolist())), "critic_grad_norm": grad_norm, "critic_lr": lr}

    def _train_global_batch(self, batch: list[Sample], chunk: list[int], per_sample: dict) -> dict[str, float]:
        """Accumulate gradients over this rank's micro-batches of `chunk`, then one optimizer step."""
        cfg = self.cfg
        sft = cfg.loss.loss_type == "sft"
        num_tokens = max(1, int(sum(per_sample["mask"][i].sum() for i in chunk)))
        num_seqs = len(chunk)
        micro_batches, balance_metrics = self._plan(chunk, batch)
        sums: dict[str, torch.Tensor] = {}
        padded = 0
        self.optimizer.zero_grad()

        def flat(mb: MicroBatch, key: str) -> torch.Tensor | None:
            values = per_sample[key]
            if values is None:
                return None
            return to_device(torch.cat([values[i] for i in mb.indices]), self.device)

        def forward(mb: MicroBatch, input_tensor: torch.Tensor | None) -> torch.Tensor:
            nonlocal padded
            self._replay_routing(mb, batch)
            hidden = self._stage_output(self.model, mb, input_tensor)
            if not self.pipeline.is_last:
                return hidden
            logp, entropy = self._log_probs(self.model, mb, hidden, with_entropy=True)
            old_logp = flat(mb, "old")
            if old_logp is None and not sft:  # train_step's old_from_update: this forward's own log-probs
                old_logp = logp.detach()
            loss, parts = compute_loss(
                logp, old_logp, flat(mb, "adv"), flat(mb, "mask"),
                torch.tensor(mb.response_lengths), cfg.loss, ref_logp=flat(mb, "ref"),
                rollout_logp=flat(mb, "rollout"), entropy=entropy if cfg.loss.entropy_coef > 0 else entropy.detach(),
                global_num_tokens=num_tokens, global_num_seqs=num_seqs, custom_fn=self.custom_loss)
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            padded += mb.padded_tokens
            return loss

        self.pipeline.forward_backward(micro_batches, forward, self._activation_shape)
        keys = self._metric_keys(sums, per_sample)
        reduced = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=self.device)
                               for k in keys] + [torch.tensor(float(padded), device=self.device)])
        if self.pipeline.size > 1:  # the loss and its parts live on the last stage: a sum shares them
            dist.all_reduce(reduced, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(reduced, group=self.dp_group)
        before_step = self._clock()
        grad_norm, lr = self.optimizer.step()
        optimizer_s = self._clock() - before_step
        out = dict(zip(keys, reduced[:-1].tolist()))
        real = sum(len(batch[i].tokens) for i in chunk)
        out.update(grad_norm=grad_norm, lr=lr, padding_fraction=1.0 - real / max(1.0, reduced[-1].item()),
                   time_optimizer_s=optimizer_s)
        out.update(balance_metrics)
        return out

    def _clock(self) -> float:
        """Seconds, once the device has finished the work queued so far (a phase boundary of the step's timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _metric_keys(self, sums: dict, per_sample: dict) -> list[str]:
        """The metric names every rank reduces, in one order (a rank without micro-batches has no sums)."""
        loss_type = self.cfg.loss.loss_type
        if loss_type == "sft":
            return ["loss", "sft_loss", "entropy"]
        if loss_type == "custom":  # names only the function knows: the union over all ranks
            names = sorted(sums)
            if dist.is_initialized() and dist.get_world_size() > 1:
                everyone: list = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, names)
                names = sorted(set().union(*everyone))
            return ["loss"] + [k for k in names if k != "loss"]
        return ["loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy"] + sorted(
            k for k in ("kl_loss", "train_rollout_logp_absdiff", "train_rollout_kl", "tis_clipfrac",
                        "pg_clipfrac_lower",
                        "mis_reject_frac")
            if k in sums or self._expects_metric(k, per_sample))

    def _expects_metric(self, key: str, per_sample: dict) -> bool:
        """Whether compute_policy_loss reports `key` under this config (so every DP rank has the same keys)."""
        loss = self.cfg.loss
        return {"kl_loss": per_sample["ref"] is not None,
                "train_rollout_logp_absdiff": per_sample["rollout"] is not None,
                "train_rollout_kl": per_sample["rollout"] is not None,
                "tis_clipfrac": loss.use_tis,
                "mis_reject_frac": loss.use_mis,
                "pg_clipfrac_lower": loss.dual_clip_c is not None and loss.policy_loss in ("ppo", "gspo")}[key]

    # ------------------------------------------------------------------------------------------
    # offload, checkpoints, export, weight sync
    # ------------------------------------------------------------------------------------------

    def _move_all(self, device: torch.device) -> int:
        """Move params, grads, master weights and optimizer state to `device` (pinned CPU memory when leaving a GPU)."""
        moved = 0

        def move(t: torch.Tensor) -> torch.Tensor:
            nonlocal moved
            if t.device == device:
                return t
            moved += t.numel() * t.element_size()
            if device.type == "cpu" and torch.cuda.is_available():
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                return out.copy_(t, non_blocking=True)
            return t.to(device, non_blocking=True)

        pin = device.type == "cpu" and torch.cuda.is_available()
        for model in (self.model, self.ref_model, self.critic, self.teacher_model):
            if model is None:
                continue
            moved += flatten_parameters(model, device, pin_memory=pin)
            for p in dict.fromkeys(model.parameters()):
                if p.grad is not None:
                    p.grad = move(p.grad)
        self.optimizer.move(move)
        if self.critic_optimizer is not None:
            self.critic_optimizer.move(move)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if device.type == "cpu":
                torch.cuda.empty_cache()
        return moved

    def offload(self) -> int:
        """Drop the gradients (every global batch starts from zero: nothing reads them after the optimizer step),
        then move params and optimizer state to CPU (colocated rollout phase); returns bytes moved."""
        for optimizer in (self.optimizer, self.critic_optimizer):
            if optimizer is not None:
                optimizer.zero_grad()
        return self._move_all(torch.device("cpu"))

    def onload(self) -> int:
        """Bring everything back to the training device; returns bytes moved."""
        return self._move_all(self.device)

    def save_checkpoint(self, ckpt_dir: str | os.PathLike) -> dict[str, FileDigest]:
        """Save model shards, optimizer, LR-schedule step, RNG states and the step counter (one file per rank).

        The file is written atomically; returns {its name in ckpt_dir: its size and sha256} for the manifest.
        """
        path = Path(ckpt_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "layout": self._layout(),
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items() if torch.is_tensor(v)},
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                    "tracker": megatron_compat.get_rng_tracker_states()},
        }
        if self.critic is not None:
            state["critic"] = {k: v.detach().cpu() for k, v in self.critic.state_dict().items() if torch.is_tensor(v)}
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        name = f"rank_{self.rank:05d}.pt"
        digest = atomic_torch_save(path / name, state)
        dist.barrier()
        return {name: digest}

    def load_checkpoint(self, ckpt_dir: str | os.PathLike) -> None:
        """Restore what `save_checkpoint` wrote, on the same TP and PP sizes (the DP size may differ)."""
        file, state = self._read_checkpoint(Path(ckpt_dir))
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {file} does not match the model: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.critic is not None) != ("critic" in state):
            raise ValueError(f"checkpoint {file} has {'a' if 'critic' in state else 'no'} critic but this run "
                             f"{'trains one' if self.critic is not None else 'has none'} (advantage_estimator 'gae')")
        if self.critic is not None:
            missing, unexpected = self.critic.load_state_dict(state["critic"], strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ValueError(f"checkpoint {file}: the critic does not match: missing {missing}, "
                                 f"unexpected {unexpected}")
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.step = state["step"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        megatron_compat.set_rng_tracker_states(rng["tracker"])

    @staticmethod
    def _read_rank_file(file: Path, *, mmap: bool = False) -> dict:
        if not file.exists():
            raise FileNotFoundError(f"no trainer checkpoint file {file}")
        try:
            return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - name the file; torch's message alone does not
            raise ValueError(f"trainer checkpoint {file} cannot be read: it is damaged or not written by "
                             f"save_checkpoint ({type(e).__name__}: {e})") from e

    def _read_checkpoint(self, path: Path) -> tuple[Path, dict]:
        """(file, state) this rank resumes from: its own file, or on another DP size that of the saving rank with
        the same TP/PP coordinates and DP rank 0 (model and replicated state are the same on every DP rank), its
        sharded optimizer state replaced by {"sharded": True, "shards": every saving DP rank's, in DP order}."""
        layout = self._layout()
        saved = self._read_rank_file(path / "rank_00000.pt", mmap=True)["layout"]
        if saved["world_size"] == self.world_size:
            file = path / f"rank_{self.rank:05d}.pt"
            state = self._read_rank_file(file)
            if state["layout"] != layout:
                raise ValueError(f"checkpoint layout {state['layout']} differs from this run's {layout}")
            return file, state
        if saved.get("cp", 1) > 1 or layout.get("cp", 1) > 1:
            raise ValueError(f"checkpoint layout {saved} differs from this run's {layout}: with context parallelism "
                             "resuming needs the same world size and parallel sizes")
        if (saved["tp"], saved["pp"]) != (layout["tp"], layout["pp"]):
            raise ValueError(f"checkpoint layout {saved} differs from this run's {layout}: resuming needs the same "
                             "tensor and pipeline parallel sizes (only the data-parallel size may change)")
        tp, pp_rank = layout["tp"], self.rank // (self.world_size // layout["pp"])
        saved_dp = saved["world_size"] // (tp * layout["pp"])

        def saved_rank(dp_rank: int) -> int:  # megatron's rank order: TP fastest, then DP, then PP
            return self.tp_rank + tp * (dp_rank + saved_dp * pp_rank)

        file = path / f"rank_{saved_rank(0):05d}.pt"
        state = self._read_rank_file(file)
        if state["optimizer"].get("sharded"):
            state["optimizer"] = {"sharded": True, "shards": [
                state["optimizer"] if j == 0 else self._read_rank_file(path / f"rank_{saved_rank(j):05d}.pt",
                                                                       mmap=True)["optimizer"]
                for j in range(saved_dp)]}
        logger.info("rank %d resumes from %s (saved at DP=%d, now DP=%d)", self.rank, file, saved_dp, self.dp_size)
        return file, state

    def _layout(self) -> dict[str, int]:
        layout = {"world_size": self.world_size, "tp": self.cfg.tensor_parallel_size,
                  "pp": self.cfg.pipeline_parallel_size, "rank": self.rank}
        if self.cfg.context_parallel_size > 1:  # absent at CP=1: earlier checkpoints keep their layout
            layout["cp"] = self.cfg.context_parallel_size
        return layout

    def export_hf(self, out_dir: str | os.PathLike) -> None:
        """Write the current policy as an HF folder (config, safetensors, tokenizer); collective."""
        bridge.export_hf_checkpoint(self.model, self.spec, out_dir, source_dir=self.cfg.hf_checkpoint)
        dist.barrier()

    def iter_hf_weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (hf_name, full tensor) for weight sync; every rank iterates, rank 0's are filled."""
        return bridge.iter_hf_tensors(self.model, self.spec, bucket_bytes)
