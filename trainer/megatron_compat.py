"""Make megatron-core 0.16 run on a CPU-only machine (gloo, local layer spec); a no-op when CUDA is present.

megatron-core assumes CUDA in exactly five places that the local (non Transformer Engine) GPT
path reaches:

1. `torch.cuda.current_device()` is used as the `device=` of freshly allocated tensors (global
   memory buffer, rotary frequencies, linear-layer scratch). Without CUDA we answer `cpu`.
2. `get_default_causal_mask` (and the sliding-window variant) allocates its mask on "cuda";
   `fused_softmax` imported it by name, so both references are replaced by CPU versions.
3. The CUDA RNG tracker (`get_cuda_rng_tracker().fork()`, used around dropout and by
   `model_parallel_cuda_manual_seed`) saves and restores CUDA generator states. `CpuRNGStatesTracker`
   keeps the same named streams as CPU generator states, and `model_parallel_manual_seed` seeds it.
4. Activation recomputation (`tensor_parallel.checkpoint`, selective recompute) saves the CUDA
   generator state next to the CPU one and restores both before recomputing. Without CUDA the
   "CUDA state" is the CPU state again and restoring it is left to the CPU half.
5. The MoE all-to-all token dispatcher copies its split sizes to the host on a side CUDA stream
   (`torch.cuda.Stream()` at construction, `torch.cuda.stream(...)` per layer). On CPU they are host
   tensors already: the copy becomes a conversion to the numpy arrays megatron expects.

`apply()` is idempotent; with CUDA available it changes only what is broken on GPUs too (below), and
`model_parallel_manual_seed` calls megatron's own `model_parallel_cuda_manual_seed`.

With or without CUDA: megatron's MoE router gating (`moe_utils.RouterGatingLinearFunction`) tests
`te_general_gemm is not None`, a name only bound when Transformer Engine imports; without it the
name is set to None, which selects megatron's own torch matmul path.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

_APPLIED = False


def has_cuda() -> bool:
    """True when a CUDA device is usable (then nothing is patched)."""
    return torch.cuda.is_available()


def has_transformer_engine() -> bool:
    """True when Transformer Engine is importable (the trainer then uses megatron's TE layer spec)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Upper-triangular bool mask [sq, sq]; True = masked (megatron's convention)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """Sliding-window causal mask [sq, skv]; True = masked."""
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker with named CPU generator states instead of CUDA ones."""

        def add(self, name: str, seed: int) -> None:
            """Track a new named stream seeded with `seed`."""
            if seed in self.seeds_:
                raise ValueError(f"rng seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"rng state {name!r} is already tracked")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            """Run the body with the named stream as the CPU generator state, then restore."""
            if name not in self.states_:
                raise ValueError(f"rng state {name!r} is not tracked; known: {sorted(self.states_)}")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def apply() -> None:
    """Patch megatron-core's five CUDA assumptions when CUDA is absent (idempotent)."""
    global _APPLIED
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if _APPLIED or has_cuda():
        return
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "host"  # not None: construction makes no CUDA stream
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_split_sizes
    _APPLIED = True


def _host_split_sizes(dispatcher, point: str, tokens_per_expert: torch.Tensor | None = None):
    """CPU stand-in for the all-to-all dispatcher's side-stream device-to-host copy: split sizes as numpy."""
    if not dispatcher.drop_and_pad and point == dispatcher.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(dispatcher, name, None)
            if torch.is_tensor(value):
                setattr(dispatcher, name, value.numpy())
    return tokens_per_expert


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and megatron's tensor-parallel RNG stream (CPU tracker without CUDA)."""
    torch.manual_seed(seed)
    if has_cuda():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        return
    apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + parallel_state.get_tensor_model_parallel_rank())


def get_rng_tracker_states() -> dict:
    """The tracker's named RNG states (for checkpoints)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return dict(get_cuda_rng_tracker().get_states())


def set_rng_tracker_states(states: dict) -> None:
    """Restore the tracker's named RNG states saved by `get_rng_tracker_states`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(dict(states))
