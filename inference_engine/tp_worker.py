"""Tensor-parallel ranks 1..tp-1: worker processes that mirror every model operation of the Engine's rank 0.

Rank 0 (the Engine's ModelRunner) broadcasts each operation as a command (a pickled tuple over the
gloo group) followed by its tensors over the device group: a step's ForwardBatch as one packed int64
tensor, the hidden rows whose logits are wanted, weights as one flat buffer per dtype. Every rank
then runs the same code on its own shard, so the collectives inside the model line up. Commands are
only ever sent from the scheduler thread, so they reach the workers in the order rank 0 runs them.

A worker prints every thread's Python stack on a fatal signal and on SIGUSR1 (`kill -USR1 <pid>`
shows where a stuck rank waits), and exits when the Engine's process is gone.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch

from inference_engine.config import EngineConfig
from inference_engine.forward_batch import ForwardBatch
from inference_engine.parallel import TP_TIMEOUT_S, TPGroup, rank_device
from inference_engine.control import MEMBERS
from weight_sync import FlatLayout, WeightReceiver
from kiln_common.net import free_port

if TYPE_CHECKING:
    from inference_engine.model_runner import ModelRunner

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 30.0
PARENT_POLL_S = 1.0
RUNNER_COMMANDS = ("load_checkpoint", "named_hf_tensors", "release_memory", "resume_memory")  # ModelRunner's mirror


class TPWorkers:
    """Rank 0's handle on the worker processes of ranks 1..tp-1 and its own membership of the tp group."""

    def __init__(self, config: EngineConfig):
        self.size = config.tp_size
        port = free_port()
        ctx = multiprocessing.get_context("spawn")
        self.processes = [ctx.Process(target=worker_main, args=(rank, config, port, torch.get_num_threads()),
                                      name=f"kiln-engine-tp{rank}", daemon=True)
                          for rank in range(1, self.size)]
        for p in self.processes:
            p.start()
        try:
            self.group = TPGroup("127.0.0.1", port, 0, self.size, rank_device(config.device, config.base_gpu_id, 0))
        except Exception:
            self.kill()
            raise

    def check_alive(self) -> None:
        """Raise RuntimeError naming every worker process that has exited (rank 0 would wait on it forever)."""
        dead = [(rank, p.exitcode) for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]
        if dead:
            raise RuntimeError("tensor-parallel worker(s) exited: " + ", ".join(
                f"rank {rank} (exit code {code})" for rank, code in dead) + "; the engine cannot run steps any more")

    def command(self, name: str, *args: Any) -> None:
        """Have every worker run operation `name` with picklable args (its tensors follow separately)."""
        self.group.broadcast_object((name, args))

    def send_batch(self, fb: ForwardBatch) -> None:
        """Send a step's ForwardBatch: its host lists with the command, its device tensors packed in one broadcast."""
        self.command("forward", fb.extend_lens, fb.seq_lens_cpu.tolist(), fb.kv_indices.numel(), fb.same_pages,
                     fb.prefix_keys, fb.prefix_lens)
        self.group.broadcast(torch.cat([fb.input_ids, fb.positions, fb.out_cache_loc, fb.qo_indptr, fb.kv_indptr,
                                        fb.kv_indices, fb.seq_lens]))

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """Send the hidden rows [N, hidden] whose logits rank 0 is about to compute."""
        self.command("logits", tuple(hidden.shape), hidden.dtype)
        self.group.broadcast(hidden.contiguous())

    def send_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Send full HF-named tensors (one flat buffer per dtype); each rank loads its shard of them."""
        layout = FlatLayout.of(named)
        self.command("load_weights", layout.metadata())
        for buf in layout.flatten(named, device=self.group.device):
            self.group.broadcast(buf)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers and leave the group (graceful: a stop command first; any still alive after it is killed).

        graceful=False kills them at once and leaves the group's connections as they are: a collective
        may still be pending on this rank, and tearing down its communicator would wait for it.
        """
        if graceful:
            try:
                self.command("stop")
            except Exception as exc:  # a worker already gone: the kill below still cleans up
                log.warning("tp workers did not take the stop command: %s", exc)
            # Every rank tears its side of the group down at the same time: NCCL's communicator teardown
            # waits for the peers' (seen on 2 H100s: a worker blocked in it while rank 0 waited in join).
            closer = threading.Thread(target=self.group.close, name="kiln-tp-close", daemon=True)
            closer.start()
            for p in self.processes:
                p.join(JOIN_TIMEOUT_S)
            closer.join(JOIN_TIMEOUT_S)
            if closer.is_alive():
                log.warning("tp group teardown on rank 0 did not finish in %.0f s; left to finish in the background",
                            JOIN_TIMEOUT_S)
        self.kill()

    def kill(self) -> None:
        """Kill workers that are still alive and reap them."""
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join()


def receive_batch(group: TPGroup, runner: "ModelRunner", extend_lens: list[int], seq_lens: list[int],
                  num_kv: int, same_pages: bool, prefix_keys: list[int] | None = None,
                  prefix_lens: list[int] | None = None) -> ForwardBatch:
    """The ForwardBatch rank 0 sent, on this rank's KV pool and attention backend (with its shared-prefix groups:
    every rank attends the same way)."""
    tokens, bs = sum(extend_lens), len(extend_lens)
    packed = group.broadcast(torch.empty(3 * tokens + 2 * (bs + 1) + num_kv + bs, dtype=torch.int64,
                                         device=runner.device))
    input_ids, positions, out_cache_loc, qo_indptr, kv_indptr, kv_indices, seq_lens_d = packed.split(
        [tokens, tokens, tokens, bs + 1, bs + 1, num_kv, bs])
    return ForwardBatch(input_ids=input_ids, positions=positions, out_cache_loc=out_cache_loc, qo_indptr=qo_indptr,
                        kv_indptr=kv_indptr, kv_indices=kv_indices, seq_lens=seq_lens_d,
                        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64), extend_lens=list(extend_lens),
                        same_pages=same_pages, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend,
                        prefix_keys=prefix_keys, prefix_lens=prefix_lens)


def receive_weights(group: TPGroup, metadata: dict) -> list[tuple[str, torch.Tensor]]:
    """The full HF-named tensors rank 0 sent with send_weights."""
    layout = FlatLayout.from_metadata(**metadata)
    return layout.unflatten([group.broadcast(buf) for buf in layout.empty_buffers(group.device)])


class RankWeights:
    """A worker rank's share of the control members every tp rank runs itself (`MEMBERS[name].tp_ranks`): rank 0
    (the Engine) sends the member's name and bound arguments, each worker runs the method of that name here."""

    def __init__(self, runner: "ModelRunner", receiver: WeightReceiver):
        self.runner = runner
        self.receiver = receiver

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str, timeout_s: float) -> None:
        """Join the group as rank rank_offset + this tp rank."""
        self.receiver.join_group(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, weight_version: int) -> None:
        """Receive the bucket and load this rank's shard of it (rank 0 keeps the version)."""
        self.runner.load_weights_local(self.receiver.receive_distributed(group_name, names, dtypes, shapes))

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Leave the group."""
        self.receiver.leave_group(group_name)


def worker_main(rank: int, config: EngineConfig, port: int, num_threads: int) -> None:
    """A worker process: join the tp group, build this rank's ModelRunner, then run rank 0's commands until stop."""
    from inference_engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a native crash (segfault, abort) still prints where each thread was
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _exit_with_parent()
    torch.set_num_threads(num_threads)
    device = rank_device(config.device, config.base_gpu_id, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = TPGroup("127.0.0.1", port, rank, config.tp_size, device, TP_TIMEOUT_S)
    runner = ModelRunner(config, tp=group)
    receiver = WeightReceiver(tp_rank=rank)
    weights = RankWeights(runner, receiver)
    try:
        while True:
            name, args = group.broadcast_object()
            if name == "stop":
                return
            try:
                _run_command(group, runner, weights, name, args)
            except Exception:  # rank 0 runs the same operation and reports the same error to its caller
                log.error("tp rank %d: %s failed:\n%s", rank, name, traceback.format_exc())
    finally:
        # This process ends here whatever the teardown does: a hung close would hold the GPU and rank 0's join.
        deadline = threading.Timer(JOIN_TIMEOUT_S / 2, os._exit, args=(0,))
        deadline.daemon = True
        deadline.start()
        runner.drop_cuda_graphs()
        receiver.close()
        group.close()


def _exit_with_parent() -> None:
    """Exit this worker once the Engine's process is gone, instead of holding its GPU blocked in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="kiln-tp-parent-watch", daemon=True).start()


def _run_command(group: TPGroup, runner: "ModelRunner", weights: RankWeights, name: str, args: tuple) -> None:
    if name == "forward":
        runner.forward(receive_batch(group, runner, *args))
    elif name == "logits":
        shape, dtype = args
        runner.logits(group.broadcast(torch.empty(shape, dtype=dtype, device=runner.device)))
    elif name == "load_weights":
        runner.load_weights_local(receive_weights(group, *args))
    elif name in RUNNER_COMMANDS:
        getattr(runner, name)(*args)
    elif name in MEMBERS and MEMBERS[name].tp_ranks:   # a control member: its arguments by name
        getattr(weights, name)(**args[0])
    else:
        raise ValueError(f"unknown tp command {name!r}")
