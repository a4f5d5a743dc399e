"""megatron_compat: the CPU answers to megatron-core's three CUDA assumptions."""

import pytest
import torch

from trainer import megatron_compat


def test_causal_masks_are_on_cpu_and_correct():
    mask = megatron_compat._cpu_causal_mask(3)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    window = megatron_compat._cpu_sliding_window_causal_mask(4, 4, (1, 0))  # each query sees itself and 1 back
    assert window.tolist() == [[False, True, True, True], [False, False, True, True],
                               [True, False, False, True], [True, True, False, False]]


def test_cpu_rng_tracker_forks_named_streams_and_restores_outer_state():
    tracker = megatron_compat._make_cpu_tracker_class()()
    tracker.add("model-parallel-rng", 42)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(42))
    torch.manual_seed(0)
    outer_expected = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    outer = torch.rand(2)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)  # the stream continues where it stopped
    assert torch.equal(torch.cat([first, second]), expected)
    assert torch.equal(outer, outer_expected)
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("other", 42)
    with pytest.raises(ValueError, match="not tracked"):
        with tracker.fork("missing"):
            pass


def test_rng_tracker_states_round_trip():
    tracker = megatron_compat._make_cpu_tracker_class()()
    tracker.add("s", 7)
    saved = dict(tracker.get_states())
    with tracker.fork("s"):
        a = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("s"):
        b = torch.rand(4)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_apply_is_a_no_op_with_cuda():
    current = torch.cuda.current_device
    megatron_compat.apply()
    assert torch.cuda.current_device is current and not megatron_compat._APPLIED
