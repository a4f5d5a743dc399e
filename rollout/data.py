"""Prompt data: rows from a file, a saved dataset or a list become prompt Samples, epoch by epoch.

Formats: .jsonl (rows split at '\n' only, '\r\n' tolerated: U+2028, U+0085 and the like are text
inside a row; one malformed line is one bad row) and .json,
.parquet and folders written by `datasets.save_to_disk` (through `datasets`), a
`datasets.Dataset`, or a list of dicts. Every row is checked when the data is loaded: a bad one
(missing key, wrong type, empty prompt, malformed JSON, chat template error) is logged with its
place (the 1-based line of a .jsonl file, else the row's 0-based index), and a prompt longer than
the prompt limit is counted in one warning; both are recorded in `skipped` (by row index) and never
served. `check_source` reads only a file's first rows: the driver's check before anything starts.
The prompt limit is --rollout-max-prompt-len, capped by the engines'
limit (their context length minus the response budget) when the caller passes it; without either,
one token less than the model's context length (max_position_embeddings in the config.json next to
the tokenizer), since the engine refuses a prompt that fills its context. The position (epoch,
cursor) is resumable.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

from rollout.config import DataConfig
from kiln_common.sample import Sample

logger = logging.getLogger(__name__)


class BadRow(ValueError):
    """A data row that cannot become a prompt."""


class _TooLong(BadRow):
    """A prompt over the prompt limit."""


class JsonlRows(list):
    """The rows of a .jsonl file, with the 1-based line number of each in `lines`."""

    def __init__(self, rows: list[Any], lines: list[int]) -> None:
        super().__init__(rows)
        self.lines = lines


class _Malformed:
    """Placeholder for a line that is not JSON (reported when the rows are checked)."""

    def __init__(self, error: str) -> None:
        self.error = error


def load_rows(source: str | Path | Sequence[dict] | Any) -> Sequence[Any]:
    """The rows of a data source, indexable; see the module docstring for the formats."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"prompt data {str(path)!r} does not exist")
        if path.is_dir():
            import datasets
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ValueError(f"dataset folder {path} has splits {list(ds)}; point at one split's folder")
                ds = ds["train"]
            return ds
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]}
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects (or JSON lines in a .jsonl file)")
            return data
        if suffix == ".parquet":
            import datasets
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise ValueError(f"prompt data {str(path)!r}: unsupported format {suffix!r}; "
                         f"expected .jsonl, .json, .parquet or a dataset folder")
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return source
    raise TypeError(f"prompt data must be a path, a list of dicts or a datasets.Dataset, got {type(source).__name__}")


def read_jsonl(path: str | Path) -> JsonlRows:
    """The rows of a JSON-lines file: split at '\n' only (a trailing '\r' dropped), blank lines left out."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            rows.append(_parse_line(line))
            lines.append(number)
    return JsonlRows(rows, lines)


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line, strict=False)  # a raw control character inside a string is still that string's
    except json.JSONDecodeError as e:
        return _Malformed(f"malformed JSON ({e.msg} at column {e.colno})")


def check_source(path: str | Path, input_key: str, flag: str = "--prompt-data", rows: int = 5) -> None:
    """Raise ValueError (one line) unless `path` exists in a supported format and one of its first `rows` rows is
    an object with `input_key`; reads no more than those rows (a dataset folder: its metadata only)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {str(path)!r} does not exist")
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise ValueError(f"{flag} {str(path)!r} is a folder but not a dataset saved by datasets.save_to_disk "
                             f"(no dataset_info.json or dataset_dict.json)")
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            names = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - whatever the reader says, the file is not usable parquet
            raise ValueError(f"{flag} {str(path)!r} is not a readable parquet file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from e
        if input_key not in names:
            raise ValueError(f"{flag} {str(path)!r} has no column {input_key!r} (columns: {names}); "
                             f"set --input-key to the prompt column")
        return
    if suffix == ".jsonl":
        first: list[tuple[str, Any]] = []
        with path.open(encoding="utf-8-sig", newline="\n") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\n").removesuffix("\r")
                if line.strip():
                    first.append((f"line {number}", _parse_line(line)))
                if len(first) >= rows:
                    break
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {str(path)!r} is not valid JSON ({e}); a file of one JSON object per line "
                             f"needs the .jsonl suffix") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise ValueError(f"{flag} {str(path)!r}: expected a JSON list of objects (or JSON lines in a .jsonl file)")
        first = [(f"item {i}", row) for i, row in enumerate(data[:rows])]
    else:
        raise ValueError(f"{flag} {str(path)!r}: unsupported format {suffix or '(no suffix)'!r}; "
                         f"expected .jsonl, .json, .parquet or a dataset folder")
    if not first:
        raise ValueError(f"{flag} {str(path)!r} has no rows")
    if any(isinstance(row, dict) and row.get(input_key) is not None for _, row in first):
        return
    where, row = first[0]
    if isinstance(row, _Malformed):
        why = row.error
    elif not isinstance(row, dict):
        why = f"expected a JSON object, got {type(row).__name__}"
    else:
        why = f"no key {input_key!r} (keys: {sorted(row)}); set --input-key to the prompt's key"
    raise ValueError(f"{flag} {str(path)!r}: none of its first {len(first)} rows is usable; {where}: {why}")


def model_prompt_limit(tokenizer: Any) -> int | None:
    """One less than max_position_embeddings of the config.json beside the tokenizer (its model's); None if unknown."""
    config = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    text_config = cfg.get("text_config")
    positions = cfg.get("max_position_embeddings") or (text_config or {}).get("max_position_embeddings")
    return positions - 1 if isinstance(positions, int) and positions > 1 else None


class PromptDataset:
    """Turns data rows into prompt Samples (prompt ids in `tokens`), shuffled per epoch, resumable.

    `engine_prompt_limit`: the longest prompt the engines take (context length minus the response
    budget), when the caller knows it; see the module docstring for the limit applied without it.
    """

    MAX_ROW_WARNINGS = 20  # bad rows logged one by one at load; the rest are counted

    def __init__(self, config: DataConfig, tokenizer: Any, source: str | Path | Sequence[dict] | Any = None,
                 engine_prompt_limit: int | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        source = config.prompt_data if source is None else source
        if source is None:
            raise ValueError("no prompt data: set --prompt-data")
        self.rows = load_rows(source)
        self._name = str(source) if isinstance(source, (str, Path)) else "the prompt data"
        if len(self.rows) == 0:
            raise ValueError(f"prompt data {source!r} has no rows")
        self.max_prompt_len, self._limit_name = self._prompt_limit(engine_prompt_limit)
        self.epoch = 0
        self.cursor = 0
        self.skipped: dict[int, str] = {}  # row index -> why it is never served
        self._check_rows(source)
        self._order = self._epoch_order(0)

    def _prompt_limit(self, engine_limit: int | None) -> tuple[int | None, str]:
        """The prompt limit in tokens and how to name it in messages."""
        flag = self.config.rollout_max_prompt_len
        if engine_limit is not None and (flag is None or engine_limit < flag):
            return engine_limit, f"the engines' limit of {engine_limit} tokens (context length minus response budget)"
        if flag is not None:
            return flag, f"--rollout-max-prompt-len {flag}"
        model_limit = model_prompt_limit(self.tokenizer)
        if model_limit is not None:
            return model_limit, f"{model_limit} tokens (the model's max_position_embeddings minus one)"
        return None, "no limit"

    def where(self, index: int) -> str:
        """Where row `index` is, for messages: 'line 7 of data.jsonl' (1-based), else 'row 4 of ...' (its index)."""
        lines = getattr(self.rows, "lines", None)
        return f"line {lines[index]} of {self._name}" if lines is not None else f"row {index} of {self._name}"

    def _check_rows(self, source: Any) -> None:
        """Find every bad or over-long row now, so that none reaches an engine; warn about them once."""
        start = time.perf_counter()
        too_long = []
        for index in range(len(self.rows)):
            try:
                self.make_prompt(index)
            except _TooLong as e:
                too_long.append(index)
                self.skipped[index] = str(e)
            except BadRow as e:
                if len(self.skipped) - len(too_long) < self.MAX_ROW_WARNINGS:
                    logger.warning("skipping %s: %s", self.where(index), e)
                self.skipped[index] = str(e)
        bad = len(self.skipped) - len(too_long)
        if bad > self.MAX_ROW_WARNINGS:
            logger.warning("skipping %d more bad rows of the prompt data (%d in all; each one's reason is in "
                           "PromptDataset.skipped)", bad - self.MAX_ROW_WARNINGS, bad)
        if too_long:
            lines = getattr(self.rows, "lines", None)
            places = [lines[i] for i in too_long] if lines is not None else too_long
            shown = ", ".join(map(str, places[:10])) + (", ..." if len(places) > 10 else "")
            logger.warning("skipping %d of %d prompt data rows whose prompt has more tokens than %s (%s %s of %s)",
                           len(too_long), len(self.rows), self._limit_name, "lines" if lines is not None else "rows",
                           shown, self._name)
        if len(self.skipped) == len(self.rows):
            first = min(self.skipped)
            raise ValueError(f"every one of the {len(self.rows)} rows of the prompt data {source!r} is bad; "
                             f"e.g. {self.where(first)}: {self.skipped[first]}")
        logger.info("prompt data: %d rows checked in %.1fs, %d usable", len(self.rows), time.perf_counter() - start,
                    len(self.rows) - len(self.skipped))

    def __len__(self) -> int:
        return len(self.rows)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.config.rollout_shuffle:
            random.Random(self.config.rollout_seed * 1_000_003 + epoch).shuffle(order)
        return order

    @property
    def exhausted(self) -> bool:
        """True once every epoch has been served."""
        return self.epoch >= self.config.num_epoch

    def next_prompts(self, n: int) -> list[Sample]:
        """Up to `n` prompt Samples in data order (fewer only when the last epoch ends); bad rows are skipped."""
        out: list[Sample] = []
        while len(out) < n and not self.exhausted:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
                continue
            index = self._order[self.cursor]
            self.cursor += 1
            if index in self.skipped:
                continue
            try:
                sample = self.make_prompt(index)
            except BadRow as e:
                if index not in self.skipped:
                    logger.warning("skipping %s: %s", self.where(index), e)
                    self.skipped[index] = str(e)
                continue
            sample.metadata["epoch"] = self.epoch
            out.append(sample)
        return out

    def __iter__(self):
        """One pass over the remaining prompts (all epochs)."""
        while batch := self.next_prompts(1):
            yield batch[0]

    def make_prompt(self, index: int) -> Sample:
        """The prompt Sample of row `index`; raises BadRow with the reason if the row is unusable."""
        row = self.rows[index]
        if isinstance(row, _Malformed):
            raise BadRow(row.error)
        if not isinstance(row, dict):
            raise BadRow(f"expected an object, got {type(row).__name__}")
        key = self.config.input_key
        if key not in row or row[key] is None:
            raise BadRow(f"missing input key {key!r} (row keys: {sorted(row)})")
        prompt = row[key]
        text = self._render(prompt)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise BadRow("prompt has no tokens")
        if self.max_prompt_len is not None and len(ids) > self.max_prompt_len:
            raise _TooLong(f"prompt has {len(ids)} tokens, more than {self._limit_name}")
        label = None
        if self.config.label_key is not None:
            if self.config.label_key not in row:
                raise BadRow(f"missing label key {self.config.label_key!r} (row keys: {sorted(row)})")
            label = row[self.config.label_key]
        metadata: dict[str, Any] = {}
        if self.config.metadata_key is not None:
            metadata = row.get(self.config.metadata_key) or {}
            if isinstance(metadata, str):
                try:
                    metadata = json.loads(metadata)
                except json.JSONDecodeError:
                    raise BadRow(f"metadata {self.config.metadata_key!r} is a string but not JSON") from None
            if not isinstance(metadata, dict):
                raise BadRow(f"metadata {self.config.metadata_key!r} must be an object, "
                             f"got {type(metadata).__name__}")
            metadata = dict(metadata)
        metadata["data_index"] = index
        return Sample(prompt=prompt, tokens=ids, label=label, metadata=metadata)

    def _render(self, prompt: Any) -> str:
        """Prompt text as the engine sees it (chat template applied if configured)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRow("empty prompt")
            if not self.config.apply_chat_template:
                return prompt
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        elif isinstance(prompt, list):
            if not prompt:
                raise BadRow("empty message list")
            if not self.config.apply_chat_template:
                raise BadRow("prompt is a list of messages; it needs --apply-chat-template")
            for m in prompt:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise BadRow(f"chat message {m!r} must be an object with string 'role' and 'content'")
            messages = prompt
        else:
            raise BadRow(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template error is this row's problem
            raise BadRow(f"chat template failed: {e}") from e

    def state_dict(self) -> dict[str, Any]:
        """The position in the data (enough to continue exactly where this left off)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "num_rows": len(self.rows),
                "rollout_seed": self.config.rollout_seed, "rollout_shuffle": self.config.rollout_shuffle,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict`."""
        if state["num_rows"] != len(self.rows):
            raise ValueError(f"data state is for {state['num_rows']} rows but the prompt data has {len(self.rows)}")
        for key in ("rollout_seed", "rollout_shuffle"):
            if state[key] != getattr(self.config, key):
                raise ValueError(f"data state was saved with {key}={state[key]!r}, "
                                 f"but this run has {getattr(self.config, key)!r}")
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self._order = self._epoch_order(self.epoch)
