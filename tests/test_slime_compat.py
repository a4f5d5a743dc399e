"""slime's flag names (orchestrator/slime_compat.py): aliases, warn-once ignored flags, refused ones, the
docs/from_slime.md table, slime's run-qwen3-4B.sh flags (tests/fixtures), and two cli.py error messages."""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest

from orchestrator import slime_compat
from orchestrator.cli import ConfigError, build_parser, parse_configs
from orchestrator.config import RunConfig
from orchestrator.driver import CONFIG_CLASSES, parse_args
from rollout.config import DataConfig, RolloutConfig

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "slime_run_qwen3_4B_args.txt"
DOC = ROOT / "docs" / "from_slime.md"
# run-qwen3-4B.sh's flags Kiln refuses (docs/from_slime.md, section "slime's run-qwen3-4B.sh"): colocated
# engines of 2 GPUs each
FIXTURE_REJECTED = {"--rollout-num-gpus-per-engine"}

# a value for each value-taking alias's Kiln flag that differs from the default and passes validation
VALUES = {
    "tp-size": "2", "mem-fraction-static": "0.5", "context-length": "64", "chunked-prefill-size": "128",
    "max-running-requests": "7", "max-total-tokens": "4096", "page-size": "4", "schedule-policy": "lpm",
    "cuda-graph-max-bs": "8", "random-seed": "5", "dtype": "bfloat16", "served-model-name": "m",
    "attention-backend": "triton", "health-check-interval": "3.5", "engine-health-timeout": "4.5",
    "tensor-parallel-size": "2", "recompute": "full", "logprob-chunk-tokens": "64", "lr-warmup-steps": "3",
    "lr-decay-steps": "5", "kl-coef": "0.01", "dual-clip-c": "3.0", "tis-cap": "1.5", "kv-cache-dtype": "fp8_e4m3",
    "ep-size": "2", "rollout-concurrency": "64",
}
EXTRA = {"ep-size": ["--tp-size", "2"]}  # flags an alias's test value needs beside it
_FLAGS = {name for cls in CONFIG_CLASSES for name in build_parser([cls], compat=False)._option_string_actions}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    slime_compat.reset_warnings()
    yield
    slime_compat.reset_warnings()


def _base(model) -> list[str]:
    # --no-colocate: engines of several devices; --use-kl-loss: a KL coefficient goes to the loss (GRPO)
    return ["--hf-checkpoint", str(model), "--prompt-data", "x.jsonl", "--no-colocate", "--use-kl-loss"]


def _layers(model) -> str:
    return str(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])


MOE_ONLY = {"use-routing-replay", "ep-size"}


@pytest.mark.parametrize("alias", slime_compat.ALIASES, ids=lambda a: a.slime)
def test_alias_sets_kiln_field(alias, qwen3_model, request, tmp_path):
    assert f"--{alias.kiln}" in _FLAGS, f"{alias.slime} names a Kiln flag that does not exist"
    if alias.kiln in MOE_ONLY:  # refused on a dense model
        qwen3_model = request.getfixturevalue("qwen3_moe_model")
    base = _base(qwen3_model) + EXTRA.get(alias.kiln, [])
    default = parse_args(base).flag_values()[alias.kiln]
    if not alias.takes_value:
        values = parse_args(base + [f"--{alias.slime}"]).flag_values()
        assert values[alias.kiln] == alias.const
        assert alias.const != default or alias.slime == "calculate-per-token-loss"  # slime's default differs
        path = tmp_path / "c.yaml"
        path.write_text(f"{alias.slime.replace('-', '_')}: true\n")
        assert parse_args(base + ["--config", str(path)]).flag_values()[alias.kiln] == alias.const
        return
    is_switch = isinstance(default, bool)
    value = "true" if is_switch else VALUES.get(alias.kiln) or (
        _layers(qwen3_model) if alias.kiln == "pipeline-parallel-size" else None)
    assert value is not None, f"add a test value for --{alias.kiln}"
    if is_switch:
        want = parse_args(base + [f"--no-{alias.kiln}" if default else f"--{alias.kiln}"]).flag_values()
        got = parse_args(base + [f"--no-{alias.slime}" if default else f"--{alias.slime}"]).flag_values()
    else:
        want = parse_args(base + [f"--{alias.kiln}", value]).flag_values()
        got = parse_args(base + [f"--{alias.slime}", value]).flag_values()
    assert got[alias.kiln] == want[alias.kiln]
    if alias.kiln != "pipeline-parallel-size":
        assert got[alias.kiln] != default
    path = tmp_path / "c.yaml"  # YAML: slime's key, underscores
    path.write_text(f"{alias.slime.replace('-', '_')}: {json.dumps(not default) if is_switch else value}\n")
    assert parse_args(base + ["--config", str(path)]).flag_values()[alias.kiln] == want[alias.kiln]


def test_alias_value_spellings(qwen3_model, tiny_models):
    base = _base(qwen3_model)
    assert parse_args(base + ["--sglang-attention-backend", "torch_native"]).engine.attention_backend == "torch"
    cfg = parse_args(base + ["--rm-type", "deepscaler"])
    assert cfg.rollout.rm_type == "math"
    assert parse_args(base + ["--attention-backend", "flash"]).engine.attention_backend == "torch"  # Megatron's
    cfg = parse_args(base + ["--rollout-num-gpus", "4", "--rollout-num-gpus-per-engine", "2"])
    assert (cfg.run.num_engines, cfg.engine.tp_size) == (2, 2)
    cfg = parse_args(base + ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--num-steps-per-rollout",
                             "2"])
    assert cfg.trainer.global_batch_size == 8
    cfg = parse_args(base + ["--eval-prompt-data", "aime", "a.jsonl", "--eval-interval", "2"])
    assert cfg.data.eval_prompt_data == "a.jsonl"
    assert parse_args(base + ["--ref-load", "/nowhere/torch_dist"]).trainer.ref_checkpoint is None
    assert parse_args(base + ["--ref-load", str(qwen3_model)]).trainer.ref_checkpoint is None  # = hf checkpoint
    other = str(tiny_models["qwen2"])  # an HF folder other than --hf-checkpoint: the reference model
    assert parse_args(base + ["--ref-load", other]).trainer.ref_checkpoint == other


def test_help_lists_both_names():
    text = " ".join(build_parser(CONFIG_CLASSES, prog="train.py").format_help().split())
    for alias in slime_compat.ALIASES:
        assert f"--{alias.slime}" in text.replace("- ", "-"), alias.slime


def _rejected_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


@pytest.mark.parametrize("entry", slime_compat.REJECTED, ids=lambda r: r.slime)
def test_rejected_flags_say_why(entry, qwen3_model, capsys):
    argv = _base(qwen3_model) + [f"--{entry.slime}"] + (["x"] if entry.nargs else [])
    err = _rejected_message(argv, capsys)
    assert f"--{entry.slime}" in err and "not supported" in err and entry.why in err


def test_ignored_values_outside_accepts_are_rejected(qwen3_model, capsys):
    base = _base(qwen3_model)
    for entry in slime_compat.IGNORED:
        if entry.accepts is None:
            continue
        parse_args(base + [f"--{entry.slime}", entry.accepts[0]])
        err = _rejected_message(base + [f"--{entry.slime}", "7"], capsys)
        assert f"--{entry.slime} 7" in err and entry.refuse in err
    err = _rejected_message(base + ["--colocate", "--rollout-num-gpus-per-engine", "2"], capsys)
    assert "colocated engines span one device" in err
    err = _rejected_message(base + ["--kl-loss-coef", "0.1", "--kl-coef", "0.2"], capsys)
    assert "one KL coefficient" in err
    err = _rejected_message(base + ["--eval-prompt-data", "a", "a.jsonl", "b", "b.jsonl"], capsys)
    assert "list several sets (name, path, ...) in --eval-config FILE.yaml" in err


def test_ignored_flags_warn_once(qwen3_model, caplog, tmp_path):
    argv = _base(qwen3_model) + ["--num-layers", "36", "--swiglu", "--sglang-enable-metrics", "--sglang-foo", "3",
                                 "--attention-dropout", "0.0", "--hidden-dropout", "0", "--offload"]
    path = tmp_path / "c.yaml"
    path.write_text("num_layers: 36\nswiglu: true\n")
    with caplog.at_level(logging.WARNING, logger="kiln.cli"):
        parse_args(argv)
        parse_args(argv + ["--config", str(path)])
        parse_args(argv)
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.cli"]
    names = [line.split(":")[0] for line in lines]
    assert sorted(names) == sorted(["--num-layers", "--swiglu", "--sglang-enable-metrics", "--sglang-foo",
                                    "--attention-dropout", "--hidden-dropout", "--offload"])
    assert all("\n" not in line for line in lines)


def _fixture_lines() -> list[list[str]]:
    return [shlex.split(line) for line in FIXTURE.read_text().splitlines() if line and not line.startswith("#")]


def test_slime_run_qwen3_4B_parses_with_documented_rejections(qwen3_model, capsys, caplog):
    lines = [[str(qwen3_model) if t == "/root/Qwen3-4B" else t for t in line] for line in _fixture_lines()]
    assert len(lines) == 72  # 69 in the script's arrays + --actor-num-nodes, --actor-num-gpus-per-node, --colocate
    rejected = set()
    while True:
        argv = [t for line in lines for t in line]
        try:
            with caplog.at_level(logging.WARNING, logger="kiln.cli"):
                cfg = parse_args(argv)
            break
        except SystemExit:
            err = capsys.readouterr().err.strip().splitlines()[-1]
            flag = re.search(r"error: (--[\w-]+)", err).group(1)
            assert flag not in rejected
            rejected.add(flag)
            lines = [line for line in lines if line[0] != flag]
    assert rejected == FIXTURE_REJECTED
    section = DOC.read_text().split("## slime's run-qwen3-4B.sh", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"rejected: `(--[\w-]+)", section)) == FIXTURE_REJECTED
    ignored = {r.getMessage().split(":")[0] for r in caplog.records if r.name == "kiln.cli"}
    assert {"--num-layers", "--qk-layernorm", "--ref-load", "--attention-dropout",
            "--rm-type", "--attention-backend", "--eval-prompt-data", "--sequence-parallel"} <= ignored
    trainer = cfg.trainer
    assert (trainer.tensor_parallel_size, trainer.recompute, trainer.max_tokens_per_gpu) == (2, "full", 9216)
    assert cfg.trainer.loss.use_kl_loss and cfg.trainer.loss.kl_coef == 0.0 and cfg.trainer.loss.eps_clip_high == 0.28
    assert cfg.trainer.loss.kl_loss_type == "low_var_kl" and cfg.trainer.ref_checkpoint is None
    assert (cfg.engine.mem_fraction_static, cfg.engine.attention_backend) == (0.7, "torch")
    assert (cfg.rollout.rm_type, cfg.data.eval_prompt_data) == ("math", "/root/aime-2024/aime-2024.jsonl")
    assert (cfg.run.num_rollout, cfg.run.actor_num_gpus_per_node, cfg.trainer.global_batch_size) == (3000, 8, 256)
    assert cfg.trainer.balance_data and "--balance-data" not in ignored   # a Kiln flag of the same name


def test_no_entry_names_a_kiln_flag():
    """A table entry of a Kiln flag's name would be dead (the Kiln flag wins): delete it when Kiln gains the flag."""
    kiln = _flag_names()
    dead = [e.slime for e in (*slime_compat.ALIASES, *slime_compat.IGNORED, *slime_compat.REJECTED) if e.slime in kiln]
    assert dead == [], f"slime_compat entries for flags Kiln has now: {dead}"
    assert {a.kiln for a in slime_compat.ALIASES} <= kiln
    assert [s for s in slime_compat.SPECIAL_DOC if s in kiln] == ["eval-prompt-data"]   # translated, not shadowed


def test_doc_tables_are_generated_from_the_table():
    text = DOC.read_text()
    assert slime_compat.doc_tables(text) == "\n" + slime_compat.markdown_tables() + "\n", \
        "docs/from_slime.md is stale: run python -m orchestrator.slime_compat"
    assert slime_compat.with_tables(text) == text
    rows = re.findall(r"^\| `--([\w-]+)`", slime_compat.doc_tables(text), flags=re.M)
    assert len(rows) == len(slime_compat.ALIASES) + len(slime_compat.IGNORED) + len(slime_compat.REJECTED)
    assert "| `--disable-grpo-std-normalization` | `--normalize-advantages-std false` |" in text
    assert "| `--sglang-attention-backend` | `--attention-backend` (`torch_native` → `torch`) |" in text
    assert "| `--eval-top-k` X | ignored for -1, else rejected |" in text


def _flag_names():
    return {f.lstrip("-") for f in _FLAGS}


def test_table_names_are_unique():
    names = [e.slime for e in (*slime_compat.ALIASES, *slime_compat.IGNORED, *slime_compat.REJECTED)]
    assert len(names) == len(set(names))


def test_cli_type_error_names_the_flag_once(capsys):
    with pytest.raises(SystemExit):
        parse_configs((RunConfig,), ["--num-rollout", "ten"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.count("--num-rollout") == 1 and "expected an integer, got 'ten'" in err


def test_yaml_suggestions_use_underscores(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout_batch_sise: 8\n")
    with pytest.raises(ConfigError) as e:
        parse_configs((RunConfig, RolloutConfig, DataConfig), ["--config", str(path)])
    assert "did you mean rollout_batch_size" in str(e.value) and "rollout-batch-size" not in str(e.value)
