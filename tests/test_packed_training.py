"""A packed (THD, one row) training step gives the same gradients as the padded one (fp32, CPU); recompute too."""

import pytest
import torch

from trainer.batching import pack_micro_batches
from trainer.config import TrainerConfig
from trainer.testing import make_samples, run_distributed


def _grads_worker(rank, world, path):
    from trainer.actor import TrainerActor

    samples = make_samples(8, vocab_size=500, seed=7, min_len=5, max_len=30)
    out = {}
    for name, overrides in {"padded": dict(pack_sequences=False), "packed": {},
                            "packed_selective": dict(recompute="selective"),
                            "packed_full": dict(recompute="full")}.items():
        cfg = TrainerConfig(hf_checkpoint=str(path), lr=1e-3, global_batch_size=8, max_tokens_per_gpu=64,
                            clip_grad=0.0, temperature=0.9, logprob_chunk_tokens=16, **overrides)
        actor = TrainerActor(cfg, rank, world, "127.0.0.1", 0)
        actor.init()
        metrics = actor.train_step(samples)
        out[name] = {"metrics": metrics, "grads": [p.grad.clone() for p in actor.optimizer.params]}
        actor.shutdown()
    return out


@pytest.fixture(scope="module")
def grads(qwen3_model):
    return run_distributed(_grads_worker, 1, qwen3_model)[0]


def test_packed_step_gives_the_padded_steps_gradients(grads):
    padded, packed = grads["padded"], grads["packed"]
    assert padded["metrics"]["padding_fraction"] > 0.05 and packed["metrics"]["padding_fraction"] == 0.0
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert packed["metrics"][key] == pytest.approx(padded["metrics"][key], rel=1e-5, abs=1e-7), key
    worst = max((a - b).abs().max().item() / max(1e-6, b.abs().max().item())
                for a, b in zip(packed["grads"], padded["grads"]))
    assert worst < 1e-4


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_keeps_the_gradients(grads, mode):
    for a, b in zip(grads[f"packed_{mode}"]["grads"], grads["packed"]["grads"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_packed_micro_batches_fill_the_budget_first_fit():
    tokens = [[1] * n for n in (5, 9, 3, 9, 7, 2)]
    batches = pack_micro_batches(list(range(6)), tokens, [1] * 6, max_tokens=18, packed=True)
    assert [b.indices for b in batches] == [[1, 3], [4, 0, 2, 5]]
    assert [b.padded_tokens for b in batches] == [18, 17]
    mb = batches[1]
    assert mb.tokens.shape == (1, 17) and mb.lengths == [7, 5, 3, 2]
    assert mb.position_ids().tolist() == [list(range(7)) + list(range(5)) + list(range(3)) + list(range(2))]


def test_packed_response_positions_and_targets():
    tokens = [[5, 6, 7, 8], [1, 2, 3], [9, 4]]
    mb = pack_micro_batches([0, 1, 2], tokens, [2, 1, 1], max_tokens=100, packed=True)[0]
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 1, 2, 3, 9, 4]]
    assert mb.response_positions().tolist() == [1, 2, 5, 7]  # logits at these positions predict 7, 8, 3, 4
    assert mb.response_targets().tolist() == [7, 8, 3, 4]


def test_config_rejects_unknown_recompute(qwen3_model):
    with pytest.raises(ValueError, match="recompute='some'; valid: none, selective, full"):
        TrainerConfig(hf_checkpoint=str(qwen3_model), recompute="some")
