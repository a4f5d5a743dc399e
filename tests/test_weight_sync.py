"""Weight sync against stand-ins: HF transformers models as trainer and as engine weights (see
test_weight_sync_integration.py for the real ones)."""

import pickle
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from weight_sync import (FlatLayout, SharedBucket, WeightChecksumError, WeightSender, WeightSyncConfig,
                         WeightSyncError, WeightSyncTimeoutError, WeightUpdateGroup, bucket_named_tensors,
                         compare_checksums, open_bucket, push_weights, share_bucket, tensor_checksum)
from kiln_common.net import free_port
from weight_sync.testing import TensorDictEngine


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _trained(path, seed=1):
    """The 'trainer after a step': the model with every weight moved."""
    model = _load(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _trainer_buckets(model, bucket_bytes, dtype=None):
    """HF-named full tensors as the trainer yields them (tied lm_head omitted like safetensors export)."""
    named = ((n, p.detach() if dtype is None else p.detach().to(dtype)) for n, p in model.named_parameters())
    return bucket_named_tensors(named, bucket_bytes)


def _assert_same_model(engine_model, reference, input_ids):
    with torch.no_grad():
        assert torch.equal(engine_model(input_ids).logits, reference(input_ids).logits)
        out = engine_model.generate(input_ids, max_new_tokens=8, do_sample=False)
        ref = reference.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


PROMPT = torch.tensor([[5, 17, 99, 230, 41, 7]])


def test_buckets_respect_size_and_never_split():
    named = [("a", torch.zeros(10)), ("b", torch.zeros(30)), ("c", torch.zeros(5)), ("d", torch.zeros(2))]
    buckets = list(bucket_named_tensors(iter(named), bucket_bytes=64))    # 16 floats per bucket
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b"], ["c", "d"]]   # b (120 B) travels alone
    assert [[n for n, _ in b] for b in bucket_named_tensors(iter(named), 1)] == [["a"], ["b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        list(bucket_named_tensors(iter(named), 0))


def test_flat_layout_round_trip_mixed_dtypes():
    named = [("w", torch.randn(3, 4)), ("b", torch.randn(4).bfloat16()), ("n", torch.randn(2, 2, 2)),
             ("i", torch.arange(6, dtype=torch.int64).view(2, 3))]
    layout = FlatLayout.of(named)
    buffers = layout.flatten(named)
    assert [(b.dtype, b.numel()) for b in buffers] == [(torch.float32, 20), (torch.bfloat16, 4), (torch.int64, 6)]
    again = FlatLayout.from_metadata(**layout.metadata())     # what the receiver rebuilds from the control message
    for (n1, t1), (n2, t2) in zip(named, again.unflatten(buffers)):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    with pytest.raises(ValueError, match="more than once"):
        FlatLayout.from_metadata(["x", "x"], ["float32"] * 2, [[1], [1]])
    with pytest.raises(ValueError, match="unknown dtype 'floaty'"):
        FlatLayout.from_metadata(["x"], ["floaty"], [[1]])
    with pytest.raises(ValueError, match="2 names, 1 dtypes"):
        FlatLayout.from_metadata(["x", "y"], ["float32"], [[1], [1]])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="transport='ipc'"):
        WeightSyncConfig(transport="ipc")
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        WeightSyncConfig(bucket_bytes=0)
    with pytest.raises(ValueError, match="pause_mode='stop'"):
        WeightSyncConfig(pause_mode="stop")
    with pytest.raises(ValueError, match="backend='mpi'"):
        WeightSyncConfig(backend="mpi")


@pytest.mark.parametrize("transport,pause_mode", [("distributed", "pause"), ("colocated", "drain")])
def test_push_makes_engines_equal_to_trainer(tiny_model, transport, pause_mode):
    trainer = _trained(tiny_model)
    engine_models = [_load(tiny_model), _load(tiny_model)]
    engines = [TensorDictEngine(m.state_dict()) for m in engine_models]
    config = WeightSyncConfig(transport=transport, bucket_bytes=40_000, backend="gloo", timeout_s=30,
                              check_weight_update=True, pause_mode=pause_mode)
    sender = WeightSender(config)
    sender.connect(engines)
    try:
        stats = push_weights(_trainer_buckets(trainer, config.bucket_bytes), engines, sender, 1)
        assert stats.weight_version == 1 and stats.buckets > 1
        assert stats.tensors == len(list(trainer.named_parameters()))
        for model, engine in zip(engine_models, engines):
            assert engine.weight_version == 1 and not engine.paused and engine.cache_flushes >= 1
            _assert_same_model(model, trainer, PROMPT)
        trainer2 = _trained(tiny_model, seed=2)   # the next step: a second push over the same group
        stats = push_weights(_trainer_buckets(trainer2, config.bucket_bytes), engines, sender, 2)
        assert stats.weight_version == 2 and all(e.weight_version == 2 for e in engines)
        _assert_same_model(engine_models[0], trainer2, PROMPT)
    finally:
        sender.close(engines)


@pytest.mark.parametrize("transport", ["distributed", "colocated"])
def test_bucket_smaller_than_any_tensor_and_cast_on_load(qwen3_model, transport):
    """bucket_bytes=1: every tensor alone in its bucket; bf16 on the wire into an fp32 engine still verifies."""
    trainer = _trained(qwen3_model)
    engine_model = _load(qwen3_model)
    engine = TensorDictEngine(engine_model.state_dict())
    sender = WeightSender(WeightSyncConfig(transport=transport, bucket_bytes=1, backend="gloo", timeout_s=30,
                                           check_weight_update=True))
    sender.connect([engine])
    try:
        stats = push_weights(_trainer_buckets(trainer, 1, dtype=torch.bfloat16), [engine], sender, weight_version=7)
    finally:
        sender.close([engine])
    assert stats.buckets == stats.tensors == len(list(trainer.named_parameters()))
    assert engine.weight_version == 7
    for name, p in trainer.named_parameters():
        assert torch.equal(engine.tensors[name], p.detach().bfloat16().float()), name


def test_shared_bucket_survives_pickling():
    """Across processes (Ray, plain pickle) the handles rebuild to the same tensors."""
    named = [("a", torch.randn(4, 3)), ("b", torch.randn(5).half())]
    shared = share_bucket(named)
    assert all(b.is_shared() for b in shared.buffers)
    moved = pickle.loads(pickle.dumps(shared))
    assert isinstance(moved, SharedBucket) and moved.buffers is None
    for (n1, t1), (n2, t2) in zip(named, open_bucket(moved)):
        assert n1 == n2 and torch.equal(t1, t2)


class _CorruptingEngine(TensorDictEngine):
    """Loads one tensor wrongly (a single element off by 1e-3), as a broken engine loader would."""

    def __init__(self, tensors, bad_name):
        super().__init__(tensors)
        self.bad_name = bad_name

    def load_weights(self, named_tensors, weight_version):
        named = list(named_tensors)
        version = super().load_weights(named, weight_version)
        if any(n == self.bad_name for n, _ in named):
            with torch.no_grad():
                self.tensors[self.bad_name].view(-1)[3] += 1e-3
        return version


def test_checksum_mismatch_names_the_tensor(qwen3_model):
    trainer = _trained(qwen3_model)
    bad = "model.layers.1.self_attn.k_proj.weight"
    good = TensorDictEngine(_load(qwen3_model).state_dict())
    broken = _CorruptingEngine(_load(qwen3_model).state_dict(), bad)
    sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=40_000, check_weight_update=True))
    with pytest.raises(WeightChecksumError, match=r"engine 1: .*1 of \d+ tensors") as info:
        push_weights(_trainer_buckets(trainer, 40_000), [good, broken], sender, 1)
    assert info.value.names == [bad]
    assert bad in str(info.value)
    assert not good.paused and not broken.paused     # engines resume even when the update failed


def test_checksum_tolerates_only_rounding():
    x = torch.randn(1000, dtype=torch.float64) * 3
    exact = tensor_checksum(x.float())
    compare_checksums({"x": exact}, {"x": tensor_checksum(x.float().bfloat16())})   # a bf16 engine: rounding only
    compare_checksums({"x": exact}, {"x": tensor_checksum(x.float().clone())})
    nudged = x.float().clone()
    nudged[10] = torch.nextafter(nudged[10], torch.tensor(1e9))                        # one ulp on one element
    with pytest.raises(WeightChecksumError, match="x: trainer float32"):
        compare_checksums({"x": exact}, {"x": tensor_checksum(nudged)})
    swapped = x.float()[[1, 0] + list(range(2, 1000))]                                 # two elements trade places
    with pytest.raises(WeightChecksumError):
        compare_checksums({"x": exact}, {"x": tensor_checksum(swapped)})
    far = x.float() * 1.01                                                             # beyond bf16 rounding
    with pytest.raises(WeightChecksumError):
        compare_checksums({"x": exact}, {"x": tensor_checksum(far.bfloat16())})
    with pytest.raises(WeightChecksumError, match="not reported by the engine: \\['y'\\]"):
        compare_checksums({"x": exact, "y": exact}, {"x": exact})


def test_engine_load_error_names_engine_and_resumes(qwen3_model):
    trainer = _trained(qwen3_model)
    engine = TensorDictEngine(_load(qwen3_model).state_dict())
    renamed = ((f"bogus.{n}", t) for n, t in trainer.named_parameters())
    sender = WeightSender(WeightSyncConfig(transport="colocated"))
    with pytest.raises(WeightSyncError, match="engine 0: KeyError: .*unknown tensor 'bogus.model"):
        push_weights(bucket_named_tensors(renamed, 1 << 20), [engine], sender, 1)
    assert not engine.paused and engine.weight_version == 0


def test_push_on_non_sending_rank_only_iterates():
    consumed = []
    buckets = ([] for _ in range(3) if not consumed.append(1))
    stats = push_weights(buckets, [], None, 4)
    assert len(consumed) == 3 and stats.buckets == 0 and stats.weight_version == 4
    with pytest.raises(WeightSyncError, match="no engines"):
        push_weights(iter([[("a", torch.zeros(1))]]), [], None, 4)


def test_weight_version_is_required_and_an_int(qwen3_model):
    """No default version: a push or an update without an int version is refused before anything moves."""
    engine = TensorDictEngine(_load(qwen3_model).state_dict())
    sender = WeightSender(WeightSyncConfig(transport="colocated"))
    with pytest.raises(TypeError, match="weight_version"):
        push_weights(_trainer_buckets(_trained(qwen3_model), 1 << 20), [engine], sender)
    for version in (None, "3", 2.0, True):
        with pytest.raises(TypeError, match="weight_version must be an int"):
            push_weights(_trainer_buckets(_trained(qwen3_model), 1 << 20), [engine], sender, version)
    sender.close([engine])
    assert engine.weight_version == 0 and engine.cache_flushes == 0 and not engine.paused


def test_update_from_disk(qwen3_model, tmp_path):
    trainer = _trained(qwen3_model)
    trainer.save_pretrained(tmp_path, safe_serialization=True)
    engine_model = _load(qwen3_model)
    engine = TensorDictEngine(engine_model.state_dict(), disk_bucket_bytes=10_000)
    engine.update_weights_from_disk(str(tmp_path), 1)
    assert engine.weight_version == 1
    _assert_same_model(engine_model, trainer, PROMPT)
    with pytest.raises(WeightSyncError, match="holds no \\*.safetensors"):
        engine.update_weights_from_disk(str(tmp_path / "nowhere"), 2)


class _AbsentEngine(TensorDictEngine):
    """An engine whose init_weights_update_group never joins the rendezvous."""

    def init_weights_update_group(self, *args, **kwargs):
        return None


def test_rendezvous_peer_never_arrives_times_out():
    engines = [TensorDictEngine({"w": torch.zeros(2)}), _AbsentEngine({"w": torch.zeros(2)})]
    sender = WeightSender(WeightSyncConfig(transport="distributed", backend="gloo", timeout_s=2))
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="not every rank arrived within 2s") as info:
        sender.connect(engines)
    assert time.monotonic() - start < 30
    assert isinstance(info.value.__cause__, WeightSyncTimeoutError)
    sender.close()
    with pytest.raises(WeightSyncTimeoutError, match="rank 1 of 2.*rendezvous 127.0.0.1"):   # no trainer at all
        WeightUpdateGroup("127.0.0.1", free_port(), 1, 2, "lonely", "gloo", timeout_s=1)


def test_broadcast_peer_that_stops_answering_times_out():
    port = free_port()
    members = {}

    def join(rank):
        members[rank] = WeightUpdateGroup("127.0.0.1", port, rank, 2, "g", "gloo", timeout_s=2)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        with pytest.raises(WeightSyncTimeoutError, match="broadcast of \\(4,\\) torch.float32"):
            members[0].broadcast(torch.zeros(4), src=0)   # rank 1 never posts its receive
    finally:
        for m in members.values():
            m.close()


class _PauseRecordingEngine(TensorDictEngine):
    """Records the calls an update makes, in order, and whether the engine was paused at each load; pausing is
    slow (as a drain is), so a later bucket that overtook the pausing one would load into a running engine."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.calls = []

    def load_weights(self, named_tensors, weight_version):
        self.calls.append(("load", self.paused))
        return super().load_weights(named_tensors, weight_version)

    def pause_generation(self, mode="pause"):
        self.calls.append(("pause", self.paused))
        time.sleep(0.05)
        super().pause_generation(mode)

    def continue_generation(self):
        self.calls.append(("continue", self.paused))
        super().continue_generation()


@pytest.mark.parametrize("bucket_bytes,check", [(1 << 30, False), (40_000, False), (40_000, True)])
def test_colocated_push_folds_pause_and_continue_into_the_loads(qwen3_model, bucket_bytes, check):
    """One message: pause, load, continue in one call; several: paused across every load; checksums: verified
    while paused."""
    trainer = _trained(qwen3_model)
    target = engine = _PauseRecordingEngine(_load(qwen3_model).state_dict())
    sender = WeightSender(WeightSyncConfig(transport="colocated", bucket_bytes=bucket_bytes, check_weight_update=check))
    checked_while = []
    engine.weight_checksums = lambda: checked_while.append(target.paused) or TensorDictEngine.weight_checksums(engine)
    try:
        stats = push_weights(_trainer_buckets(trainer, bucket_bytes), [engine], sender, 1)
    finally:
        sender.close()
    loads = [c for c in target.calls if c[0] == "load"]
    assert stats.messages == len(loads) == stats.buckets and len(stats.message_seconds) == stats.messages
    assert (stats.buckets == 1) == (bucket_bytes == 1 << 30)
    assert target.calls == [("pause", False)] + [("load", True)] * len(loads) + [("continue", True)]
    assert checked_while == ([True] if check else [])
    assert not target.paused and target.weight_version == 1
    assert set(stats.phases) == {"pause", "pack", "wait", "verify", "resume", "other", "total"}
    assert stats.phases["pause"] == 0.0 and (stats.phases["resume"] > 0) == check   # explicit continue only to verify
    assert stats.phases["total"] == stats.seconds
    assert sum(v for k, v in stats.phases.items() if k != "total") == pytest.approx(stats.seconds, rel=1e-6)
    for name, p in trainer.named_parameters():
        assert torch.equal(target.tensors[name], p.detach()), name


def test_distributed_push_pauses_and_continues_with_calls_of_their_own(tiny_model):
    trainer = _trained(tiny_model)
    target = _PauseRecordingEngine(_load(tiny_model).state_dict())
    sender = WeightSender(WeightSyncConfig(transport="distributed", backend="gloo", bucket_bytes=1 << 30, timeout_s=30))
    engine = target
    sender.connect([engine])
    try:
        stats = push_weights(_trainer_buckets(trainer, 1 << 30), [engine], sender, 1)
        with pytest.raises(WeightSyncError, match="does not fold pause / resume"):
            sender.send_update(_trainer_buckets(trainer, 1 << 30), [engine], 2, pause="pause")
    finally:
        sender.close([engine])
    assert target.calls == [("pause", False), ("load", True), ("continue", True)]
    assert stats.messages == 1 and stats.phases["pause"] > 0 and stats.phases["resume"] > 0
