"""Pipeline-parallel schedules over this rank's stage: 1F1B (non-interleaved) training and forward-only passes.

Each stage sends its output activations [s, b, H] to the next stage and gets their gradients back,
point to point over the pipeline group: a send and a receive with the same neighbour are posted as
one `batch_isend_irecv` (one NCCL group on GPU, so two stages sending to each other cannot
deadlock; plain async isend/irecv on gloo) and waited at once. megatron-core 0.16's own schedules
allocate on "cuda" by name and synchronise CUDA unconditionally, so they cannot run on CPU; this
module is the one schedule both use.

No shapes are exchanged and nothing is padded: every stage of a pipeline plans the same
micro-batches from the same samples, so sender and receiver both know each message's shape
(`shape(micro_batch)`). Messages between two neighbours flow one way each (activations forward,
gradients backward), in micro-batch order, so they cannot be confused.

With one stage both schedules reduce to "forward (then backward) one micro-batch after another".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

Shape = tuple[int, ...]
StageForward = Callable[[Any, torch.Tensor | None], torch.Tensor | None]


class PipelineSchedule:
    """This rank's stage of a pipeline: neighbours, activation/gradient p2p, and the schedules."""

    def __init__(self, group, *, dtype: torch.dtype, device: torch.device):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        ranks = dist.get_process_group_ranks(group) if self.size > 1 else []
        self.prev = ranks[self.rank - 1] if not self.is_first else None  # global ranks of the neighbours
        self.next = ranks[self.rank + 1] if not self.is_last else None
        self.dtype, self.device = dtype, device
        if self.size > 1:  # NCCL: the first batched p2p call must involve the whole group; a collective opens it
            dist.all_reduce(torch.zeros(1, device=device), group=group)

    @property
    def is_first(self) -> bool:
        """This stage embeds the tokens."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """This stage holds the output layer (and computes the loss)."""
        return self.rank == self.size - 1

    # ------------------------------------------------------------------------------------------
    # point to point
    # ------------------------------------------------------------------------------------------

    def _exchange(self, send: torch.Tensor | None, send_to: int | None, recv_shape: Shape | None,
                  recv_from: int | None) -> torch.Tensor | None:
        """Send `send` to global rank `send_to` and receive a `recv_shape` tensor from `recv_from`, together.

        A missing neighbour (None: before the first stage, after the last) skips that half.
        """
        ops, received = [], None
        if send is not None and send_to is not None:
            ops.append(dist.P2POp(dist.isend, send.detach().to(self.dtype).contiguous(), send_to, self.group))
        if recv_shape is not None and recv_from is not None:
            received = torch.empty(recv_shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, recv_from, self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return received

    def _recv_forward(self, shape: Shape) -> torch.Tensor | None:
        """The previous stage's output (None on the first stage), as a leaf that collects its gradient."""
        x = self._exchange(None, None, shape, self.prev)
        return x.requires_grad_() if x is not None and torch.is_grad_enabled() else x

    # ------------------------------------------------------------------------------------------
    # schedules
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[Any], forward: StageForward, shape: Callable[[Any], Shape]) -> None:
        """Run `forward(mb, input)` for every micro-batch in order, passing each stage's output on."""
        for mb in micro_batches:
            x = self._recv_forward(shape(mb))
            y = forward(mb, x)
            self._exchange(y, self.next, None, None)

    def forward_backward(self, micro_batches: Sequence[Any], forward: StageForward,
                         shape: Callable[[Any], Shape]) -> None:
        """1F1B over the micro-batches: gradients accumulate in the parameters' `.grad`.

        `forward(mb, input)` returns this stage's output [s, b, H], or on the last stage the scalar loss
        of the micro-batch (already scaled by the global normaliser: losses are summed, not averaged).
        Stage r runs `size - r - 1` forwards ahead (warm-up), then alternates one forward and one
        backward, then drains the remaining backwards, so at most `size - r` activations are alive.
        """
        n = len(micro_batches)
        warmup = min(self.size - self.rank - 1, n)
        in_flight: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (input, output) awaiting backward

        def run_forward(k: int, x: torch.Tensor | None) -> torch.Tensor:
            y = forward(micro_batches[k], x)
            in_flight.append((x, y))
            return y

        def run_backward(grad: torch.Tensor | None) -> torch.Tensor | None:
            x, y = in_flight.pop(0)
            if self.is_last:
                y.backward()
            else:
                torch.autograd.backward(y, grad_tensors=grad.to(y.dtype))
            return x.grad if x is not None else None

        for k in range(warmup):
            y = run_forward(k, self._recv_forward(shape(micro_batches[k])))
            self._exchange(y, self.next, None, None)
        x = self._recv_forward(shape(micro_batches[warmup])) if warmup < n else None
        for k in range(warmup, n):
            done = k - warmup  # the micro-batch whose backward runs now
            y = run_forward(k, x)
            grad = self._exchange(y, self.next, shape(micro_batches[done]), self.next)
            grad_in = run_backward(grad)
            more = k + 1 < n
            received = self._exchange(grad_in, self.prev, shape(micro_batches[k + 1]) if more else None,
                                      self.prev if more else None)
            x = received.requires_grad_() if received is not None else None
        for done in range(n - warmup, n):
            grad = self._exchange(None, None, shape(micro_batches[done]), self.next)
            self._exchange(run_backward(grad), self.prev, None, None)
