"""Checkpoint folders of --save / --load: how one is written so that no crash leaves a bad one, and which to resume.

Layout under the root folder:

    iter_<step, 7 digits>/policy_<name>/rank_<rank, 5 digits>.pt   one per trainer rank (trainer/actor.py)
    iter_<step>/rollout_state.pt                                   data position, counters, leftover groups
    iter_<step>/driver.json                                        next step, weight versions, seeds, flags
    iter_<step>/manifest.json                                      {path: {size, sha256}} of every file above
    latest_checkpointed_iteration.txt                              the newest complete <step>

Every file is written atomically (`kiln_common.atomic_io`), in this order: the ranks' files, the
rollout state, driver.json, the manifest, the latest pointer. A folder is complete once its
manifest exists; the pointer only ever names a complete folder. `choose_checkpoint` takes the one
the pointer names if every file's size and sha256 match its manifest, and otherwise falls back to
the newest older one that does (or, if the pointer itself is missing or garbage, the newest intact
`iter_*` folder), warning once about what was wrong. A folder without a manifest (written by a Kiln
before manifests) is used, unverified, if its driver.json reads and every .pt file is a whole zip
archive (the form torch.save writes; a truncated one has lost its end-of-archive record).

The rank files may be resumed by a run with another data-parallel size (same TP and PP): each trainer rank
reads the file of its TP/PP coordinates and, with `--use-distributed-optimizer`, reshards the optimizer state
from all of the saving DP ranks' files (`TrainerActor.load_checkpoint`, docs/trainer.md).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kiln_common.atomic_io import (FileDigest, atomic_torch_save, atomic_write_json, atomic_write_text,
                                   file_digest, fsync_dir, is_temp_name)

logger = logging.getLogger("kiln.checkpoint")

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_ITER = re.compile(r"iter_([0-9]+)")
_NUMBER = re.compile(r"[0-9]+")


class CheckpointError(RuntimeError):
    """No checkpoint under --load can be resumed (all of them are damaged or incomplete)."""


@dataclass
class CheckResult:
    """What `check_checkpoint` found: the problems (none = usable) and whether a manifest vouched for the files."""

    problems: list[str] = field(default_factory=list)
    verified: bool = False

    @property
    def intact(self) -> bool:
        return not self.problems


def iteration_folder(root: str | Path, iteration: int) -> Path:
    """The folder of the checkpoint taken after `iteration` steps."""
    return Path(root) / f"iter_{iteration:07d}"


def begin_checkpoint(root: str | Path, iteration: int) -> Path:
    """Create (or reopen) the folder of `iteration` and drop a stale manifest, so a rewrite reads as incomplete."""
    folder = iteration_folder(root, iteration)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    fsync_dir(folder)
    return folder


def finish_checkpoint(root: str | Path, iteration: int, files: dict[str, FileDigest],
                      rollout_state: Any, driver_state: dict[str, Any]) -> Path:
    """Write rollout_state.pt (unless None) and driver.json, then the manifest of them and `files`, then the pointer.

    `files` maps the paths (relative to the iteration folder) of what others wrote there, the trainer
    ranks' files, to their digests.
    """
    folder = iteration_folder(root, iteration)
    files = dict(files)
    if rollout_state is not None:
        files["rollout_state.pt"] = atomic_torch_save(folder / "rollout_state.pt", rollout_state)
    files["driver.json"] = atomic_write_json(folder / "driver.json", driver_state)
    write_manifest(folder, iteration, files)
    atomic_write_text(Path(root) / LATEST_FILE, str(iteration))
    return folder


def write_manifest(folder: str | Path, iteration: int, files: dict[str, FileDigest]) -> FileDigest:
    """Write `folder`/manifest.json listing each file's relative path, size and sha256."""
    manifest = {"format": MANIFEST_FORMAT, "iteration": iteration,
                "files": {path: files[path].to_dict() for path in sorted(files)}}
    return atomic_write_json(Path(folder) / MANIFEST_FILE, manifest)


def check_checkpoint(folder: str | Path) -> CheckResult:
    """Check one iteration folder against its manifest (sizes and sha256), or, without one, that it looks whole."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        problems = _check_without_manifest(folder)
        return CheckResult([f"no {MANIFEST_FILE}", *problems] if problems else [], verified=False)
    try:
        manifest = json.loads(path.read_text())
        files = {str(p): FileDigest(int(e["size"]), str(e["sha256"])) for p, e in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return CheckResult([f"{MANIFEST_FILE} unreadable ({type(e).__name__}: {e})"])
    problems = [] if "driver.json" in files else [f"driver.json not in {MANIFEST_FILE}"]
    to_hash = []
    for rel, expected in files.items():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            problems.append(f"{rel}: a path outside the checkpoint folder")
            continue
        file = folder / rel
        if not file.is_file():
            problems.append(f"{rel} missing")
            continue
        size = file.stat().st_size
        if size < expected.size:
            problems.append(f"{rel} truncated ({size} of {expected.size} bytes)")
        elif size > expected.size:
            problems.append(f"{rel} has {size} bytes, the manifest says {expected.size}")
        else:
            to_hash.append(rel)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(to_hash)))) as pool:  # hashlib releases the GIL
        digests = dict(zip(to_hash, pool.map(lambda rel: file_digest(folder / rel), to_hash)))
    problems += [f"{rel} sha256 mismatch" for rel in to_hash if digests[rel].sha256 != files[rel].sha256]
    return CheckResult(problems, verified=True)


def _check_without_manifest(folder: Path) -> list[str]:
    """Problems of a folder without a manifest: driver.json unreadable, rank 0 of a policy missing, a .pt not whole."""
    problems = []
    try:
        policies = list(json.loads((folder / "driver.json").read_text())["policies"])
    except FileNotFoundError:
        problems.append("driver.json missing")
        policies = []
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"driver.json unreadable ({type(e).__name__}: {e})")
        policies = []
    problems += [f"policy_{name}/rank_00000.pt missing" for name in policies
                 if not (folder / f"policy_{name}" / "rank_00000.pt").is_file()]
    for file in sorted(folder.rglob("*.pt")):
        if not is_temp_name(file.name) and not zipfile.is_zipfile(file):
            problems.append(f"{file.relative_to(folder)} truncated or not a torch file")
    return problems


def choose_checkpoint(root: str | Path) -> Path | None:
    """The newest intact checkpoint folder under `root` (--load); None if it holds none yet.

    Raises CheckpointError, naming what is wrong with each one, if there are checkpoints but none is intact.
    """
    root = Path(root)
    folders = {}
    if root.is_dir():
        folders = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _ITER.fullmatch(p.name))}
    pointer = root / LATEST_FILE
    if not pointer.exists() and not folders:
        logger.warning("--load %s holds no checkpoint yet (no %s, no iter_* folder); starting from step 0",
                       root, LATEST_FILE)
        return None
    notes: list[str] = []  # what was wrong, newest first
    latest = _read_pointer(pointer, notes)
    if latest is not None and latest not in folders:
        notes.append(f"{LATEST_FILE} names {iteration_folder(root, latest).name}, which does not exist")
    candidates = sorted((i for i in folders if latest is None or i <= latest), reverse=True)
    for iteration in candidates:
        folder = folders[iteration]
        result = check_checkpoint(folder)
        if not result.intact:
            notes.append(f"{folder.name}: {', '.join(result.problems)}")
            continue
        if not result.verified:
            notes.append(f"{folder.name} has no {MANIFEST_FILE} (written by an older Kiln): its files look whole "
                         f"but are unverified")
        if notes:
            logger.warning("--load %s: %s; resuming from %s", root, "; ".join(notes), folder.name)
        return folder
    found = "; ".join(notes) if notes else "no iter_* folder"
    raise CheckpointError(f"--load {root}: no intact checkpoint to resume from ({found}); point --load at a folder "
                          f"with an intact iter_* checkpoint, or drop --load to start from step 0")


def _read_pointer(pointer: Path, notes: list[str]) -> int | None:
    """The iteration the latest pointer names; None (and a note) if it is missing or not a number."""
    if not pointer.exists():
        notes.append(f"{LATEST_FILE} missing")
        return None
    try:
        text = pointer.read_text(errors="replace").strip()
    except OSError as e:
        notes.append(f"{LATEST_FILE} unreadable ({e})")
        return None
    if not _NUMBER.fullmatch(text):
        notes.append(f"{LATEST_FILE} holds {text[:40]!r}, not an iteration number")
        return None
    return int(text)
