"""The engine's tensor-parallel group: a dedicated gloo / NCCL process group and the collectives the layers use.

The group is built from its own TCP rendezvous (rank 0, the Engine's process, hosts the store), not
torch.distributed's default group, so an engine can live in a process that also runs a trainer.
It holds two process groups: `cpu_group` (gloo) carries the pickled per-step commands, and
`device_group` (gloo on CPU, NCCL on GPU) carries activations, batch tensors and weights. The device
group connects when the group is built (one all-reduce on the default stream), so no rank creates
its NCCL communicator later inside a CUDA-graph warm-up or capture, and a broken link fails here.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Any

import torch
import torch.distributed as dist

TP_TIMEOUT_S = 300.0  # rendezvous and per-collective timeout: a lost peer raises instead of hanging forever


def rank_device(device: str, base_gpu_id: int, tp_rank: int) -> torch.device:
    """The device of tp rank `tp_rank`: the CPU, or GPU (base + rank) where base is N of "cuda:N" or base_gpu_id."""
    if device == "cpu":
        return torch.device("cpu")
    base = int(device.split(":", 1)[1]) if ":" in device else base_gpu_id
    return torch.device("cuda", base + tp_rank)


def check_tp_shape(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError unless the attention heads split evenly over tp_size ranks (kv heads split or replicated)."""
    if num_heads % tp_size:
        raise ValueError(f"tp_size {tp_size} does not divide num_attention_heads {num_heads}; "
                         f"expected a divisor of {num_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"tp_size {tp_size} and num_key_value_heads {num_kv_heads}: one must divide the other "
                         "(kv heads are split over ranks, or each is replicated on tp_size / num_kv_heads ranks)")


def check_ep_shape(num_experts: int, intermediate_size: int, tp_size: int, ep_size: int) -> None:
    """ValueError unless ep_size divides tp_size and num_experts, and each ep group's tp / ep ranks split I evenly."""
    if ep_size < 1 or tp_size % ep_size:
        raise ValueError(f"ep_size {ep_size} must divide tp_size {tp_size} (the experts are split over the tp ranks)")
    if num_experts % ep_size:
        raise ValueError(f"ep_size {ep_size} does not divide num_experts {num_experts}; expected a divisor of "
                         f"{num_experts}")
    if intermediate_size % (tp_size // ep_size):
        raise ValueError(f"moe_intermediate_size {intermediate_size} is not divisible by tp_size / ep_size "
                         f"{tp_size // ep_size}")


def _wire(x: torch.Tensor) -> torch.Tensor:
    """x as the collectives carry it: float8 tensors (FP8 weights) as uint8 views, which gloo also has."""
    return x.view(torch.uint8) if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else x


class TPGroup:
    """One rank's membership of an engine's tensor-parallel group (rank 0 is the Engine, the rest are workers)."""

    def __init__(self, master_address: str, master_port: int, rank: int, size: int, device: torch.device,
                 timeout_s: float = TP_TIMEOUT_S):
        if not 0 <= rank < size:
            raise ValueError(f"tp rank {rank} not in [0, tp_size={size})")
        self.rank, self.size, self.device = rank, size, device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_address, master_port, size, is_master=rank == 0, timeout=self.timeout,
                              wait_for_workers=False)
        self._store = store  # keeps rank 0's server alive as long as the group
        self.cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("kiln_tp/cpu/", store), rank, size, self.timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.device_group = dist.ProcessGroupNCCL(dist.PrefixStore("kiln_tp/dev/", store), rank, size, options)
        else:
            self.device_group = self.cpu_group
        self._connect()

    def _connect(self) -> None:
        """Run one all-reduce on the device group now: every rank's communicator exists before any model runs."""
        probe = torch.ones(1, dtype=torch.float32, device=self.device)
        self.all_reduce(probe)
        if int(probe.item()) != self.size:  # .item() waits for the all-reduce
            raise RuntimeError(f"tp rank {self.rank}: connect all-reduce gave {probe.item()}, expected {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks, in place; returns x."""
        self.device_group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on each), in rank order."""
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)]
        self.device_group.allgather([[_wire(o) for o in out]], [_wire(x)]).wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite x with rank src's x, in place; returns x."""
        self.device_group.broadcast(_wire(x), src).wait()
        return x

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank src's picklable obj, on every rank (over the gloo group: length, then bytes)."""
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.cpu_group.broadcast(length, src).wait()
        if self.rank != src:
            payload = torch.empty(int(length), dtype=torch.uint8)
        self.cpu_group.broadcast(payload, src).wait()
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def check_same(self, what: str, value: Any) -> None:
        """Raise ValueError on every rank unless every rank passes an equal picklable value (e.g. a shape plan).

        Ranks whose batch sizes, KV pools or captured graphs differ would issue different collectives
        and hang; this turns such a difference into the same error on all of them.
        """
        values = [self.broadcast_object(value if r == self.rank else None, src=r) for r in range(self.size)]
        differ = [r for r in range(1, self.size) if values[r] != values[0]]
        if differ:
            raise ValueError(f"tp ranks disagree on {what}: rank 0 has {values[0]!r}, "
                             + ", ".join(f"rank {r} has {values[r]!r}" for r in differ))

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value."""
        t = torch.tensor([value], dtype=torch.int64)
        self.cpu_group.allreduce([t], dist.ReduceOp.MIN).wait()
        return int(t)

    def close(self) -> None:
        """Release the group's connections.

        The NCCL communicator is aborted, not finalized: a finalize waits for every peer's and for work
        that captured CUDA graphs still reference (seen on 2 H100s: both ranks blocked in it for good),
        while an abort is local. Callers close only after the last collective ("stop"), so nothing is lost.
        """
        if self.device_group is not self.cpu_group:
            self.device_group.abort()
        self.cpu_group.shutdown()
