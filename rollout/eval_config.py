"""Evaluation sets (`--eval-config`, as slime's): a YAML file listing the data sets evaluated every --eval-interval.

```yaml
eval:                    # (or the list itself at the top level)
  - name: gsm8k          # metrics are logged as eval/gsm8k/reward_mean, ...
    path: data/gsm8k_test.jsonl
    n_samples_per_prompt: 4
    temperature: 0.6
    top_p: 0.95
    max_response_len: 1024
    custom_rm_path: my_rewards:gsm8k   # optional; default: the run's reward (--custom-rm-path / --rm-type)
    input_key: question                # optional; default: --input-key / --label-key
    label_key: answer
```

Every key but `name` and `path` is optional and defaults to the run's evaluation settings
(--n-samples-per-eval-prompt, --eval-temperature, top_p 1, top_k -1, --eval-max-response-len, the run's
reward and row keys). `--eval-prompt-data` is the set named 'default', whose metrics keep their plain
names (eval/reward_mean, ...). Unknown keys and bad values are errors, found when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rollout.config import RM_TYPES, DataConfig, RolloutConfig

DEFAULT_EVAL_SET = "default"   # the set of --eval-prompt-data; its metrics are eval/<metric>
_NAME = re.compile(r"[A-Za-z_][\w.-]*")


class EvalConfigError(ValueError):
    """A bad --eval-config file; the message is one line naming the file, the set and the key."""


@dataclass
class EvalSet:
    """One evaluation data set and how it is sampled and scored; None = the run's evaluation setting."""

    name: str
    path: str
    n_samples_per_prompt: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_response_len: int | None = None
    stop: list[str] | None = None
    custom_rm_path: str | None = None
    rm_type: str | None = None
    group_rm: bool | None = None
    input_key: str | None = None
    label_key: str | None = None
    metadata_key: str | None = None

    def metric_prefix(self) -> str:
        """'eval' for the default set (back-compatible keys), else 'eval/<name>'."""
        return "eval" if self.name == DEFAULT_EVAL_SET else f"eval/{self.name}"

    def rollout_config(self, base: RolloutConfig) -> RolloutConfig:
        """The run's rollout config with this set's reward and evaluation sampling (validated again)."""
        changes: dict[str, Any] = {}
        if self.custom_rm_path is not None:
            changes["custom_rm_path"] = self.custom_rm_path
        if self.rm_type is not None:
            changes["rm_type"] = self.rm_type
            if self.custom_rm_path is None:
                changes["custom_rm_path"] = None
        if self.group_rm is not None:
            changes["group_rm"] = self.group_rm
        if self.n_samples_per_prompt is not None:
            changes["n_samples_per_eval_prompt"] = self.n_samples_per_prompt
        if self.temperature is not None:
            changes["eval_temperature"] = self.temperature
        if self.max_response_len is not None:
            changes["eval_max_response_len"] = self.max_response_len
        return dataclasses.replace(base, **changes) if changes else base

    def sampling_params(self, config: RolloutConfig) -> dict[str, Any]:
        """Sampling params of this set's requests (`config`: `rollout_config`'s result)."""
        params = config.sampling_params(evaluation=True)
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.top_k is not None:
            params["top_k"] = self.top_k
        if self.stop is not None:
            params["stop"] = list(self.stop)
        return params

    def data_config(self, base: DataConfig) -> DataConfig:
        """The run's data config with this set's row keys."""
        changes = {k: getattr(self, k) for k in ("input_key", "label_key", "metadata_key")
                   if getattr(self, k) is not None}
        return dataclasses.replace(base, **changes) if changes else base


_FIELDS = {f.name: f for f in dataclasses.fields(EvalSet)}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "path": (str,), "n_samples_per_prompt": (int,), "temperature": (int, float),
    "top_p": (int, float), "top_k": (int,), "max_response_len": (int,), "stop": (list,), "custom_rm_path": (str,),
    "rm_type": (str,), "group_rm": (bool,), "input_key": (str,), "label_key": (str,), "metadata_key": (str,),
}


def _check_set(where: str, raw: Any, base_dir: Path) -> EvalSet:
    if not isinstance(raw, dict):
        raise EvalConfigError(f"{where}: expected a mapping with at least 'name' and 'path', got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            import difflib
            close = difflib.get_close_matches(name, list(_FIELDS), n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; the keys are {', '.join(_FIELDS)}"
            raise EvalConfigError(f"{where}: unknown key {key!r}{hint}")
        types = _TYPES[name]
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            expected = " or ".join(t.__name__ for t in types)
            raise EvalConfigError(f"{where}: key {key!r} = {value!r}: expected {expected}")
        values[name] = value
    for required in ("name", "path"):
        if not values.get(required):
            raise EvalConfigError(f"{where}: missing key {required!r}")
    where = f"{where} ({values['name']!r})"
    if not _NAME.fullmatch(values["name"]):
        raise EvalConfigError(f"{where}: key 'name' = {values['name']!r}: expected a word (letters, digits, _ . -)")
    for key in ("n_samples_per_prompt", "max_response_len"):
        if values.get(key) is not None and values[key] < 1:
            raise EvalConfigError(f"{where}: key {key!r} = {values[key]!r}: expected an integer >= 1")
    if values.get("temperature") is not None and values["temperature"] < 0:
        raise EvalConfigError(f"{where}: key 'temperature' = {values['temperature']!r}: expected >= 0")
    if values.get("top_p") is not None and not 0 < values["top_p"] <= 1:
        raise EvalConfigError(f"{where}: key 'top_p' = {values['top_p']!r}: expected a value in (0, 1]")
    if values.get("top_k") is not None and values["top_k"] != -1 and values["top_k"] < 1:
        raise EvalConfigError(f"{where}: key 'top_k' = {values['top_k']!r}: expected -1 (off) or >= 1")
    if values.get("rm_type") is not None and values["rm_type"] not in RM_TYPES:
        raise EvalConfigError(f"{where}: key 'rm_type' = {values['rm_type']!r}: expected one of {', '.join(RM_TYPES)}")
    if values.get("stop") is not None and not all(isinstance(s, str) for s in values["stop"]):
        raise EvalConfigError(f"{where}: key 'stop' = {values['stop']!r}: expected a list of strings")
    path = Path(values["path"]).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise EvalConfigError(f"{where}: key 'path' = {values['path']!r}: {str(path)!r} does not exist")
    values["path"] = str(path)
    return EvalSet(**values)


def load_eval_config(path: str | Path, rollout: RolloutConfig | None = None,
                     data: DataConfig | None = None) -> list[EvalSet]:
    """The eval sets of an --eval-config YAML file (relative paths are of the file's folder); EvalConfigError with
    one line naming the file, the set and the key for any mistake. With `rollout` / `data`, each set's reward and
    row keys are also checked against the run's configs (e.g. rm_type 'format' needs --format-reward-pattern)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalConfigError(f"--eval-config {path}: cannot read it: {first}") from e
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"eval"})
        if unknown:
            raise EvalConfigError(f"--eval-config {path}: unknown key {unknown[0]!r}; expected 'eval' (a list of sets)")
        raw = raw.get("eval")
    if not isinstance(raw, list) or not raw:
        raise EvalConfigError(f"--eval-config {path}: expected a non-empty list of eval sets (or 'eval: [...]')")
    sets: list[EvalSet] = []
    for i, item in enumerate(raw):
        where = f"--eval-config {path}: eval set {i}"
        s = _check_set(where, item, path.parent)
        if any(other.name == s.name for other in sets):
            raise EvalConfigError(f"{where}: name {s.name!r} is used twice")
        if rollout is not None:
            try:
                s.rollout_config(rollout)
            except ValueError as e:
                raise EvalConfigError(f"{where} ({s.name!r}): {e}") from None
        if data is not None:
            try:
                s.data_config(data)
            except ValueError as e:
                raise EvalConfigError(f"{where} ({s.name!r}): {e}") from None
        sets.append(s)
    return sets


def eval_sets(data: DataConfig, rollout: RolloutConfig | None = None) -> list[EvalSet]:
    """Every eval set of a run: --eval-prompt-data as 'default' (the run's settings), then --eval-config's."""
    sets = [EvalSet(DEFAULT_EVAL_SET, data.eval_prompt_data)] if data.eval_prompt_data else []
    if data.eval_config:
        more = load_eval_config(data.eval_config, rollout, data)
        if sets and any(s.name == DEFAULT_EVAL_SET for s in more):
            raise EvalConfigError(f"--eval-config {data.eval_config}: the set name {DEFAULT_EVAL_SET!r} is "
                                  f"--eval-prompt-data's; rename the set or drop --eval-prompt-data")
        sets += more
    return sets
