"""The engine's planned loader and what a colocated receiver keeps between pushes.

`WeightPlan` joins the parts of a fused parameter (q/k/v, gate/up) into one copy when they lie back to
back in the source, and keeps the copies it resolved for a `StableBucket` for as long as that bucket
lives; `SharedStorages` hands the same bucket of views back while a sender's storages stay open.
Every load is compared with the HF tensors it was given, bit for bit.
"""

import weakref

import pytest
import torch
from safetensors.torch import load_file

from inference_engine.models.loader import WeightPlan, named_hf_tensors, read_spec
from inference_engine.models.transformer import CausalLM
from weight_sync import WeightSender, WeightSyncConfig, bucket_named_tensors, push_weights
from weight_sync.buckets import StableBucket, copy_tensors
from weight_sync.testing import TensorDictEngine

FUSED = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}


def _model(path):
    model = CausalLM(read_spec(path))
    for p in model.parameters():
        p.data.zero_()
    return model


def _hf_in_one_buffer(path, seed, fused_order):
    """The checkpoint's tensors, moved by a step, as views of one flat buffer; q/k/v and gate/up in `fused_order`."""
    tensors = load_file(f"{path}/model.safetensors")
    tensors.pop("lm_head.weight", None)   # tied to the embedding

    def position(name):
        part = name.split(".")[-2]
        return name.rsplit(".", 2)[0], fused_order(FUSED[part]) if part in FUSED else 9, name

    names = sorted(tensors, key=position)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])   # [all weights]
    flat.add_(torch.randn(flat.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    named, offset = [], 0
    for n in names:
        named.append((n, flat[offset:offset + tensors[n].numel()].view(tensors[n].shape)))
        offset += tensors[n].numel()
    return flat, named


def _copies(copies):
    return sum(len(dsts) for dsts, _ in copies.groups)


@pytest.mark.parametrize("order, joined", [(lambda i: i, True), (lambda i: -i, False)], ids=["q-k-v", "v-k-q"])
def test_fused_parts_back_to_back_load_as_one_copy(qwen3_model, order, joined):
    model = _model(qwen3_model)
    _, named = _hf_in_one_buffer(qwen3_model, seed=1, fused_order=order)
    plan = WeightPlan(model)
    copies = plan.copies(named)
    layers = model.spec.num_layers
    assert _copies(copies) == len(named) - (3 * layers if joined else 0)   # q+k+v: 1 copy, gate+up: 1 copy
    assert sorted(copies.run()) == sorted(n for n, _ in named)
    held = dict(named_hf_tensors(model))
    for name, tensor in named:
        assert torch.equal(held[name], tensor), name


def test_stable_bucket_keeps_its_copies_while_it_lives_and_never_the_plan(qwen3_model):
    model = _model(qwen3_model)
    flat, named = _hf_in_one_buffer(qwen3_model, seed=2, fused_order=lambda i: i)
    plan = WeightPlan(model)
    bucket = StableBucket(named)
    copies = plan.copies(bucket)
    assert plan.copies(bucket) is copies and plan.copies(list(named)) is not copies
    flat.mul_(-1.5)   # the next training step, in the same storage: the kept copies read the new values
    plan.load(bucket)
    held = dict(named_hf_tensors(model))
    for name, tensor in named:
        assert torch.equal(held[name], tensor), name
    copies_ref, plan_ref = weakref.ref(copies), weakref.ref(plan)
    del copies, held
    del bucket   # the receiver dropped it (a storage closed): the copies go with it, at once
    assert copies_ref() is None
    plan.copies(StableBucket(named))
    del plan   # a plan replaced after release_memory frees its parameter views at once, kept copies or not
    assert plan_ref() is None


class _Recording(TensorDictEngine):
    """Remembers the bucket objects it was asked to load."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.loaded = []

    def load_weights(self, named_tensors, weight_version):
        self.loaded.append(named_tensors)
        return super().load_weights(named_tensors, weight_version)


@pytest.mark.parametrize("keep", [True, False], ids=["kept-open", "per-push"])
def test_receiver_hands_back_the_same_views_while_the_storage_stays_open(qwen3_model, keep):
    flat, named = _hf_in_one_buffer(qwen3_model, seed=3, fused_order=lambda i: i)
    target = receiver = _Recording({n: torch.zeros_like(t) for n, t in named})
    sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=1 << 30, keep_resident_open=keep))
    try:
        for step in range(3):
            flat.add_(0.01)
            if step == 2:
                sender.release([receiver])   # as the trainer does before it offloads
            push_weights(bucket_named_tensors(iter(named), 1 << 30), [receiver], sender, step + 1, resident=[flat])
            for name, tensor in named:
                assert torch.equal(target.tensors[name], tensor), name
    finally:
        sender.close([receiver])
    first, second, third = target.loaded
    assert all(isinstance(b, StableBucket) for b in target.loaded)
    assert (second is first) == keep and third is not second
    assert receiver.receiver.shared.open_count() == 0


def test_copy_tensors_casts_and_copies_every_pair():
    srcs = [torch.randn(3, 5), torch.randn(70_000), torch.randn(2, 2).bfloat16()]
    dsts = [torch.empty(3, 5, dtype=torch.bfloat16), torch.empty(70_000), torch.empty(2, 2)]
    copy_tensors(dsts, srcs)
    for dst, src in zip(dsts, srcs):
        assert torch.equal(dst, src.to(dst.dtype))
