"""Config dataclasses and the generated CLI: flags, help, YAML, overrides, errors, round trip."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from orchestrator.cli import ConfigError, build_parser, dump_yaml, field_docs, parse_configs
from orchestrator.config import RunConfig
from rollout.config import DataConfig, RolloutConfig

ALL = (RunConfig, RolloutConfig, DataConfig)


@dataclass
class FakeLossConfig:
    """A nested config: its fields become flags of their own."""

    kl_coef: float = 0.0  # KL penalty weight
    eps_clip: float = 0.2  # PPO clip range

    def __post_init__(self):
        if not 0 < self.eps_clip < 1:
            raise ValueError(f"eps_clip={self.eps_clip}; must be in (0, 1)")


@dataclass
class FakeTrainerConfig:
    """Stands in for another part's config: the generator must take any dataclass."""

    global_batch_size: int = 64
    """Samples per optimizer step."""
    advantage_estimator: Literal["grpo", "reinforce_plus_plus", "ppo"] = "grpo"
    """How advantages are computed."""
    lr: float = field(default=1e-6, metadata={"flag": "actor-lr"})
    """Learning rate."""
    seed: int = 1234
    """Shared with RunConfig.seed: one flag sets both."""
    loss: FakeLossConfig = field(default_factory=FakeLossConfig)


def test_defaults_and_slime_flag_names():
    run, rollout, data = parse_configs(ALL, [])
    assert (run, rollout, data) == (RunConfig(), RolloutConfig(), DataConfig())
    options = build_parser(ALL + (FakeTrainerConfig,))._option_string_actions
    for flag in ("--rollout-batch-size", "--n-samples-per-prompt", "--global-batch-size", "--rollout-max-response-len",
                 "--rollout-temperature", "--rollout-top-p", "--advantage-estimator", "--kl-coef", "--eps-clip",
                 "--colocate", "--no-colocate", "--custom-generate-function-path", "--custom-rm-path", "--input-key",
                 "--label-key", "--metadata-key", "--apply-chat-template", "--rollout-shuffle", "--rollout-seed",
                 "--num-epoch", "--partial-rollout", "--over-sampling-batch-size", "--dynamic-sampling-filter-path",
                 "--debug-rollout-only", "--debug-train-only", "--save-debug-rollout-data",
                 "--load-debug-rollout-data", "--load", "--save", "--save-interval", "--eval-interval",
                 "--rollout-num-engines", "--actor-lr", "--config"):
        assert flag in options, flag


def test_cli_values_types_and_bools():
    run, rollout, data = parse_configs(ALL, [
        "--rollout-batch-size", "4", "--rollout-temperature", "0.7", "--no-colocate", "--rollout-shuffle",
        "--rollout-stop", "###", "END", "--rollout-stop-token-ids", "5", "7", "--custom-rm-path", "a.b:c",
        "--label-key", "none", "--rollout-num-engines", "3", "--rm-type", "exact_match"])
    assert rollout.rollout_batch_size == 4 and rollout.rollout_temperature == 0.7
    assert run.colocate is False and data.rollout_shuffle is True
    assert rollout.rollout_stop == ["###", "END"] and rollout.rollout_stop_token_ids == [5, 7]
    assert rollout.custom_rm_path == "a.b:c" and data.label_key is None
    assert run.num_engines == 3 and rollout.rm_type == "exact_match"


def test_help_text_comes_from_field_docstrings():
    docs = field_docs(RolloutConfig)
    assert docs["rollout_batch_size"].startswith("Prompts per rollout step")
    text = build_parser(ALL + (FakeTrainerConfig,)).format_help()
    assert "Prompts per rollout step" in text and "PPO clip range" in text and "Learning rate" in text


def test_nested_config_flags_and_errors():
    (trainer,) = parse_configs([FakeTrainerConfig], ["--eps-clip", "0.1", "--kl-coef", "0.02"])
    assert trainer.loss == FakeLossConfig(kl_coef=0.02, eps_clip=0.1)
    with pytest.raises(ConfigError, match=r"eps_clip=1.5; must be in \(0, 1\)"):
        parse_configs([FakeTrainerConfig], ["--eps-clip", "1.5"])


def test_every_part_config_fits_one_command_line():
    """The driver's command line: rollout, data, run, trainer and engine configs together, no clashing flags."""
    from inference_engine.config import EngineConfig
    from trainer.config import TrainerConfig
    parser = build_parser(ALL + (TrainerConfig, EngineConfig))
    for flag in ("--hf-checkpoint", "--global-batch-size", "--advantage-estimator", "--kl-coef", "--eps-clip",
                 "--model-path", "--reward-key"):
        assert flag in parser._option_string_actions, flag


def test_yaml_sets_flags_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout_batch_size: 8\nrollout-temperature: 0.5\ncolocate: false\n"
                    "rollout_stop: ['a', 'b']\nactor-lr: 3.0e-5\nseed: 7\nkl_coef: 0.01\n")
    run, rollout, data, trainer = parse_configs(ALL + (FakeTrainerConfig,),
                                                ["--config", str(path), "--rollout-batch-size", "2"])
    assert rollout.rollout_batch_size == 2  # CLI wins
    assert rollout.rollout_temperature == 0.5 and run.colocate is False and rollout.rollout_stop == ["a", "b"]
    assert trainer.lr == 3e-5 and trainer.loss == FakeLossConfig(kl_coef=0.01)
    assert run.seed == 7 and trainer.seed == 7  # a shared flag sets both fields


def test_yaml_round_trip(tmp_path):
    configs = (RunConfig(num_rollout=3, save="ckpt", save_interval=2, colocate=False),
               RolloutConfig(rollout_batch_size=5, rollout_stop=["x"], custom_rm_path="m.n:f", partial_rollout=True,
                             rollout_deadline=2.5, sampling_seed=3),
               DataConfig(prompt_data="d.jsonl", label_key=None, apply_chat_template=True, system_prompt="Be brief."),
               FakeTrainerConfig(advantage_estimator="ppo", lr=2e-6, seed=1234,
                                 loss=FakeLossConfig(kl_coef=0.05, eps_clip=0.3)))
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(configs))
    assert parse_configs([type(c) for c in configs], ["--config", str(path)]) == configs


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout_batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rollout_batch_sise'; did you mean rollout_batch_size"):
        parse_configs(ALL, ["--config", str(path)])


def test_yaml_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout_batch_size: many\n")
    with pytest.raises(ConfigError, match=r"rollout_batch_size.*expected an integer.*'many'"):
        parse_configs(ALL, ["--config", str(path)])
    path.write_text("rm_type: neural\n")
    with pytest.raises(ConfigError, match=r"'neural' is not one of"):
        parse_configs(ALL, ["--config", str(path)])


def test_cli_type_errors_exit(capsys):
    with pytest.raises(SystemExit):
        parse_configs(ALL, ["--rollout-batch-size", "x"])
    assert "expected an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_configs(ALL, ["--no-such-flag"])


@pytest.mark.parametrize("argv, message", [
    (["--rollout-batch-size", "0"], r"rollout_batch_size = 0: expected an integer >= 1"),
    (["--rollout-top-p", "1.5"], r"rollout_top_p = 1.5: expected a value in \(0, 1\]"),
    (["--rm-type", "remote"], r"needs --rm-url"),
    (["--rm-type", "format"], r"needs --format-reward-pattern"),
    (["--rm-type", "format", "--format-reward-pattern", "("], r"format_reward_pattern = '\('"),
    (["--custom-rm-path", "not a path"], r"expected an import path"),
    (["--group-rm"], r"group_rm needs --custom-rm-path"),
    (["--save-interval", "5"], r"save_interval = 5 needs --save"),
    (["--debug-rollout-only", "--debug-train-only"], r"cannot both be set"),
    (["--system-prompt", "hi"], r"system_prompt needs --apply-chat-template"),
    (["--sample-timeout", "-1"], r"sample_timeout = -1.0: expected a number of seconds > 0"),
])
def test_validation_errors_name_the_value(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_configs(ALL, argv)


def test_clashing_flags_are_an_error():
    @dataclass
    class Other:
        seed: str = "x"
        """A seed of another type."""

    with pytest.raises(ValueError, match=r"--seed .*Other.seed.*clashes with RunConfig.seed"):
        build_parser((RunConfig, Other))


def test_sampling_params():
    cfg = RolloutConfig(rollout_max_response_len=9, rollout_temperature=0.8, rollout_top_p=0.9,
                        rollout_stop=["\n\n"], eval_max_response_len=3)
    assert cfg.sampling_params() == {"max_new_tokens": 9, "temperature": 0.8, "top_p": 0.9, "top_k": -1,
                                     "stop": ["\n\n"]}
    assert cfg.sampling_params(evaluation=True) == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0,
                                                    "top_k": -1, "stop": ["\n\n"]}
