"""A user's mistake is one line on stderr (and a hint), exit code 2, before Ray starts; logs are clean text."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln_common.logs import (StripAnsi, eta, format_duration, pythonwarnings, quiet_third_party_warnings,
                              setup_logging, strip_ansi)
from rollout.data import check_source

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
       "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


@pytest.fixture
def model(tmp_path) -> Path:
    """A folder that passes as an HF model folder before anything loads it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return folder


def run(args: list[str], cwd: Path, module: str | None = None) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout + stderr) of train.py (or `python -m module`) with `args`."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "train.py")]
    done = subprocess.run(cmd + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr.splitlines(), done.stdout + done.stderr


def assert_one_line_error(code: int, lines: list[str], text: str, *expected: str, prefix: str = "train.py") -> None:
    assert code == 2, text
    errors = [line for line in lines if line.startswith(f"{prefix}: error: ")]
    assert len(errors) == 1, text
    for part in expected:
        assert part in errors[0], text
    assert "Traceback" not in text and "Started a local Ray instance" not in text


def test_nonexistent_hf_checkpoint(tmp_path):
    code, lines, text = run(["--hf-checkpoint", "/nonexistent/model", "--prompt-data", "x.jsonl"], tmp_path)
    assert_one_line_error(code, lines, text, "--hf-checkpoint '/nonexistent/model'", "it does not exist")
    assert len(lines) == 2 and lines[1].startswith("  hint: expected a local Hugging Face model folder")


def test_missing_config_file(tmp_path):
    code, lines, text = run(["--config", "nope.yaml"], tmp_path)
    assert_one_line_error(code, lines, text, "--config 'nope.yaml' does not exist")
    assert len(lines) == 2 and str(tmp_path) in lines[1]


def test_bad_yaml_config(tmp_path):
    (tmp_path / "run.yaml").write_text("num_rollout: [1\nlr: 2\n")
    code, lines, text = run(["--config", "run.yaml"], tmp_path)
    assert_one_line_error(code, lines, text, "--config 'run.yaml' is not valid YAML", "at line 2, column 3")
    assert len(lines) == 1


def test_no_arguments_prints_usage_and_one_line(tmp_path):
    code, lines, text = run([], tmp_path)
    assert_one_line_error(code, lines, text, "no arguments", "--hf-checkpoint", "--prompt-data")
    assert len(lines) == 2 and lines[0].startswith("usage: train.py --hf-checkpoint MODEL_FOLDER --prompt-data FILE")


def test_bad_flag_value_is_usage_and_one_line(tmp_path):
    code, lines, text = run(["--rollout-batch-size", "many"], tmp_path)
    assert_one_line_error(code, lines, text, "--rollout-batch-size", "expected an integer")
    assert len(lines) == 2   # not argparse's usage of every flag


def test_missing_prompt_data_fails_before_ray_starts(tmp_path, model):
    code, lines, text = run(["--hf-checkpoint", str(model), "--prompt-data", "data/train.jsonl"], tmp_path)
    assert_one_line_error(code, lines, text, "--prompt-data 'data/train.jsonl' does not exist")
    assert len(lines) == 2 and "Started a local Ray instance" not in text and "pid=" not in text


def test_missing_prompt_data_in_process_never_initialises_ray(tmp_path, model, capsys):
    import ray

    from orchestrator.driver import main

    with pytest.raises(SystemExit) as exit_:
        main(["--hf-checkpoint", str(model), "--prompt-data", str(tmp_path / "none.jsonl"), "--num-rollout", "1"])
    assert exit_.value.code == 2 and not ray.is_initialized()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"train.py: error: --prompt-data '{tmp_path / 'none.jsonl'}' does not exist"


def test_http_rollout_client_without_a_web_server_is_a_config_error(tmp_path, model, monkeypatch):
    """--rollout-client http (the default) on a Python without uvicorn: one clear ConfigError before Ray starts (on
    the GPU machine the engines used to die in their actors); --rollout-client ray needs neither."""
    import importlib.util

    from orchestrator.cli import ConfigError
    from orchestrator.driver import resolve

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "label": "x"}\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    flags = {"hf-checkpoint": str(model), "prompt-data": str(data)}
    with pytest.raises(ConfigError, match="--rollout-client http serves the engines over HTTP and needs uvicorn, "
                                          "not installed here: .* or pass --rollout-client ray"):
        resolve(flags)
    assert resolve({**flags, "rollout-client": "ray"}).run.rollout_client == "ray"


def test_debug_shows_the_traceback(tmp_path):
    code, _, text = run(["--hf-checkpoint", "/nonexistent/model", "--prompt-data", "x.jsonl", "--debug"], tmp_path)
    assert code == 1 and "Traceback" in text and "InputError" in text


def test_prompt_data_first_rows_are_checked(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("prompt,label\nWhat is 1 + 1?,2\n")   # a CSV named .jsonl
    with pytest.raises(ValueError, match=r"none of its first 2 rows is usable; line 1: malformed JSON"):
        check_source(path, "prompt")
    path.write_text("\n" + json.dumps({"question": "What is 1 + 1?"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: no key 'prompt' \(keys: \['question'\]\); set --input-key"):
        check_source(path, "prompt")
    path.write_text("{bad\n" + json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    check_source(path, "prompt")   # one malformed row is the loader's to skip, not a reason to stop
    with pytest.raises(ValueError, match=r"--eval-prompt-data .*unsupported format '.csv'"):
        check_source(path.rename(tmp_path / "rows.csv"), "prompt", "--eval-prompt-data")


def test_serve_with_a_nonexistent_model_folder(tmp_path):
    code, lines, text = run(["--model-path", "/nonexistent/model"], tmp_path, module="inference_engine.serve")
    assert_one_line_error(code, lines, text, "--model-path '/nonexistent/model' does not exist",
                          prefix="python -m inference_engine.serve")
    assert len(lines) == 1


def test_serve_bad_value_names_the_flag(tmp_path, model):
    from inference_engine.serve import _configs_or_exit

    with pytest.raises(SystemExit) as exit_:
        _configs_or_exit(["--model-path", str(model), "--mem-fraction-static", "2"])
    assert exit_.value.code == 2


def test_ansi_escapes_are_stripped_from_log_records():
    coloured = "\x1b[36m(TrainerWorker pid=123)\x1b[0m loss 0.5 \x1b[1;31mred\x1b[0m"
    assert strip_ansi(coloured) == "(TrainerWorker pid=123) loss 0.5 red"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (coloured,), None)
    assert StripAnsi().filter(record) and record.getMessage() == "got (TrainerWorker pid=123) loss 0.5 red"
    stream, root = io.StringIO(), logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    try:
        setup_logging(logging.INFO, "%(message)s", stream=stream)   # a file, not a terminal: escapes removed
        logging.getLogger("kiln.test").info("%s", coloured)
    finally:
        root.handlers = saved
    assert stream.getvalue() == "(TrainerWorker pid=123) loss 0.5 red\n"


def test_not_installed_warnings_are_hidden_here_and_in_new_processes():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]
    code = "import warnings; warnings.warn('Apex is not installed. Falling back'); warnings.warn('kept')"
    done = subprocess.run([sys.executable, "-c", code], env={**ENV, "PYTHONWARNINGS": pythonwarnings()},
                          capture_output=True, text=True, timeout=60)
    assert "Apex" not in done.stderr and "kept" in done.stderr


def test_eta_and_duration_formatting():
    assert [format_duration(s) for s in (0, 45.4, 185, 7620, 90000)] == ["0s", "45s", "3m05s", "2h07m", "1d01h"]
    assert eta([], 3) == "-" and eta([10.0, 20.0], 0) == "0s" and eta([10.0, 20.0], 3) == "45s"
    assert eta([100.0] + [2.0] * 10, 30) == "1m00s"   # the last 10 steps: a slow first step is forgotten


def test_step_line_has_throughput_and_eta(model, caplog):
    from orchestrator.driver import Driver, resolve

    driver = Driver(resolve({"hf-checkpoint": str(model), "prompt-data": "x.jsonl", "num-rollout": 5}))
    driver.history = [{"step": 1, "timing/step_s": 4.0}]
    batch = SimpleNamespace(samples=[SimpleNamespace(response_length=50)] * 8, failed=[])
    with caplog.at_level(logging.INFO, logger="kiln.driver"):
        driver._log_step(1, batch, {"timing/step_s": 2.0})
    assert "| 4.0 samples/s 200 tok/s | eta 9s" in caplog.text   # 3 steps left at (4 + 2) / 2 s


def _tiny_run_args(model: Path, tmp_path: Path) -> list[str]:
    """train.py flags of a 2-step CPU run whose rollouts take long enough to draw a bar (64 samples of 16 tokens)."""
    from examples.quickstart.make_data import write_dataset

    write_dataset(tmp_path / "data")
    return ["--hf-checkpoint", str(model), "--prompt-data", str(tmp_path / "data" / "train.jsonl"),
            "--apply-chat-template", "--rollout-batch-size", "8", "--n-samples-per-prompt", "8",
            "--rollout-max-response-len", "16", "--rollout-concurrency", "4", "--global-batch-size", "64",
            "--num-rollout", "2", "--ray-num-cpus", "2",
            "--custom-rm-path", "examples.quickstart.reward:arithmetic_reward",
            "--metrics-file", str(tmp_path / "metrics.jsonl"), "--progress",
            "--eval-prompt-data", str(tmp_path / "data" / "test.jsonl"), "--eval-interval", "2"]


def test_log_file_has_no_progress_bars_or_colour_codes(qwen3_model, tmp_path):
    """stdout and stderr into a file, --progress given: no bar (not even a fragment), no ANSI escape, step lines;
    slime's --skip-eval-before-train leaves out the step-0 evaluation (the terminal run below has it); prompt data
    that runs out before step 2 stops the run with one line, not Ray's traceback."""
    log = tmp_path / "train.log"
    args = _tiny_run_args(qwen3_model, tmp_path)
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines()[:8]   # one step's prompts
    (tmp_path / "data" / "eight.jsonl").write_text("\n".join(rows) + "\n")
    args += ["--skip-eval-before-train", "--prompt-data", str(tmp_path / "data" / "eight.jsonl")]
    with log.open("w") as out:
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *args],
                              cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text, text[-3000:]
    assert "%|" not in text and "sample/s]" not in text and "rollout 1:" not in text, text[-3000:]
    assert "INFO step 1/2 | reward" in text and "(RolloutManagerActor pid=" in text
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and "step 0 | eval" not in text
    assert "INFO stopping before step 2: the prompt data is exhausted after 1 epoch(s)\n" in text
    assert "Traceback" not in text and "ray::" not in text


def test_terminal_gets_the_rollout_bar_drawn_by_the_driver(qwen3_model, tmp_path):
    """On a terminal (a pty) the rollout manager actor's bar is drawn by the driver as one live bar, never as
    stale fragments behind the actor's log prefix (what a tqdm bar inside an actor turns into)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # a bar needs a width
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *_tiny_run_args(qwen3_model, tmp_path)],
                            cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:   # EIO: every writer of the pty is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    plain = strip_ansi(text)
    assert "INFO step 2/2 | reward" in plain and "step 0 | eval reward" in plain, plain[-3000:]
    assert "rollout 1: 100%|" in plain, plain[-3000:]   # the bar reached its end (a stale fragment does not)
    # every drawing of the bar is tqdm_ray's, by the driver ("(pid=N) rollout k: ..."), none a bare tqdm redraw
    assert len(re.findall(r"rollout \d:", plain)) == len(re.findall(r"\(pid=\d+\) rollout \d:", plain)) > 2


def test_progress_bar_kinds():
    from tqdm import tqdm

    from kiln_common.logs import in_ray_actor, progress_bar

    off = progress_bar(0, "rollout 1", "sample", enabled=False)
    off.total += 4
    off.update(4)
    off.close()
    assert off.disable and not in_ray_actor()   # outside Ray: tqdm itself, gone when closed
    bar = progress_bar(2, "rollout 1", "sample", enabled=True)
    assert isinstance(bar, tqdm) and not bar.disable and bar.leave is False
    bar.close()


def test_yaml_typo_suggests_underscore_keys(tmp_path, model):
    """A mistyped YAML key: one line naming it, suggestions spelled as YAML keys (underscores), slime's names too."""
    (tmp_path / "run.yaml").write_text(f"hf_checkpoint: {model}\nprompt_data: x.jsonl\nrollout_batch_sise: 8\n")
    code, lines, text = run(["--config", "run.yaml"], tmp_path)
    assert_one_line_error(code, lines, text, "config file run.yaml: unknown key 'rollout_batch_sise'; "
                                             "did you mean rollout_batch_size")
    assert len(lines) == 1 and "rollout-batch-size" not in text
    (tmp_path / "run.yaml").write_text(f"hf-checkpoint: {model}\nprompt-data: x.jsonl\nkl-los-coef: 0.1\n")
    code, lines, text = run(["--config", "run.yaml"], tmp_path)
    assert_one_line_error(code, lines, text, "unknown key 'kl-los-coef'; did you mean kl_loss_coef")


def test_step_line_names_each_eval_set(model, caplog):
    from orchestrator.driver import Driver, resolve

    driver = Driver(resolve({"hf-checkpoint": str(model), "prompt-data": "x.jsonl", "num-rollout": 5}))
    batch = SimpleNamespace(samples=[SimpleNamespace(response_length=50)] * 8, failed=[])
    with caplog.at_level(logging.INFO, logger="kiln.driver"):
        driver._log_step(1, batch, {"timing/step_s": 2.0, "eval/a/reward_mean": 0.25, "eval/b/reward_mean": 0.5})
        driver._log_step(2, batch, {"timing/step_s": 2.0, "eval/reward_mean": 0.75})
        driver._log_step(3, batch, {"timing/step_s": 2.0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert "| eval a 0.250 b 0.500 |" in lines[0] and "| eval 0.750 |" in lines[1] and "| eval - |" in lines[2]
