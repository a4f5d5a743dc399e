"""The decode graph runner: capture sizes, and equality with eager steps (on CPU, replayed eagerly on
its static padded buffers)."""

import pytest
import torch

from inference_engine import Engine
from inference_engine.config import EngineConfig
from inference_engine.cuda_graph import CudaGraphRunner, capture_batch_sizes

PROMPTS = [[5, 17, 42, 99, 3, 7, 250, 11, 64], [8, 8, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
SP = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def _generate(model_path, backend, graph_max_bs, prompts, sampling_params):
    """Outputs of prompts, with decode steps through a graph runner (None: eager), and how many steps replayed."""
    with Engine(model_path=str(model_path), attention_backend=backend, page_size=4, max_total_tokens=1024,
                context_length=128) as engine:
        runner = engine.runner
        replays = []
        if graph_max_bs is not None:
            graphs = CudaGraphRunner(runner.model, runner.attn_backend, runner.kv_pool, graph_max_bs,
                                     runner.context_length, runner.device)
            replay = graphs.replay
            graphs.replay = lambda fb: replays.append(fb.batch_size) or replay(fb)
            runner.graph_runner = graphs
        outs = engine.generate(input_ids=prompts, sampling_params=sampling_params, return_logprob=True)
    return outs, replays


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_runner_matches_eager(tiny_model, backend):
    eager, _ = _generate(tiny_model, backend, None, PROMPTS, SP)
    graphed, replays = _generate(tiny_model, backend, 4, PROMPTS, SP)
    assert replays and 3 in replays  # three requests decoded together, padded to the size-4 graph
    for e, g in zip(eager, graphed):
        assert g["output_ids"] == e["output_ids"]
        lp_e = [lp for lp, _, _ in e["meta_info"]["output_token_logprobs"]]
        lp_g = [lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]]
        assert lp_g == pytest.approx(lp_e, abs=1e-5)


def test_graph_runner_falls_back_above_max_bs(qwen3_model):
    """Decode batches larger than the biggest graph run eagerly, with the same results."""
    eager, _ = _generate(qwen3_model, "torch", None, PROMPTS, SP)
    graphed, replays = _generate(qwen3_model, "torch", 2, PROMPTS, SP)
    assert 3 not in replays
    assert [g["output_ids"] for g in graphed] == [e["output_ids"] for e in eager]


def test_graph_runner_with_sampling_and_seeds(qwen3_model):
    sp = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 6, "seed": 3, "ignore_eos": True}
    eager, _ = _generate(qwen3_model, "torch", None, PROMPTS, sp)
    graphed, _ = _generate(qwen3_model, "torch", 4, PROMPTS, sp)
    assert [g["output_ids"] for g in graphed] == [e["output_ids"] for e in eager]


def test_graph_runner_with_penalties_and_top_logprobs(qwen3_model):
    """Batches that are not plain greedy sample from the graph's logits: same tokens and log-probs as eager."""
    sp = {"temperature": 0, "repetition_penalty": 1.3, "top_logprobs_num": 3, "max_new_tokens": 6, "ignore_eos": True}
    eager, _ = _generate(qwen3_model, "torch", None, PROMPTS, sp)
    graphed, replays = _generate(qwen3_model, "torch", 4, PROMPTS, sp)
    assert replays
    for e, g in zip(eager, graphed):
        assert g["output_ids"] == e["output_ids"]
        top_e, top_g = e["meta_info"]["output_top_logprobs"], g["meta_info"]["output_top_logprobs"]
        assert [[tok for _, tok, _ in step] for step in top_g] == [[tok for _, tok, _ in step] for step in top_e]
        assert [lp for step in top_g for lp, _, _ in step] == pytest.approx([lp for step in top_e for lp, _, _ in step],
                                                                           abs=1e-5)


def test_config_validates_graph_options(qwen3_model):
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        Engine(model_path=str(qwen3_model), cuda_graph_max_bs=0)
    with pytest.raises(ValueError, match="flashinfer"):
        Engine(model_path=str(qwen3_model), attention_backend="flashinfer")


def test_config_decode_attention(qwen3_model):
    """decode_attention picks the flashinfer backend's decode kernel by batch size; bad values name what is valid."""
    def config(**options):
        return EngineConfig(model_path=str(qwen3_model), device="cuda", dtype="bfloat16", max_running_requests=200,
                            **options)

    assert config().triton_decode_max_bs == 0  # the torch backend: nothing to choose
    assert config(attention_backend="flashinfer").triton_decode_max_bs == 64  # default auto
    assert config(attention_backend="flashinfer", decode_attention="flashinfer").triton_decode_max_bs == 0
    assert config(attention_backend="flashinfer", decode_attention="triton").triton_decode_max_bs == 200
    assert config(attention_backend="flashinfer", decode_attention="auto").triton_decode_max_bs == 64
    assert config(attention_backend="flashinfer", decode_attention="auto",
                  decode_attention_auto_max_bs=8).triton_decode_max_bs == 8
    with pytest.raises(ValueError, match=r"decode_attention 'fast' is unknown; expected one of"):
        config(attention_backend="flashinfer", decode_attention="fast")
    with pytest.raises(ValueError, match="attention_backend 'triton' takes only 'auto'"):
        config(attention_backend="triton", decode_attention="flashinfer")
    with pytest.raises(ValueError, match="decode_attention_auto_max_bs must be >= 1, got 0"):
        config(attention_backend="flashinfer", decode_attention="auto", decode_attention_auto_max_bs=0)


def test_no_graphs_on_cpu(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=1024) as engine:
        assert engine.runner.graph_runner is None
        assert torch.device(engine.runner.device).type == "cpu"
