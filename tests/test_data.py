"""Prompt data: formats, chat template, bad rows skipped with their index, shuffling per epoch, resume."""

import json
import logging

import pytest
from transformers import AutoTokenizer

from rollout.config import DataConfig
from rollout.data import PromptDataset


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


ROWS = [{"prompt": f"What is {i} + 1?", "label": str(i + 1), "meta": {"id": i}} for i in range(10)]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_list_source_tokens_label_metadata(tok):
    ds = PromptDataset(DataConfig(metadata_key="meta"), tok, ROWS)
    batch = ds.next_prompts(3)
    assert [s.prompt for s in batch] == [r["prompt"] for r in ROWS[:3]]
    assert batch[1].tokens == ids(tok, "What is 1 + 1?") and batch[1].label == "2"
    assert batch[1].metadata == {"id": 1, "data_index": 1, "epoch": 0}
    assert batch[0].response_length == 0 and batch[0].tokens


def test_chat_template_text_and_messages(tok):
    cfg = DataConfig(apply_chat_template=True, system_prompt="Answer with a number.")
    rows = [{"prompt": "What is 2 + 2?", "label": "4"},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "2 + 2?"}], "label": "4"}]
    text, chat = PromptDataset(cfg, tok, rows).next_prompts(2)
    expected = tok.apply_chat_template([{"role": "system", "content": "Answer with a number."},
                                       {"role": "user", "content": "What is 2 + 2?"}],
                                      tokenize=False, add_generation_prompt=True)
    assert text.tokens == ids(tok, expected) and expected.endswith("<|im_start|>assistant\n")
    assert chat.tokens == ids(tok, tok.apply_chat_template(rows[1]["prompt"], tokenize=False,
                                                           add_generation_prompt=True))
    assert chat.prompt == rows[1]["prompt"]


def test_file_formats(tok, tmp_path):
    import datasets
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.parquet", "saved"):
        ds = PromptDataset(DataConfig(prompt_data=str(tmp_path / name)), tok)
        assert [s.label for s in ds.next_prompts(10)] == [r["label"] for r in ROWS], name
    with pytest.raises(ValueError, match=r"unsupported format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        PromptDataset(DataConfig(prompt_data=str(tmp_path / "d.txt")), tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataset(DataConfig(prompt_data=str(tmp_path / "missing.jsonl")), tok)


def test_bad_rows_are_reported_with_their_index_and_skipped(tok, tmp_path, caplog):
    lines = [json.dumps({"prompt": "What is 1 + 1?", "label": "2"}),  # 0 ok
             json.dumps({"question": "no prompt key", "label": "1"}),  # 1 missing key
             json.dumps({"prompt": 5, "label": "5"}),  # 2 wrong type
             json.dumps({"prompt": "   ", "label": "0"}),  # 3 empty
             "{not json",  # 4 malformed
             json.dumps({"prompt": "word " * 40, "label": "x"}),  # 5 too long
             json.dumps({"prompt": "What is 2 + 2?"}),  # 6 missing label
             json.dumps({"prompt": [{"role": "user", "content": "hi"}], "label": "x"}),  # 7 messages w/o template
             json.dumps({"prompt": "What is 3 + 3?", "label": "6"})]  # 8 ok
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n\n" + "\n".join(lines[2:]) + "\n")  # blank lines: line != row
    with caplog.at_level(logging.WARNING, logger="rollout.data"):
        ds = PromptDataset(DataConfig(prompt_data=str(path), rollout_max_prompt_len=20), tok)  # checked at load
    assert sorted(ds.skipped) == [1, 2, 3, 4, 5, 6, 7]
    assert "missing input key 'prompt'" in ds.skipped[1] and "got int" in ds.skipped[2]
    assert "empty prompt" in ds.skipped[3] and "malformed JSON" in ds.skipped[4]
    assert "more than --rollout-max-prompt-len 20" in ds.skipped[5] and "missing label key" in ds.skipped[6]
    assert "--apply-chat-template" in ds.skipped[7]
    assert f"skipping line 7 of {path}: malformed JSON" in caplog.text  # 1-based lines of the file, not row indices
    assert f"skipping line 2 of {path}: missing input key 'prompt'" in caplog.text
    assert "skipping 1 of 9 prompt data rows whose prompt has more tokens than --rollout-max-prompt-len 20 " \
           f"(lines 8 of {path})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rollout.data"):
        got = ds.next_prompts(5)
    assert [s.label for s in got] == ["2", "6"] and ds.exhausted and not caplog.text  # reported once, at load


def test_all_rows_bad_is_an_error(tok):
    with pytest.raises(ValueError, match=r"every one of the 2 rows .* row 0 of the prompt data: missing input key"):
        PromptDataset(DataConfig(num_epoch=3), tok, [{"x": 1}, {"x": 2}])


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\u000b", "\u000c", "\u001c", "\u001d",
                                       "\u001e"])
def test_jsonl_rows_split_at_newline_only(tok, tmp_path, separator):
    """str.splitlines splits at these too; a raw control character inside a string is tolerated (strict=False)."""
    rows = [{"prompt": f"What is{separator}{i} + 1?", "label": str(i + 1)} for i in range(3)]
    text = "".join(f'{{"prompt": "What is{separator}{i} + 1?", "label": "{i + 1}"}}\n' for i in range(3))
    assert len(text.splitlines()) == 6  # what the old reader saw
    path = tmp_path / "sep.jsonl"
    path.write_bytes(text.encode("utf-8"))
    ds = PromptDataset(DataConfig(prompt_data=str(path)), tok)
    got = ds.next_prompts(10)
    assert [s.prompt for s in got] == [r["prompt"] for r in rows] and not ds.skipped
    assert [s.metadata["data_index"] for s in got] == [0, 1, 2]


def test_jsonl_crlf_blank_lines_and_bom(tok, tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(("\ufeff" + "\r\n".join(json.dumps(r) for r in ROWS[:3]) + "\r\n\r\n").encode("utf-8"))
    ds = PromptDataset(DataConfig(prompt_data=str(path)), tok)
    assert [s.label for s in ds.next_prompts(10)] == ["1", "2", "3"] and not ds.skipped


def test_over_long_prompts_are_dropped_at_load_by_default(tok, tokenizer_dir, tmp_path, caplog):
    """Without --rollout-max-prompt-len the model's context length (config.json beside the tokenizer) is the limit."""
    import shutil
    from transformers import AutoTokenizer
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": 16}))
    model_tok = AutoTokenizer.from_pretrained(model)
    rows = [{"prompt": "What is 1 + 1?", "label": "2"}, {"prompt": "word " * 40, "label": "x"},
            {"prompt": "word" + " word" * 12, "label": "y"}, {"prompt": "What is 2 + 2?", "label": "4"}]
    assert len(ids(model_tok, rows[2]["prompt"])) == 15  # just fits: the engine needs room for one new token
    with caplog.at_level(logging.WARNING, logger="rollout.data"):
        ds = PromptDataset(DataConfig(num_epoch=2), model_tok, rows)
    assert ds.max_prompt_len == 15 and sorted(ds.skipped) == [1]
    assert "more than 15 tokens (the model's max_position_embeddings minus one)" in ds.skipped[1]
    assert caplog.text.count("skipping") == 1 and "skipping 1 of 4 prompt data rows" in caplog.text
    assert [s.label for s in ds.next_prompts(10)] == ["2", "y", "4"] * 2  # never served, in any epoch
    capped = PromptDataset(DataConfig(rollout_max_prompt_len=100), model_tok, rows, engine_prompt_limit=10)
    assert capped.max_prompt_len == 10 and sorted(capped.skipped) == [1, 2]
    assert "the engines' limit of 10 tokens" in capped.skipped[2]
    assert PromptDataset(DataConfig(), tok, rows).max_prompt_len is None  # no config.json: no limit known


def test_epochs_and_per_epoch_shuffle(tok):
    ds = PromptDataset(DataConfig(num_epoch=2, rollout_shuffle=True, rollout_seed=3), tok, ROWS)
    order = [s.metadata["data_index"] for s in ds.next_prompts(100)]
    assert len(order) == 20 and ds.exhausted and ds.next_prompts(1) == []
    first, second = order[:10], order[10:]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second != list(range(10))
    again = PromptDataset(DataConfig(num_epoch=2, rollout_shuffle=True, rollout_seed=3), tok, ROWS)
    assert [s.metadata["data_index"] for s in again] == order  # the seed fixes the order


def test_resume_position(tok):
    cfg = DataConfig(num_epoch=3, rollout_shuffle=True)
    ds = PromptDataset(cfg, tok, ROWS)
    ds.next_prompts(7)
    ds.next_prompts(7)  # crosses into epoch 1
    state = json.loads(json.dumps(ds.state_dict()))  # survives a JSON round trip
    expected = [(s.metadata["epoch"], s.metadata["data_index"]) for s in ds.next_prompts(9)]
    resumed = PromptDataset(cfg, tok, ROWS)
    resumed.load_state_dict(state)
    assert [(s.metadata["epoch"], s.metadata["data_index"]) for s in resumed.next_prompts(9)] == expected
    with pytest.raises(ValueError, match="rollout_seed"):
        PromptDataset(DataConfig(num_epoch=3, rollout_shuffle=True, rollout_seed=5), tok, ROWS).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for 10 rows"):
        PromptDataset(cfg, tok, ROWS[:5]).load_state_dict(state)


def test_quickstart_dataset(tok, tmp_path):
    from examples.quickstart.make_data import make_problems, write_dataset
    problems = make_problems(9, ("+", "-"))
    assert len(problems) == 100 + 55 and all(int(p["label"]) >= 0 for p in problems)
    assert {"prompt": "What is 3 + 4?", "label": "7"} in problems
    paths = write_dataset(tmp_path, test_fraction=0.2, seed=1)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(train) == 80 and len(test) == 20 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train:
        a, op, b = r["prompt"][len("What is "):-1].split()
        assert int(r["label"]) == int(a) + int(b) and op == "+"
    ds = PromptDataset(DataConfig(prompt_data=str(paths["train"]), apply_chat_template=True), tok)
    assert len(ds.next_prompts(100)) == 80 and not ds.skipped
