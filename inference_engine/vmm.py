"""Device memory whose physical pages can be given back and mapped again at the same virtual address.

The colocated loop frees the engine's KV pool while the trainer runs and brings it back for the next rollout.
With ordinary allocations the pool comes back at new addresses, and every captured decode graph (which holds the
old ones) has to be captured again: about a second per step. A `Region` instead reserves a virtual address range
once (CUDA's virtual memory management, `cuMemAddressReserve`) and maps physical memory into it
(`cuMemCreate` + `cuMemMap`); `unmap()` returns the physical memory to the device (the trainer can allocate it),
`map()` takes fresh physical memory at the same addresses, so tensors viewing the range and graphs reading them
stay valid. Contents do not survive `unmap()`.

`Buffer` is what the KV pool allocates through: a flat byte tensor that is a `Region` on a CUDA device that
supports it, an ordinary torch allocation elsewhere (CPU, or with the memory saver off), with the same
`free()` / `allocate()` calls, so CPU runs take the same code path. The driver API is reached with ctypes
(libcuda is loaded by torch already); nothing here is built or compiled.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

_DEVICE_ATTRIBUTE_VMM_SUPPORTED = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
_ALLOCATION_TYPE_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED (device memory, not pageable)
_LOCATION_TYPE_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_ACCESS_READWRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_RECOMMENDED = 1  # CU_MEM_ALLOC_GRANULARITY_RECOMMENDED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        _libcuda().cuGetErrorString(result, ctypes.byref(message))
        raise RuntimeError(f"{what} failed: CUDA driver error {result} "
                           f"({(message.value or b'unknown').decode()})")


def _make_current(ordinal: int) -> None:
    """Make the device's primary context (the one the CUDA runtime and torch use) current on this thread."""
    cuda = _libcuda()
    device, context = ctypes.c_int(), ctypes.c_void_p()
    _check(cuda.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    _check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    _check(cuda.cuDevicePrimaryCtxRelease(device), "cuDevicePrimaryCtxRelease")  # torch holds its own reference


def vmm_supported(device: torch.device) -> bool:
    """Whether `device` is a CUDA device whose driver supports virtual memory management (every sm_70+ GPU on a
    recent driver); False on CPU or when libcuda cannot be used."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        _make_current(ordinal)
        value = ctypes.c_int()
        _check(_libcuda().cuDeviceGetAttribute(ctypes.byref(value), _DEVICE_ATTRIBUTE_VMM_SUPPORTED, ordinal),
               "cuDeviceGetAttribute")
        return bool(value.value)
    except (OSError, AttributeError, RuntimeError) as e:
        log.warning("CUDA virtual memory management unavailable (%s): the KV pool uses ordinary allocations", e)
        return False


class _DevicePointer:
    """What torch.as_tensor needs to view `nbytes` of device memory at `ptr` without owning it."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class Region:
    """`nbytes` (rounded up to the allocation granularity) of virtual addresses on a CUDA device, mapped to physical
    memory while `handle` is set. `tensor` is a uint8 view of the whole range, valid (same address) across unmap / map;
    touching it while unmapped is an illegal address on the device, so callers drop their views first."""

    def __init__(self, nbytes: int, device: torch.device):
        self.ordinal = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.ordinal)
        self.prop = _AllocationProp(type=_ALLOCATION_TYPE_PINNED, location=_Location(_LOCATION_TYPE_DEVICE,
                                                                                     self.ordinal))
        _make_current(self.ordinal)
        granularity = ctypes.c_size_t()
        _check(_libcuda().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(self.prop),
                                                        _GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity")
        step = granularity.value
        self.nbytes = max(step, -(-nbytes // step) * step)
        ptr = ctypes.c_uint64()
        _check(_libcuda().cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(self.nbytes),
                                              ctypes.c_size_t(step), ctypes.c_uint64(0), ctypes.c_uint64(0)),
               f"cuMemAddressReserve of {self.nbytes} bytes")
        self.ptr = ptr.value
        self.handle: int | None = None
        self.map()
        self.tensor = torch.as_tensor(_DevicePointer(self.ptr, self.nbytes), device=self.device)

    def map(self) -> None:
        """Back the range with fresh physical memory (contents undefined); nothing if already mapped."""
        if self.handle is not None:
            return
        cuda = _libcuda()
        _make_current(self.ordinal)
        handle = ctypes.c_uint64()
        _check(cuda.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(self.nbytes), ctypes.byref(self.prop),
                                ctypes.c_uint64(0)), f"cuMemCreate of {self.nbytes / 2**30:.2f} GiB")
        try:
            _check(cuda.cuMemMap(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.nbytes), ctypes.c_size_t(0),
                                 handle, ctypes.c_uint64(0)), "cuMemMap")
        except RuntimeError:
            cuda.cuMemRelease(handle)
            raise
        access = _AccessDesc(location=_Location(_LOCATION_TYPE_DEVICE, self.ordinal), flags=_ACCESS_READWRITE)
        _check(cuda.cuMemSetAccess(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.nbytes), ctypes.byref(access),
                                   ctypes.c_size_t(1)), "cuMemSetAccess")
        self.handle = handle.value

    def unmap(self) -> None:
        """Give the physical memory back to the device once queued work is done; the addresses stay reserved."""
        if self.handle is None:
            return
        torch.cuda.synchronize(self.device)  # kernels still in flight may read or write the range
        cuda = _libcuda()
        _make_current(self.ordinal)
        _check(cuda.cuMemUnmap(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.nbytes)), "cuMemUnmap")
        _check(cuda.cuMemRelease(ctypes.c_uint64(self.handle)), "cuMemRelease")
        self.handle = None

    def close(self) -> None:
        """Unmap and give the addresses back (the region and its views are unusable after)."""
        if self.ptr is None:
            return
        self.unmap()
        _check(_libcuda().cuMemAddressFree(ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.nbytes)),
               "cuMemAddressFree")
        self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may be gone; the process exit frees everything
            pass


class Buffer:
    """A flat byte buffer that can be freed and allocated again, zeroed each time it is allocated.

    stable: on a CUDA device with virtual memory management (and `use_vmm`), a `Region`, so `tensor` has the same
    address after every free / allocate; elsewhere an ordinary torch allocation, new (and at a new address) each
    time."""

    def __init__(self, nbytes: int, device: torch.device, use_vmm: bool = True):
        self.nbytes, self.device = nbytes, device
        self.region = None
        if use_vmm and vmm_supported(device):
            try:
                self.region = Region(nbytes, device)
            except (RuntimeError, TypeError) as e:  # e.g. a driver that refuses this size: still a working pool
                log.warning("%.2f GiB buffer in ordinary device memory (graphs recaptured after each release): %s",
                            nbytes / 2**30, e)
        self.tensor: torch.Tensor | None = None
        self._pool = None  # the ordinary CUDA allocation's private torch memory pool (see allocate)
        self.allocate()

    @property
    def stable(self) -> bool:
        return self.region is not None

    def allocate(self) -> torch.Tensor:
        """The zeroed buffer [nbytes] uint8 (mapped again / allocated if it was freed)."""
        if self.tensor is None:
            if self.region is not None:
                self.region.map()
                self.tensor = self.region.tensor[:self.nbytes]
            elif self.device.type == "cuda":
                # A private pool, so the buffer has segments of its own: carved out of a cached segment that also
                # holds live blocks, it would stay in torch's cache after free() + empty_cache(), out of reach of
                # the colocated trainer's process (measured on an H100: a 128 MiB pool freed 2 MiB).
                self._pool = torch.cuda.MemPool()
                with torch.cuda.use_mem_pool(self._pool, device=self.device.index):  # None: the current device
                    self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            else:
                self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            self.tensor.zero_()
        return self.tensor

    def free(self) -> None:
        """Give the memory back; views of `tensor` must not be used until `allocate()`."""
        self.tensor = None
        self._pool = None  # a released pool's segments go back to the device at the next empty_cache()
        if self.region is not None:
            self.region.unmap()


class ParamStore:
    """A model's parameters moved into one `Buffer`, so that their device memory can be given back while a colocated
    trainer runs and taken again before the next weight push.

    On a CUDA device with virtual memory management the parameters come back at the same addresses, so decode graphs
    captured after the move stay valid; elsewhere (CPU, memory saver off) they are views of a new allocation after
    each `resume()` (callers re-capture graphs and re-resolve weight views then, as after any move).

    `release(keep=True)` first copies the bytes to (pinned) host memory and `resume()` copies them back;
    `release(keep=False)` discards them: the memory comes back zeroed, for a caller that is about to load every
    parameter anyway (the RL loop's push after each train step), which saves a device-host round trip of the weights.
    """

    ALIGN = 256  # bytes: every parameter starts on a boundary the GEMM and attention kernels are happy with

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device, use_vmm: bool = True):
        self.params = list(dict.fromkeys(params))   # tied parameters once
        self.layout: list[tuple[int, int, torch.dtype, torch.Size]] = []   # (offset, bytes, dtype, shape) each
        offset = 0
        for p in self.params:
            nbytes = p.numel() * p.element_size()
            self.layout.append((offset, nbytes, p.dtype, p.shape))
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        self.buffer = Buffer(max(offset, self.ALIGN), device, use_vmm)
        self.backup: torch.Tensor | None = None
        self.released = False
        self.releases = {"kept": 0, "discarded": 0}   # counts, for the engine's metrics
        for p, view in zip(self.params, self._views()):
            view.copy_(p.data)
            p.data = view   # the old storage goes back to torch's cache (empty_cache gives it to the device)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def stable(self) -> bool:
        return self.buffer.stable

    def _views(self) -> list[torch.Tensor]:
        flat = self.buffer.tensor
        return [flat[offset:offset + nbytes].view(dtype).view(shape) for offset, nbytes, dtype, shape in self.layout]

    def release(self, keep: bool = True) -> None:
        """Give the parameters' device memory back (their contents to host memory first when `keep`)."""
        if self.released:
            return
        if keep:
            pin = self.buffer.device.type == "cuda"
            self.backup = torch.empty(self.buffer.nbytes, dtype=torch.uint8, pin_memory=pin)
            self.backup.copy_(self.buffer.tensor)
        for p in self.params:   # no parameter may keep a view of the freed memory
            p.data = torch.empty(0, dtype=p.dtype, device=self.buffer.device)
        self.buffer.free()
        self.released = True
        self.releases["kept" if keep else "discarded"] += 1

    def resume(self) -> None:
        """Take the memory again (zeroed, or the kept contents) and point every parameter back into it."""
        if not self.released:
            return
        flat = self.buffer.allocate()
        if self.backup is not None:
            flat.copy_(self.backup)
            self.backup = None
        for p, view in zip(self.params, self._views()):
            p.data = view
        self.released = False
