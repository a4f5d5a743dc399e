"""The rollout side as it is (one request per Sample, n per prompt) gets each prompt prefilled once by a real engine."""

import asyncio

from transformers import AutoTokenizer

from inference_engine import Engine
from rollout.client import LocalEngineClient
from rollout.config import DataConfig, RolloutConfig
from rollout.data import PromptDataset
from rollout.manager import RolloutManager

N = 8


def test_grpo_rollout_through_the_default_generate_function_hits_the_cache(qwen3_model, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    case = "the doctor said the patient has pain and fever and a cough since last week, what is the diagnosis? "
    rows = [{"prompt": case + f"What is {i} + 1?", "label": str(i + 1)} for i in range(4)]
    with Engine(model_path=str(qwen3_model), max_total_tokens=4096, page_size=4) as engine:
        manager = RolloutManager(RolloutConfig(progress=False, rollout_batch_size=4, n_samples_per_prompt=N,
                                               rollout_max_response_len=4),
                                 PromptDataset(DataConfig(), tok, rows), [LocalEngineClient(engine)], tok)
        batch = asyncio.run(manager.generate(0))
        metrics = engine.metrics()
    assert len(batch.samples) == 4 * N
    prompt_lens = {s.group_index: len(s.tokens) - s.response_length for s in batch.samples}
    # each prompt computed once, its other N - 1 copies reuse all of it but the last (partial) page
    floor = sum((N - 1) * (n // 4 * 4 - 4) for n in prompt_lens.values())
    assert metrics["cached_tokens_total"] >= floor
    assert metrics["prefill_tokens_total"] == metrics["prompt_tokens_total"] - metrics["cached_tokens_total"]
    assert batch.metrics["rollout/cache_hit_rate"] >= floor / (N * sum(prompt_lens.values()))
