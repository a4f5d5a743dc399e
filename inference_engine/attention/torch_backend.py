"""Attention in plain torch (SDPA): runs on CPU and GPU; the reference the fused kernels are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference_engine.attention.base import AttentionBackend
from inference_engine.forward_batch import ForwardBatch
from inference_engine.kv_cache import dequantize_kv


@dataclass
class TorchMetadata:
    """Single-token requests padded into one SDPA call; longer extends one call each."""

    decode_rows: torch.Tensor  # [Bd] token rows of single-token requests
    decode_slots: torch.Tensor  # [Bd, max_kv] their context slots, padded with slot 0
    decode_mask: torch.Tensor  # [Bd, 1, 1, max_kv] True where a slot belongs to the context
    extends: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (q_start, q_end, slots [kv], mask [q, kv])


def _decode_slots(fb: ForwardBatch, requests: list[int] | slice, max_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context slots [Bd, max_kv] (slot 0 past a request's end) and validity mask of the chosen requests."""
    lens = fb.seq_lens[requests]
    cols = torch.arange(max_kv, device=lens.device)
    valid = cols[None, :] < lens[:, None]  # [Bd, max_kv]
    flat = (fb.kv_indptr[:-1][requests][:, None] + cols[None, :]).clamp(max=max(fb.kv_indices.numel() - 1, 0))
    return torch.where(valid, fb.kv_indices[flat], 0), valid


class TorchAttentionBackend(AttentionBackend):
    """Gathers each request's K/V from the pool by slot id and calls scaled_dot_product_attention (an fp8 pool's
    rows dequantised to float32 first: the reference of the fused kernels)."""

    supports_fp8_kv = True

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        qo = [0]
        for n in fb.extend_lens:
            qo.append(qo[-1] + n)
        seq_lens = fb.seq_lens_cpu.tolist()
        decode = [i for i, n in enumerate(fb.extend_lens) if n == 1]
        decode_rows = torch.tensor([qo[i] for i in decode], dtype=torch.int64, device=self.device)
        slots, valid = _decode_slots(fb, decode, max((seq_lens[i] for i in decode), default=0))
        extends = []
        kv_start = 0
        for i, n in enumerate(fb.extend_lens):
            kv_len = seq_lens[i]
            if n > 1:
                q_pos = torch.arange(kv_len - n, kv_len, device=self.device)
                mask = torch.arange(kv_len, device=self.device)[None, :] <= q_pos[:, None]  # [q, kv] causal
                extends.append((qo[i], qo[i + 1], fb.kv_indices[kv_start:kv_start + kv_len], mask))
            kv_start += kv_len
        fb.attn_metadata = TorchMetadata(decode_rows, slots, valid[:, None, None, :], extends)

    def init_cuda_graph_state(self, max_bs: int, max_context: int) -> None:
        self.graph_max_kv = max_context  # padded SDPA over the whole context: meant for tests and short contexts

    def init_graph_metadata(self, fb: ForwardBatch, capture: bool) -> None:
        bs = fb.batch_size
        slots, valid = _decode_slots(fb, slice(None), self.graph_max_kv)
        if capture:
            fb.attn_metadata = TorchMetadata(torch.arange(bs, device=self.device), slots, valid[:, None, None, :], [])
        else:
            fb.attn_metadata.decode_slots.copy_(slots)
            fb.attn_metadata.decode_mask.copy_(valid[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = fb.kv_pool.k_buffer[layer.layer_id], fb.kv_pool.v_buffer[layer.layer_id]  # k, v stored
        scales = fb.kv_pool.layer_scales(layer.layer_id)
        md: TorchMetadata = fb.attn_metadata
        out = torch.empty_like(q)  # [T, H, D]
        f32 = torch.float32  # scores and softmax in float32, like the fused kernels (bf16 SDPA rounds the scores)

        def rows(buf: torch.Tensor, slots: torch.Tensor, which: int) -> torch.Tensor:
            """buf[slots] [..., KVH, D] in float32 (dequantised for an fp8 pool)."""
            return buf[slots].to(f32) if scales is None else dequantize_kv(buf[slots], scales[which])

        if md.decode_rows.numel():
            qd = q[md.decode_rows][:, :, None, :].to(f32)  # [Bd, H, 1, D]
            kd = rows(k_buf, md.decode_slots, 0).transpose(1, 2)  # [Bd, KVH, max_kv, D]
            vd = rows(v_buf, md.decode_slots, 1).transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=md.decode_mask, scale=layer.scaling,
                                                enable_gqa=True)
            out[md.decode_rows] = od[:, :, 0, :].to(q.dtype)
        for start, end, slots, mask in md.extends:
            qe = q[start:end].transpose(0, 1).to(f32)  # [H, q, D]
            ke, ve = rows(k_buf, slots, 0).transpose(0, 1), rows(v_buf, slots, 1).transpose(0, 1)  # [KVH, kv, D]
            oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, scale=layer.scaling, enable_gqa=True)
            out[start:end] = oe.transpose(0, 1).to(q.dtype)
        return out
