"""Checkpoints one bad file cannot lose: atomic writes, the manifest, and the fallback of --load (no Ray)."""

import hashlib
import json
import logging
import os

import pytest
import torch

from kiln_common.atomic_io import (atomic_torch_save, atomic_write_json, atomic_write_text, file_digest,
                                   is_temp_name)
from orchestrator.checkpoint import (LATEST_FILE, MANIFEST_FILE, CheckpointError, begin_checkpoint,
                                     check_checkpoint, choose_checkpoint, finish_checkpoint, iteration_folder)


def save(root, iteration, ranks=2, rollout=True):
    """A checkpoint as the driver writes one: rank files (as the trainer ranks do), then finish_checkpoint."""
    folder = begin_checkpoint(root, iteration)
    (folder / "policy_default").mkdir(exist_ok=True)
    files = {f"policy_default/rank_{r:05d}.pt": atomic_torch_save(folder / "policy_default" / f"rank_{r:05d}.pt",
                                                                  {"step": iteration, "w": torch.full((64,), r)})
             for r in range(ranks)}
    state = {"next_step": iteration, "policies": {"default": "/models/x"}, "weight_versions": {"default": iteration}}
    return finish_checkpoint(root, iteration, files, {"epoch": 0, "cursor": iteration} if rollout else None, state)


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if is_temp_name(p.name)]


# ---- the atomic writer -----------------------------------------------------------------------------------------


def test_atomic_writes_return_the_digest_of_what_they_wrote(tmp_path):
    for path, digest in [(tmp_path / "a.txt", atomic_write_text(tmp_path / "a.txt", "héllo\n")),
                         (tmp_path / "b.json", atomic_write_json(tmp_path / "b.json", {"x": [1, 2]})),
                         (tmp_path / "c.pt", atomic_torch_save(tmp_path / "c.pt", {"t": torch.arange(1000)}))]:
        data = path.read_bytes()
        assert digest.size == len(data) and digest.sha256 == hashlib.sha256(data).hexdigest()
        assert file_digest(path) == digest
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "c.pt")["t"], torch.arange(1000))
    assert not leftovers(tmp_path)


def test_a_crash_before_the_rename_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "rank_00000.pt"
    atomic_torch_save(path, {"v": 1})
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("injected crash between the temp write and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="injected"):
        atomic_torch_save(path, {"v": 2, "big": torch.zeros(10_000)})
    with pytest.raises(OSError, match="injected"):
        atomic_write_text(tmp_path / "new.txt", "never complete")
    monkeypatch.undo()
    assert path.read_bytes() == before and torch.load(path) == {"v": 1}
    assert not (tmp_path / "new.txt").exists() and not leftovers(tmp_path)

    def failing_writer(obj, f):
        f.write(b"half a file")
        raise RuntimeError("serializer failed mid-write")

    monkeypatch.setattr(torch, "save", failing_writer)
    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_torch_save(path, {"v": 3})
    assert path.read_bytes() == before and not leftovers(tmp_path)


def test_a_crash_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save(tmp_path, 2)
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(MANIFEST_FILE):
            raise OSError("injected crash before the manifest is in place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="injected"):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert (tmp_path / LATEST_FILE).read_text().strip() == "2"  # the pointer moves only after the manifest
    assert not (iteration_folder(tmp_path, 4) / MANIFEST_FILE).exists()
    assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 2)


# ---- the manifest -------------------------------------------------------------------------------------------------


def test_manifest_lists_every_file_with_its_size_and_digest(tmp_path):
    folder = save(tmp_path, 3, ranks=2)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["iteration"] == 3 and set(manifest["files"]) == {
        "policy_default/rank_00000.pt", "policy_default/rank_00001.pt", "rollout_state.pt", "driver.json"}
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert (tmp_path / LATEST_FILE).read_text().strip() == "3"
    result = check_checkpoint(folder)
    assert result.intact and result.verified


def test_rewriting_a_folder_drops_its_stale_manifest_first(tmp_path):
    save(tmp_path, 2)
    folder = begin_checkpoint(tmp_path, 2)
    assert not (folder / MANIFEST_FILE).exists()
    assert not check_checkpoint(folder).verified


# ---- choosing the checkpoint to resume ----------------------------------------------------------------------------


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, what", [
    (truncate, "policy_default/rank_00001.pt", "policy_default/rank_00001.pt truncated"),
    (truncate, "rollout_state.pt", "rollout_state.pt truncated"),
    (lambda p: p.unlink(), "policy_default/rank_00000.pt", "policy_default/rank_00000.pt missing"),
    (lambda p: p.unlink(), "rollout_state.pt", "rollout_state.pt missing"),
    (flip_a_byte, "policy_default/rank_00000.pt", "policy_default/rank_00000.pt sha256 mismatch"),
    (lambda p: p.write_text('{"next_step": 99}'), "driver.json", "driver.json"),
    (lambda p: p.write_text("garbage"), MANIFEST_FILE, "manifest.json unreadable"),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "rollout_state.pt", "rollout_state.pt has"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, file, what):
    save(tmp_path, 2)
    save(tmp_path, 4)
    damage(iteration_folder(tmp_path, 4) / file)
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"iter_0000004: {what}" in warnings[0] and "resuming from iter_0000002" in warnings[0]


def test_an_intact_newest_checkpoint_is_taken_quietly(tmp_path, caplog):
    save(tmp_path, 2)
    save(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 4)
    assert not caplog.records


@pytest.mark.parametrize("pointer", ["", "   \n", "abc", "4x", "-4", "\x00\x00"])
def test_an_empty_or_garbage_pointer_falls_back_to_scanning(tmp_path, caplog, pointer):
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / LATEST_FILE).write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 4)
    assert "not an iteration number" in caplog.text and "resuming from iter_0000004" in caplog.text


def test_a_missing_pointer_or_a_pointer_to_nothing_scans(tmp_path, caplog):
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / LATEST_FILE).unlink()
    truncate(iteration_folder(tmp_path, 4) / "rollout_state.pt")
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 2)
    assert f"{LATEST_FILE} missing" in caplog.text and "iter_0000004: rollout_state.pt truncated" in caplog.text
    caplog.clear()
    (tmp_path / LATEST_FILE).write_text("6")
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 2)
    assert "names iter_0000006, which does not exist" in caplog.text


def test_folders_newer_than_the_pointer_are_ignored(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    atomic_write_text(tmp_path / LATEST_FILE, "2")  # iter 4 finished its manifest, then the run died: not latest
    assert choose_checkpoint(tmp_path) == iteration_folder(tmp_path, 2)


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    truncate(iteration_folder(tmp_path, 4) / "policy_default/rank_00000.pt")
    (iteration_folder(tmp_path, 2) / "rollout_state.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        choose_checkpoint(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "iter_0000004: policy_default/rank_00000.pt truncated" in message
    assert "iter_0000002: rollout_state.pt missing" in message


def test_an_empty_load_folder_starts_from_scratch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path / "not_yet") is None
        assert choose_checkpoint(tmp_path) is None
    assert "holds no checkpoint yet" in caplog.text


def test_a_checkpoint_without_manifest_is_used_unverified_if_its_files_look_whole(tmp_path, caplog):
    """Kiln before manifests wrote rank files, rollout_state.pt, driver.json and the pointer, in place."""
    old = iteration_folder(tmp_path, 3)
    (old / "policy_default").mkdir(parents=True)
    torch.save({"step": 3}, old / "policy_default" / "rank_00000.pt")
    torch.save({"epoch": 0}, old / "rollout_state.pt")
    (old / "driver.json").write_text(json.dumps({"next_step": 3, "policies": {"default": "/m"}}))
    (tmp_path / LATEST_FILE).write_text("3")
    with caplog.at_level(logging.WARNING, logger="kiln.checkpoint"):
        assert choose_checkpoint(tmp_path) == old
    assert "iter_0000003 has no manifest.json (written by an older Kiln)" in caplog.text and "unverified" in caplog.text
    truncate(old / "policy_default" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"no manifest.json, policy_default/rank_00000.pt truncated"):
        choose_checkpoint(tmp_path)


def test_main_exits_with_code_2_before_starting_ray(qwen3_model, tmp_path, capsys):
    from orchestrator.driver import main
    save(tmp_path / "ckpt", 2)
    truncate(iteration_folder(tmp_path / "ckpt", 2) / "policy_default/rank_00000.pt")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "label": "2"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--hf-checkpoint", str(qwen3_model), "--prompt-data", str(data), "--load", str(tmp_path / "ckpt")])
    assert e.value.code == 2
    import ray
    assert not ray.is_initialized()
