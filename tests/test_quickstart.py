"""The quickstart's pieces (examples/quickstart): data, digit tokenizer, SFT warm-up, run config, plot; not the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from examples.quickstart.make_data import make_problems, write_dataset
from examples.quickstart.sft import encode_examples, sft
from inference_engine.testing import make_tiny_model, make_tokenizer

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_is_deterministic_and_split(tmp_path):
    first = write_dataset(tmp_path / "a", max_operand=19, seed=0)
    again = write_dataset(tmp_path / "b", max_operand=19, seed=0)
    other = write_dataset(tmp_path / "c", max_operand=19, seed=1)
    for name in ("train", "test", "sft"):
        assert first[name].read_bytes() == again[name].read_bytes()
    assert first["test"].read_bytes() != other["test"].read_bytes()
    train, test = read_jsonl(first["train"]), read_jsonl(first["test"])
    assert (len(train), len(test)) == (320, 80)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    for row in train + test:
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert op == "+" and 0 <= int(a) <= 19 and 0 <= int(b) <= 19 and int(row["label"]) == int(a) + int(b)
    sft_rows = read_jsonl(first["sft"])
    assert [(m["messages"][0]["content"], m["messages"][1]["content"]) for m in sft_rows] == \
        [(r["prompt"], r["label"]) for r in train]
    assert len(make_problems(19)) == 400


def test_split_digits_tokenizer(tmp_path):
    split = make_tokenizer(tmp_path / "split", split_digits=True)
    merged = make_tokenizer(tmp_path / "merged")
    ids = split("What is 12 + 7? 38", add_special_tokens=False)["input_ids"]
    digits = [t for t in split.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digits == ["1", "2", "7", "3", "8"]
    assert split.decode(ids) == "What is 12 + 7? 38"
    # the default tokenizer is unchanged: a number's first digit carries the space before it
    assert merged.tokenize("What is 12 + 7?") == ["What", "Ġis", "Ġ1", "2", "Ġ+", "Ġ7", "?"]
    with pytest.raises(ValueError, match="split_digits"):
        make_tiny_model(tmp_path / "m", tokenizer_dir=tmp_path / "split", split_digits=True)


def answer_loss(model, examples) -> float:
    """Mean cross-entropy of the answer tokens (and EOS) given the prompt, one example at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, prompt_len in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # [L, V]
            logp = torch.log_softmax(logits[:-1], -1)  # [L-1, V], position t predicts token t+1
            targets = torch.tensor(ids[1:])
            picked = logp[torch.arange(len(targets)), targets][prompt_len - 1:]
            total -= picked.sum().item()
            count += len(picked)
    return total / count


def test_sft_lowers_the_answer_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = write_dataset(tmp_path / "data", max_operand=9, seed=0)
    model_dir = make_tiny_model(tmp_path / "model", "qwen3", hidden_size=64, num_layers=2, intermediate_size=128,
                                init_std=0.02, split_digits=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = encode_examples(tok, read_jsonl(paths["sft"]))
    ids, prompt_len = examples[0]
    assert tok.decode(ids[prompt_len:]) == read_jsonl(paths["train"])[0]["label"] + tok.eos_token
    assert tok.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # noqa: E731
    before = answer_loss(load(), examples)
    sft(model_dir, paths["sft"], steps=30, lr=3e-3, batch_size=16, seed=0)
    after = answer_loss(load(), examples)
    assert after < 0.6 * before, (before, after)


def test_config_parses(tmp_path):
    from orchestrator.cli import ConfigError
    from orchestrator.driver import parse_args

    model = make_tiny_model(tmp_path / "model", "qwen3", split_digits=True)
    cfg = parse_args(["--config", str(REPO / "examples/quickstart/config.yaml"), "--hf-checkpoint", str(model),
                      "--num-rollout", "3"])
    assert cfg.run.num_rollout == 3 and cfg.policies == {"default": str(model)}
    assert cfg.rollout.custom_rm_path == "examples.quickstart.reward:arithmetic_reward"
    assert cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt == cfg.trainer.global_batch_size
    assert cfg.trainer.temperature == cfg.rollout.rollout_temperature  # log-probs of the sampling distribution
    assert cfg.data.apply_chat_template and cfg.rollout.rollout_max_response_len >= 3  # "38" + <|im_end|>
    with pytest.raises(ConfigError, match="not a local HF model folder"):
        parse_args(["--config", str(REPO / "examples/quickstart/config.yaml"), "--hf-checkpoint", str(tmp_path)])


def test_plot_reads_the_metrics(tmp_path):
    from examples.quickstart.plot import plot_rewards

    rows = [{"step": 0, "eval/reward_mean": 0.25}] + \
           [{"step": s, "rollout/reward_mean": s / 10, "timing/step_s": 1.0} for s in range(1, 6)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = plot_rewards(metrics, tmp_path / "curve.png")
    assert series["rollout/reward_mean"] == [(s, s / 10) for s in range(1, 6)]
    assert series["eval/reward_mean"] == [(0, 0.25)]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_default_to_the_ignored_runs_folder(tmp_path):
    """The quickstart's files (data, model, metrics, checkpoints, plot) go under runs/, which git ignores."""
    import subprocess
    import sys

    import yaml

    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()
    config = yaml.safe_load((REPO / "examples/quickstart/config.yaml").read_text())
    paths = {k: config[k] for k in ("hf_checkpoint", "prompt_data", "eval_prompt_data", "metrics_file", "save")}
    assert all(v.startswith("runs/quickstart/") for v in paths.values()), paths
    assert 'OUT=${OUT:-runs/quickstart}' in (REPO / "examples/quickstart/run.sh").read_text()
    done = subprocess.run([sys.executable, "-m", "examples.quickstart.make_data"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "runs/quickstart/data").iterdir()) == ["sft.jsonl", "test.jsonl",
                                                                                      "train.jsonl"]
    for module in ("sft", "plot"):
        text = subprocess.run([sys.executable, "-m", f"examples.quickstart.{module}", "--help"], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=120).stdout
        assert "runs/quickstart/" in text and "(default runs/quickstart/" in " ".join(text.split())


# ---- the GPU quickstart (examples/quickstart/config_gpu.yaml, scripts/quickstart_gpu.sh), its pieces on CPU ----

def test_data_sampled_from_a_large_task(tmp_path):
    first = write_dataset(tmp_path / "a", max_operand=999, num_problems=2000, test_fraction=0.05, seed=0)
    again = write_dataset(tmp_path / "b", max_operand=999, num_problems=2000, test_fraction=0.05, seed=0)
    for name in ("train", "test", "sft"):
        assert first[name].read_bytes() == again[name].read_bytes()
    train, test = read_jsonl(first["train"]), read_jsonl(first["test"])
    assert (len(train), len(test)) == (1900, 100)
    assert len({r["prompt"] for r in train + test}) == 2000
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    operands = []
    for row in train + test:
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert op == "+" and int(row["label"]) == int(a) + int(b)
        operands += [int(a), int(b)]
    assert 0 <= min(operands) and max(operands) <= 999 and max(operands) >= 900  # drawn from the whole range
    # without num_problems the split is the one written before the option existed
    assert write_dataset(tmp_path / "c", max_operand=19, seed=0)["test"].read_bytes() == \
        write_dataset(tmp_path / "d", max_operand=19, seed=0, num_problems=None)["test"].read_bytes()
    with pytest.raises(ValueError, match="num_problems"):
        write_dataset(tmp_path / "e", max_operand=9, num_problems=101)


def greedy_exact(model, tokenizer, examples) -> list[bool]:
    """Reference: transformers' greedy generate, one example at a time; exact answer then EOS."""
    out = []
    with torch.no_grad():
        for ids, prompt_len in examples:
            answer = ids[prompt_len:]
            gen = model.generate(torch.tensor([ids[:prompt_len]]), max_new_tokens=len(answer), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out.append(gen[0, prompt_len:].tolist() == answer)
    return out


def test_exact_accuracy_is_greedy_decoding(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.quickstart.sft import exact_accuracy

    paths = write_dataset(tmp_path / "data", max_operand=9, seed=0)
    model_dir = make_tiny_model(tmp_path / "model", "qwen3", hidden_size=64, num_layers=2, intermediate_size=128,
                                init_std=0.02, split_digits=True)
    sft(model_dir, paths["sft"], steps=60, lr=3e-3, batch_size=16, seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = encode_examples(tok, read_jsonl(paths["sft"]))
    reference = greedy_exact(model, tok, examples)
    assert 0 < sum(reference) < len(reference)  # some right, some wrong: the comparison means something
    assert exact_accuracy(model, examples, tok.pad_token_id, batch_size=7) == sum(reference) / len(reference)


def test_sft_gpu_options_on_cpu(tmp_path, capsys):
    """bf16 autocast and warm-up still lower the answer loss; --target-accuracy stops at the first check that
    reaches it (the held-back examples' accuracy as exact_accuracy gives it); --time-limit stops and saves."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = write_dataset(tmp_path / "data", max_operand=9, seed=0)
    model_dir = make_tiny_model(tmp_path / "model", "qwen3", hidden_size=64, num_layers=2, intermediate_size=128,
                                init_std=0.02, split_digits=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = encode_examples(tok, read_jsonl(paths["sft"]))
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # noqa: E731
    before = answer_loss(load(), examples)
    sft(model_dir, paths["sft"], steps=30, lr=3e-3, batch_size=16, seed=0, bf16=True, warmup_steps=5)
    after = answer_loss(load(), examples)
    assert after < 0.6 * before, (before, after)
    capsys.readouterr()
    sft(model_dir, paths["sft"], steps=80, lr=3e-3, batch_size=16, seed=0, target_accuracy=0.05, check_every=10,
        probe_size=32)
    checks = [(int(s), float(a)) for s, a in re.findall(r"sft step (\d+)/80: greedy exact accuracy ([\d.]+)",
                                                        capsys.readouterr().out)]
    assert [s for s, _ in checks] == list(range(10, 10 * len(checks) + 1, 10))
    assert all(a < 0.05 for _, a in checks[:-1]) and checks[-1][1] >= 0.05 and checks[-1][0] < 80, checks
    sft(model_dir, paths["sft"], steps=50, lr=3e-3, batch_size=16, seed=0, time_limit=0.0)
    assert "sft: stopped after step 1 at --time-limit 0 s" in capsys.readouterr().out
    with pytest.raises(ValueError, match="probe_size"):
        sft(model_dir, paths["sft"], steps=1, lr=3e-3, batch_size=16, seed=0, target_accuracy=0.5, probe_size=80)


def test_gpu_config_parses(tmp_path):
    """The GPU config resolves through the driver with every GPU feature on, and its sizes fit the task."""
    import yaml
    from transformers import AutoTokenizer

    from orchestrator.driver import parse_args

    model = make_tiny_model(tmp_path / "model", "qwen3", hidden_size=128, num_layers=2, num_heads=1, num_kv_heads=1,
                            split_digits=True)
    cfg = parse_args(["--config", str(REPO / "examples/quickstart/config_gpu.yaml"), "--hf-checkpoint", str(model),
                      "--num-rollout", "7", "--lr-decay-steps", "7"])
    assert cfg.run.num_rollout == 7 and cfg.trainer.lr_decay_steps == 7 and cfg.run.colocate
    assert cfg.run.rollout_client == "ray"   # the GPU machine has no HTTP server
    e = cfg.engine
    assert (e.attention_backend, e.dtype, e.disable_cuda_graph, e.page_size) == ("flashinfer", "bfloat16", False, 16)
    assert cfg.trainer.bf16 and cfg.rollout.custom_rm_path == "examples.quickstart.reward:arithmetic_reward"
    assert cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt == cfg.trainer.global_batch_size
    assert cfg.trainer.temperature == cfg.rollout.rollout_temperature
    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 999 + 999?"}], tokenize=False,
                                     add_generation_prompt=True)
    longest_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    longest_answer = len(tok("1998", add_special_tokens=False)["input_ids"]) + 1   # and EOS
    assert cfg.rollout.rollout_max_response_len >= longest_answer
    assert e.context_length >= longest_prompt + cfg.rollout.rollout_max_response_len
    samples_tokens = cfg.trainer.global_batch_size * (longest_prompt + cfg.rollout.rollout_max_response_len)
    assert cfg.trainer.max_tokens_per_gpu * 2 >= samples_tokens   # at most two packed micro-batches a step
    config = yaml.safe_load((REPO / "examples/quickstart/config_gpu.yaml").read_text())
    paths = [config[k] for k in ("hf_checkpoint", "prompt_data", "eval_prompt_data", "metrics_file")]
    assert all(v.startswith("runs/quickstart_gpu/") for v in paths), paths
