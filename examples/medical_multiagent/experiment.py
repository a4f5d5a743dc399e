"""The three-arm experiment: what RL and co-training buy the doctor, on held-out cases.

    nice -n 10 python -m examples.medical_multiagent.experiment runs/medical/cpu --seeds 0 1 2 --steps 40 --n-eval 50

1. Warm start (`warm_start.py`, skipped when OUT/warm holds it): data, tokenizer, SFT doctor and patient.
2. For each seed, three `train.py` runs (its driver, in this process, on one local Ray) with the same settings,
   seed and step budget (`--config`, default config_cpu_rl.yaml):
   (a) fixed   -- the doctor trained against the SFT patient, which plays but is not trained
                  (`--frozen-policies patient`: served, no trainer; `generate_dialogue_fixed_patient`);
   (b) cotrain -- doctor and patient trained together (`--policies doctor=... patient=...`, `generate_dialogue`);
   (c) rule    -- the doctor trained against the rule-based patient (`generate_doctor`).
3. Evaluation on the held-out cases (OUT/warm/data/test.jsonl, the hash split), greedy: every doctor (and the
   SFT doctor before RL) with the rule-based patient, and the doctors of (a) and (b) and the SFT doctor with
   their LLM patient (which gives the patient's faithfulness, leak rate and answer relevance).
4. OUT/results.json, OUT/table.md (means +- standard deviation over seeds; the per-seed difference
   cotrain - fixed) and OUT/curves.png (matplotlib; skipped with a note when it is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envs.generate import EnvConfig
from examples.medical_multiagent.dialogue import DOCTOR, PATIENT
from examples.medical_multiagent.eval import (EvalReport, curves, engine_options, eval_args, load_samples, report,
                                              run_cases)

REPO = Path(__file__).resolve().parents[2]
ARMS = {
    "fixed": "examples.medical_multiagent.generate:generate_dialogue_fixed_patient",
    "cotrain": "examples.medical_multiagent.generate:generate_dialogue",
    "rule": "examples.medical_multiagent.generate:generate_doctor",
}
ARM_TITLES = {"sft": "SFT doctor (before RL)", "fixed": "(a) vs fixed SFT patient",
              "cotrain": "(b) co-trained with patient", "rule": "(c) vs rule-based patient"}


def arm_flags(arm: str, warm: Path, run_dir: Path, seed: int, steps: int, config: Path,
              save_interval: int = 0, train_flags: Sequence[str] = ()) -> list[str]:
    """train.py arguments of one arm and seed. save_interval > 0: a checkpoint every that many steps in
    run_dir/checkpoints, and the run resumes from the newest one there (an arm cut off, e.g. by a device call's time
    limit, goes on from its last checkpoint when run again instead of from step 0). train_flags come last (over the
    config's values), the same for every arm."""
    policies = [f"doctor={warm / 'sft-doctor'}"]
    if arm != "rule":
        policies.append(f"patient={warm / 'sft-patient'}")
    extra = ["--frozen-policies", "patient"] if arm == "fixed" else []   # served, never trained: no trainer
    if save_interval > 0:
        ckpt = str(run_dir / "checkpoints")
        extra += ["--save", ckpt, "--save-interval", str(save_interval), "--load", ckpt]
    return ["--config", str(config), "--policies", *policies, *extra, "--custom-generate-function-path", ARMS[arm],
            "--prompt-data", str(warm / "data" / "train.jsonl"), "--num-rollout", str(steps),
            "--seed", str(seed), "--rollout-seed", str(seed), "--sampling-seed", str(1000 * seed),
            "--metrics-file", str(run_dir / "metrics.jsonl"), "--save-hf", str(run_dir / "hf"), *train_flags]


def start_ray(num_cpus: int | None) -> None:
    """One local Ray for all the arms (each train.py run joins it instead of starting its own)."""
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(3):  # on a loaded machine a local Ray node can time out while it starts
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - retried, then raised
            print(f"local Ray did not start ({type(e).__name__}: {str(e)[:120]}); attempt {attempt + 1} of 3",
                  flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)


def train_arm(arm: str, warm: Path, run_dir: Path, seed: int, steps: int, config: Path,
              save_interval: int = 0, train_flags: Sequence[str] = ()) -> float:
    """Run train.py's driver in this process for one arm (its log lines also in run_dir/train.log); its wall
    seconds. Skipped when its export exists; resumed from its newest checkpoint when save_interval > 0."""
    import logging

    from kiln_common.logs import setup_logging
    from orchestrator.driver import main as train_main

    if (run_dir / "hf" / DOCTOR / "config.json").is_file():
        print(f"[{arm} seed {seed}] already trained: {run_dir / 'hf'}", flush=True)
        return 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()  # the console handler first (setup_logging adds none once the root logger has one)
    logging.getLogger().setLevel(logging.INFO)
    handler = logging.FileHandler(run_dir / "train.log", mode="a" if save_interval > 0 else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    start = time.perf_counter()
    try:
        train_main(arm_flags(arm, warm, run_dir, seed, steps, config, save_interval, train_flags))
    except SystemExit as e:
        raise RuntimeError(f"train.py for arm {arm} seed {seed} exited {e.code}; see {run_dir / 'train.log'}") from None
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    seconds = time.perf_counter() - start
    print(f"[{arm} seed {seed}] trained in {seconds:.0f}s", flush=True)
    return seconds


def evaluate(doctor: Path, patient: Path | None, data: Path, n_cases: int, *, max_turns: int,
             max_new_tokens: int, max_total_tokens: int, device: str = "cpu", brief: bool = True) -> EvalReport:
    """Greedy consultations of `doctor` with `patient` (None: the rule-based patient) on the held-out cases."""
    from transformers import AutoTokenizer

    from inference_engine import Engine
    from rollout.client import LocalEngineClient

    samples = load_samples(str(data), n_cases, seed=0)
    concurrency = 32  # consultations in flight; each engine is sized for them, not from the free memory (two share it)
    with contextlib.ExitStack() as stack:
        clients = {role: LocalEngineClient(stack.enter_context(Engine(
            str(model), device=device, **engine_options(model, concurrency, max_total_tokens))), name=role)
            for role, model in ((DOCTOR, doctor), (PATIENT, patient)) if model is not None}
        args = eval_args(clients, AutoTokenizer.from_pretrained(str(doctor)),
                         EnvConfig(env_max_turns=max_turns, env_max_total_tokens=max_total_tokens,
                                   env_kwargs={"brief_prompts": brief}))
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        episodes = asyncio.run(run_cases(args, samples, llm_patient=patient is not None, sampling_params=params,
                                         concurrency=concurrency))
    return report(episodes, "rule" if patient is None else str(patient))


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


DOCTOR_COLUMNS = [("accuracy", "accuracy (any name)"), ("accuracy_exact", "top-1 exact name"),
                  ("format_rate", "format"), ("avg_doctor_turns", "turns"),
                  ("key_question_rate", "key-symptom qs"), ("key_symptoms_asked", "key symptoms / case"),
                  ("tests_ordered", "tests"), ("specific_test_rate", "specific test")]
PATIENT_COLUMNS = [("accuracy", "doctor accuracy"), ("patient_faithfulness", "patient faithful"),
                   ("patient_leak_rate", "leak rate"), ("patient_answered", "answer relevance"),
                   ("patient_complaint", "states complaint"),
                   ("positive_rate", "yes to symptom qs")]


def tables(results: dict[str, Any]) -> str:
    """The markdown tables of results.json: doctors with the rule-based patient, doctors with their LLM patient,
    and the co-training difference."""
    evals = results["evals"]

    def rows(setting: str, arms: Sequence[str], columns: list[tuple[str, str]]) -> list[str]:
        head = "| arm | seeds | " + " | ".join(title for _, title in columns) + " |"
        out = [head, "|" + " --- |" * (len(columns) + 2)]
        for arm in arms:
            runs = [r for r in evals if r["arm"] == arm and r["setting"] == setting]
            if runs:
                cells = [_mean_sd([r["report"][key] for r in runs if key in r["report"]]) for key, _ in columns]
                out.append(f"| {ARM_TITLES[arm]} | {len(runs)} | " + " | ".join(cells) + " |")
        return out

    warm = results.get("warm_start", {})
    origin = (f"Warm start: SFT doctor sha256 {warm['doctor_sha256'][:16]}, patient {warm['patient_sha256'][:16]} "
              f"({warm.get('device', '?')}); arms that share these trained from the same models.\n"
              if "doctor_sha256" in warm else "")
    lines = [f"{origin}Held-out cases: {results['n_cases']} (hash split), greedy; seeds {results['seeds']}; "
             f"{results['steps']} RL steps per arm.", "",
             "Doctor with the rule-based patient (the same yardstick for every arm):", "",
             *rows("rule", ["sft", "fixed", "cotrain", "rule"], DOCTOR_COLUMNS), "",
             "Doctor with its LLM patient (SFT doctor + SFT patient; (a) + the SFT patient; (b) + its co-trained "
             "patient):", "", *rows("llm", ["sft", "fixed", "cotrain"], PATIENT_COLUMNS), "",
             "The patients questioned by the SFT doctor (SFT patient; (b)'s co-trained patient):", "",
             *rows("llm", ["sft"], PATIENT_COLUMNS)[:3], *rows("sft_doctor", ["cotrain"], PATIENT_COLUMNS)[2:], ""]
    diffs = {}
    for setting in ("rule", "llm"):
        by_seed = {(r["arm"], r["seed"]): r["report"]["accuracy"] for r in evals if r["setting"] == setting}
        diffs[setting] = [by_seed[("cotrain", s)] - by_seed[("fixed", s)] for s in results["seeds"]
                          if ("cotrain", s) in by_seed and ("fixed", s) in by_seed]
    sft = {r["setting"]: r["report"]["accuracy"] for r in evals if r["arm"] == "sft"}
    gains = [r["report"]["accuracy"] - sft["rule"] for r in evals
             if r["arm"] == "cotrain" and r["setting"] == "rule" and "rule" in sft]
    lines += [f"Co-trained doctor - SFT doctor (accuracy, rule-based patient): {_mean_sd(gains)} over "
              f"{len(gains)} seeds", f"Co-trained - fixed-patient doctor (accuracy, rule-based patient): "
              f"{_mean_sd(diffs['rule'])}; per seed {[round(d, 3) for d in diffs['rule']]}",
              f"Co-trained - fixed-patient doctor (accuracy, each with its own patient): {_mean_sd(diffs['llm'])}; "
              f"per seed {[round(d, 3) for d in diffs['llm']]}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out_png: Path) -> bool:
    """Curves (doctor reward, patient reward, doctor loss per step; mean over seeds) and held-out accuracy bars.
    False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("doctor/reward", "doctor reward (rollout)"), ("patient/reward", "patient reward (rollout)"),
              ("doctor/loss", "doctor loss")]
    for ax, (key, title) in zip(axes, panels):
        for arm in ("fixed", "cotrain", "rule"):
            series = [dict(c[key]) for r, c in results["curves"].items() if r.startswith(arm + "-") and key in c]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            ax.plot(steps, [sum(s[t] for s in series) / len(series) for t in steps], label=ARM_TITLES[arm])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # e.g. the patient's reward when no co-trained arm is in the results
            ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax = axes[3]
    arms = ["sft", "fixed", "cotrain", "rule"]
    for k, setting in enumerate(("rule", "llm")):
        means, sds, xs = [], [], []
        for i, arm in enumerate(arms):
            values = [r["report"]["accuracy"] for r in results["evals"] if r["arm"] == arm and r["setting"] == setting]
            if values:
                xs.append(i + 0.4 * k - 0.2)
                means.append(sum(values) / len(values))
                sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(xs, means, width=0.4, yerr=sds, capsize=3,
               label="with rule-based patient" if setting == "rule" else "with its LLM patient")
    ax.set_xticks(range(len(arms)), ["SFT", "(a) fixed", "(b) co-trained", "(c) rule"])
    ax.set_ylim(0, 1)
    ax.set_title("held-out diagnosis accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for everything (e.g. runs/medical/cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (each arm runs each)")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per arm")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which arms to train")
    parser.add_argument("--config", default=str(Path(__file__).with_name("config_cpu_rl.yaml")),
                        help="train.py config shared by the arms")
    parser.add_argument("--n-eval", type=int, default=50, help="held-out cases per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per turn in evaluation")
    parser.add_argument("--max-turns", type=int, default=6, help="doctor turns per consultation in evaluation")
    parser.add_argument("--warm-args", default="", help="extra warm_start arguments, e.g. '--steps 600'")
    parser.add_argument("--device", default="cpu", help="device of the evaluation engines (cpu, cuda)")
    parser.add_argument("--save-interval", type=int, default=0,
                        help="checkpoint every N RL steps in <arm run>/checkpoints and resume an arm cut off from its "
                             "newest one when run again (0: no checkpoints; an arm cut off starts over)")
    parser.add_argument("--train-flags", default="",
                        help="extra train.py flags for every arm, over the config's values (e.g. "
                             "'--attention-backend torch'); recorded in results.json")
    parser.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--eval-only", action="store_true",
                        help="train nothing: evaluate the runs already trained (e.g. by other runs of this script "
                             "into the same folder) and write the table")
    parser.add_argument("--saved-only", action="store_true",
                        help="train and evaluate nothing, need no model: the table and curves from the evaluations "
                             "and metrics already written under OUT (e.g. a device call's runs.tar.gz unpacked); an "
                             "arm without a saved evaluation is left out")
    ns = parser.parse_args(argv)
    if ns.steps < 1 or ns.n_eval < 1 or ns.save_interval < 0:
        parser.error("--steps and --n-eval must be >= 1, --save-interval >= 0")
    config = Path(ns.config)
    if not config.is_file():
        parser.error(f"--config {ns.config}: no such file")
    out = Path(ns.out_dir)
    warm = out / "warm"
    timing: dict[str, float] = {}
    start = time.perf_counter()
    if ns.saved_only:
        ns.eval_only = True
        if not (warm / "warm_start.json").is_file():
            parser.error(f"--saved-only: {warm / 'warm_start.json'} not found (not a run's folder?)")
    if not (warm / "warm_start.json").is_file():  # written last
        from examples.medical_multiagent.warm_start import main as warm_main

        warm_main([str(warm), *ns.warm_args.split()])
    timing["warm_start_s"] = time.perf_counter() - start
    data = warm / "data" / "test.jsonl"
    warm_stats = json.loads((warm / "warm_start.json").read_text())
    brief = warm_stats.get("brief_prompts", True)
    ev = {"max_turns": ns.max_turns, "max_new_tokens": ns.max_new_tokens, "max_total_tokens": 1024,
          "device": ns.device, "brief": brief}
    warm_record = {k: warm_stats[k] for k in ("doctor_sha256", "patient_sha256", "device", "deterministic")
                   if k in warm_stats}
    results: dict[str, Any] = {"seeds": ns.seeds, "steps": ns.steps, "n_cases": ns.n_eval, "evals": [],
                               "curves": {}, "timing": timing, "warm_start": warm_record,
                               "config": str(config), "train_flags": ns.train_flags}
    results_file = out / "results.json"

    def other_warm_start(saved: dict[str, Any]) -> str | None:
        """The SFT doctor's sha256 a saved evaluation was made from, if it is not this run's warm start's."""
        origin = saved.get("warm_start", {}).get("doctor_sha256")
        return origin if origin and origin != results["warm_start"].get("doctor_sha256", origin) else None

    def record(arm: str, seed: int | None, setting: str, doctor: Path, patient: Path | None) -> None:
        """Evaluate once: the report is kept in <run>/eval_<setting>.json (the SFT doctor's in warm/), so runs of
        this script for other seeds into the same OUT (in parallel too) and reruns share the evaluations."""
        where = (warm if arm == "sft" else out / f"{arm}-s{seed}") / f"eval_{setting}.json"
        fresh = not where.is_file() or json.loads(where.read_text()).get("n_cases") != ns.n_eval
        if fresh and ns.saved_only:
            print(f"[eval {arm} seed {seed} with {setting} patient] no saved evaluation of {ns.n_eval} cases: "
                  "left out", flush=True)
            return
        if fresh:
            t = time.perf_counter()
            rep = evaluate(doctor, patient, data, ns.n_eval, **ev)
            seconds = time.perf_counter() - t
            where.write_text(json.dumps({"n_cases": ns.n_eval, "report": rep.row(), "seconds": seconds,
                                         "warm_start": results["warm_start"]}))
            print(f"[eval {arm} seed {seed} with {setting} patient] accuracy {rep.accuracy:.3f} format "
                  f"{rep.format_rate:.3f} turns {rep.avg_doctor_turns:.2f} faithful {rep.patient_faithfulness:.3f} "
                  f"leak {rep.patient_leak_rate:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)
        saved = json.loads(where.read_text())
        origin = other_warm_start(saved)
        if origin:
            # e.g. runs of two sessions unpacked into one folder, whose warm starts differ: not the same experiment
            print(f"[eval {arm} seed {seed} with {setting} patient] trained from another warm start (SFT doctor "
                  f"{origin[:16]}): left out", flush=True)
            return
        timing[f"eval_{arm}_{seed}_{setting}_s"] = saved["seconds"]
        results["evals"].append({"arm": arm, "seed": seed, "setting": setting, "report": saved["report"]})

    if not ns.eval_only:
        start_ray(ns.ray_num_cpus)
    record("sft", None, "rule", warm / "sft-doctor", None)
    record("sft", None, "llm", warm / "sft-doctor", warm / "sft-patient")
    for seed in ns.seeds:
        for arm in ns.arms:
            run_dir = out / f"{arm}-s{seed}"
            trained = (run_dir / "hf" / DOCTOR / "config.json").is_file()
            if ns.saved_only:  # an arm counts once its evaluation is saved (a cut-off arm's curve is left out too)
                if not (run_dir / "eval_rule.json").is_file():
                    print(f"[{arm} seed {seed}] no saved evaluation: left out", flush=True)
                    continue
                if other_warm_start(json.loads((run_dir / "eval_rule.json").read_text())):
                    print(f"[{arm} seed {seed}] trained from another warm start: left out", flush=True)
                    continue
            elif ns.eval_only and not trained:
                print(f"[{arm} seed {seed}] not trained: left out", flush=True)
                continue
            else:
                timing[f"train_{arm}_{seed}_s"] = train_arm(arm, warm, run_dir, seed, ns.steps, config,
                                                            ns.save_interval, ns.train_flags.split())
            results["curves"][f"{arm}-s{seed}"] = curves(run_dir / "metrics.jsonl")
            results_file.write_text(json.dumps(results, indent=1))
            record(arm, seed, "rule", run_dir / "hf" / DOCTOR, None)
            if arm != "rule":
                patient = run_dir / "hf" / PATIENT if arm == "cotrain" else warm / "sft-patient"
                record(arm, seed, "llm", run_dir / "hf" / DOCTOR, patient)
            if arm == "cotrain":  # the co-trained patient questioned by the SFT doctor (which asks questions)
                record(arm, seed, "sft_doctor", warm / "sft-doctor", run_dir / "hf" / PATIENT)
    timing["total_s"] = time.perf_counter() - start
    results_file.write_text(json.dumps(results, indent=1))
    table = tables(results)
    (out / "table.md").write_text(table)
    print(table)
    if plot(results, out / "curves.png"):
        print(f"plot: {out / 'curves.png'}")
    else:
        print("matplotlib is not installed: no plot")
    print(f"experiment: {timing['total_s']:.0f}s in all")
    return results


if __name__ == "__main__":
    main()
