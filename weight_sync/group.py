"""A dedicated gloo/NCCL process group between trainer rank 0 and the engine ranks, outside torch.distributed's
default group."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from weight_sync.errors import WeightSyncError, WeightSyncTimeoutError

_TIMEOUT_ERRORS = (dist.DistStoreError, dist.DistNetworkError, TimeoutError)


def resolve_backend(backend: str) -> str:
    """'nccl' or 'gloo' for 'auto' | 'nccl' | 'gloo'."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'gloo' or 'nccl'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs a CUDA device; use 'gloo' on CPU")
    return backend


class WeightUpdateGroup:
    """One member of a stateless process group built from a TCP rendezvous (rank 0 hosts the store).

    Nothing here touches torch.distributed's default or global state, so it can coexist with the
    trainer's Megatron groups and the engine's TP group. Every call has a timeout and raises
    `WeightSyncTimeoutError` naming the group instead of hanging.
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                 backend: str = "auto", timeout_s: float = 300.0):
        if world_size < 2:
            raise ValueError(f"world_size={world_size}; a weight-update group needs the sender and >= 1 engine rank")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} not in [0, world_size={world_size})")
        if not 0 < master_port <= 65535:
            raise ValueError(f"master_port={master_port}; expected 1..65535")
        self.group_name = group_name
        self.rank = rank
        self.world_size = world_size
        self.backend = resolve_backend(backend)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._where = (f"weight-update group {group_name!r} (rank {rank} of {world_size}, "
                       f"rendezvous {master_address}:{master_port}, {self.backend})")
        try:
            store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                  timeout=self.timeout, wait_for_workers=False)
            self._store = dist.PrefixStore(f"{group_name}/", store)
            self._pg = self._make_process_group()
        except _TIMEOUT_ERRORS as e:
            raise WeightSyncTimeoutError(
                f"{self._where}: not every rank arrived within {timeout_s:g}s "
                f"(is every engine's init_weights_update_group running?): {_first_line(e)}") from e
        except RuntimeError as e:
            raise WeightSyncError(f"{self._where}: could not be created: {_first_line(e)}") from e

    def _make_process_group(self):
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(self._store, self.rank, self.world_size, self.timeout)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self.timeout
        return dist.ProcessGroupNCCL(self._store, self.rank, self.world_size, options)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast `tensor` in place from rank `src` to every rank; raises instead of hanging."""
        if tensor.device.type != self.device.type:
            raise ValueError(f"{self._where}: tensor on {tensor.device}, group expects {self.device.type} tensors")
        wire = tensor.view(torch.uint8) if tensor.dtype in _FLOAT8 else tensor   # gloo has no float8 types
        try:
            work = self._pg.broadcast(wire, src, self.timeout)
            if not work.wait(self.timeout):
                raise WeightSyncTimeoutError(f"{self._where}: broadcast of {tuple(tensor.shape)} {tensor.dtype} "
                                             f"did not finish within {self.timeout.total_seconds():g}s")
        except WeightSyncTimeoutError:
            raise
        except (*_TIMEOUT_ERRORS, RuntimeError) as e:
            raise WeightSyncTimeoutError(
                f"{self._where}: broadcast of {tuple(tensor.shape)} {tensor.dtype} failed "
                f"(a peer left or did not join within {self.timeout.total_seconds():g}s): {_first_line(e)}") from e

    def close(self) -> None:
        """Release the group's connections."""
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            pg.shutdown()


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
