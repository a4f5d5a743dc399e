"""Env plugin API: registry (name, import path, entry points), timeouts and errors, the arithmetic env."""

import asyncio
import sys
import textwrap

import pytest

import envs
from envs import Env, EnvError, StepResult, run_reset, run_step
from envs.arithmetic import ArithmeticEnv, arithmetic_samples, parse_answer
from kiln_common.sample import Sample


class EchoEnv(Env):
    async def reset(self, sample):
        return "hello"

    async def step(self, action_text):
        return StepResult(action_text.upper(), 1.0, action_text == "bye")


class HangingEnv(Env):
    env_name = "hanging"

    async def reset(self, sample):
        return "start"

    async def step(self, action_text):
        await asyncio.sleep(30)


class RaisingEnv(Env):
    env_name = "raising"

    async def reset(self, sample):
        return "start"

    async def step(self, action_text):
        raise ValueError("boom")


class BadResultEnv(Env):
    async def reset(self, sample):
        return 42

    async def step(self, action_text):
        return {"observation": "x"}


def test_register_and_make_by_name():
    envs.register("test_echo")(EchoEnv)
    env = envs.make("test_echo")
    assert isinstance(env, EchoEnv) and env.display_name == "test_echo"
    assert "test_echo" in envs.available() and "arithmetic" in envs.available()
    envs.register("test_echo")(EchoEnv)  # same object again is fine
    with pytest.raises(ValueError, match="already registered"):
        envs.register("test_echo")(RaisingEnv)


def test_make_by_import_path_and_kwargs():
    env = envs.make("envs.arithmetic:ArithmeticEnv", tolerance=0.5)
    assert isinstance(env, ArithmeticEnv) and env.tolerance == 0.5


@pytest.mark.parametrize("bad, match", [
    ("no_such_env", "unknown env 'no_such_env'; registered: .*arithmetic"),
    ("envs.arithmetic:Nope", "has no attribute 'Nope'"),
    ("no_such_module_xyz:Env", "cannot import module"),
    ("envs.arithmetic:ANSWER_PATTERN", "which is not callable"),
])
def test_make_errors_name_the_problem(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        envs.make(bad)


def test_make_by_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "kiln_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from envs import Env, StepResult
        class PluginEnv(Env):
            async def reset(self, sample):
                return "plugin"
            async def step(self, action_text):
                return StepResult("", 0.0, True)
    """))
    dist = tmp_path / "kiln_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kiln-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kiln.envs]\nplugin_env = kiln_plugin_pkg:PluginEnv\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_env" in envs.available()
    env = envs.make("plugin_env")
    assert type(env).__name__ == "PluginEnv" and env.display_name == "plugin_env"
    monkeypatch.delitem(sys.modules, "kiln_plugin_pkg", raising=False)


async def test_run_step_counts_steps_and_checks_results():
    env = EchoEnv()
    assert await run_reset(env, Sample(), timeout=1.0) == "hello"
    r1 = await run_step(env, "hi", timeout=1.0)
    assert (r1.observation, r1.reward, r1.done) == ("HI", 1.0, False)
    with pytest.raises(EnvError, match="failed at reset: reset returned int"):
        await run_reset(BadResultEnv(), Sample(), timeout=1.0)
    with pytest.raises(EnvError, match="step 1: step returned dict, expected StepResult"):
        await run_step(BadResultEnv(), "x", timeout=1.0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        await run_step(env, "x", timeout=0)


async def test_hanging_env_times_out_with_name_and_step():
    env = HangingEnv()
    await run_reset(env, Sample(), timeout=1.0)
    with pytest.raises(EnvError) as info:
        await run_step(env, "a", timeout=0.05)
    assert info.value.env_name == "hanging" and info.value.step == 1
    assert "no answer within 0.05s" in str(info.value)


async def test_raising_env_becomes_env_error_with_cause():
    env = RaisingEnv()
    await run_reset(env, Sample(), timeout=1.0)
    with pytest.raises(EnvError, match=r"env 'raising' failed at step 3: ValueError: boom") as info:
        await run_step(env, "a", timeout=1.0, step=3)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("text, expected", [
    ("Answer: 42", 42.0), ("so... Answer: -3.5", -3.5), ("Answer: 1,234", 1234.0),
    ("Answer: 1\nAnswer: 2", 2.0), ("the answer is 7", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


async def test_arithmetic_env_tool_turn_then_scored_answer():
    sample = arithmetic_samples(3, seed=1)[2]
    assert arithmetic_samples(3, seed=1)[2].prompt == sample.prompt  # deterministic
    expression = sample.prompt.removeprefix("What is ").removesuffix("?")
    env = envs.make("arithmetic")
    assert await env.reset(sample) == sample.prompt
    assert '"name": "calculator"' in env.system_prompt()
    r = await env.step(
        f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
    )
    assert not r.done and r.observation == f"<tool_response>\n{sample.label}\n</tool_response>"
    assert (await env.step(f"Answer: {sample.label}")).reward == 1.0
    wrong = await env.step(f"Answer: {float(sample.label) + 1}")
    assert wrong.done and wrong.reward == 0.0


async def test_arithmetic_env_rejects_unlabelled_sample():
    with pytest.raises(EnvError, match="has no label"):
        await run_reset(ArithmeticEnv(), Sample(prompt="What is 1+1?"), timeout=1.0)
