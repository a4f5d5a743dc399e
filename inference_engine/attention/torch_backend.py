"""Attention in plain torch (SDPA): runs on CPU and GPU; the reference the fused kernels are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference_engine.attention.base import AttentionBackend
from inference_engine.forward_batch import ForwardBatch


@dataclass
class TorchMetadata:
    """Single-token requests padded into one SDPA call; longer extends one call each."""

    decode_rows: torch.Tensor  # [Bd] token rows of single-token requests
    decode_slots: torch.Tensor  # [Bd, max_kv] their context slots, padded with slot 0
    decode_mask: torch.Tensor  # [Bd, 1, 1, max_kv] True where a slot belongs to the context
    extends: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (q_start, q_end, slots [kv], mask [q, kv])


class TorchAttentionBackend(AttentionBackend):
    """Gathers each request's K/V from the pool by slot id and calls scaled_dot_product_attention."""

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        qo, kv = fb.qo_indptr.tolist(), fb.kv_indptr.tolist()
        decode = [i for i, n in enumerate(fb.extend_lens) if n == 1]
        decode_rows = torch.tensor([qo[i] for i in decode], dtype=torch.int64, device=self.device)
        lens = fb.seq_lens[decode] if decode else fb.seq_lens[:0]
        max_kv = int(lens.max()) if decode else 0
        cols = torch.arange(max_kv, device=self.device)
        valid = cols[None, :] < lens[:, None]  # [Bd, max_kv]
        starts = fb.kv_indptr[decode] if decode else fb.kv_indptr[:0]
        flat = (starts[:, None] + cols[None, :]).clamp(max=max(fb.kv_indices.numel() - 1, 0))
        slots = torch.where(valid, fb.kv_indices[flat], 0) if decode else flat
        extends = []
        for i, n in enumerate(fb.extend_lens):
            if n == 1:
                continue
            kv_len = kv[i + 1] - kv[i]
            q_pos = torch.arange(kv_len - n, kv_len, device=self.device)
            mask = torch.arange(kv_len, device=self.device)[None, :] <= q_pos[:, None]  # [q, kv] causal
            extends.append((qo[i], qo[i + 1], fb.kv_indices[kv[i]:kv[i + 1]], mask))
        fb.attn_metadata = TorchMetadata(decode_rows, slots, valid[:, None, None, :], extends)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, k, v)
        md: TorchMetadata = fb.attn_metadata
        out = torch.empty_like(q)  # [T, H, D]
        if md.decode_rows.numel():
            qd = q[md.decode_rows][:, :, None, :]  # [Bd, H, 1, D]
            kd = k_buf[md.decode_slots].transpose(1, 2)  # [Bd, KVH, max_kv, D]
            vd = v_buf[md.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=md.decode_mask, scale=layer.scaling,
                                                enable_gqa=True)
            out[md.decode_rows] = od[:, :, 0, :]
        for start, end, slots, mask in md.extends:
            qe = q[start:end].transpose(0, 1)  # [H, q, D]
            ke, ve = k_buf[slots].transpose(0, 1), v_buf[slots].transpose(0, 1)  # [KVH, kv, D]
            oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, scale=layer.scaling, enable_gqa=True)
            out[start:end] = oe.transpose(0, 1)
        return out
