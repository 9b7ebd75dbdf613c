"""Decoder steps replayed as captured CUDA graphs: the GPU's counterpart of the compiled CPU steps.

Why: on a GPU an eager decoder step is launch-bound. On an H200 an eager whisper-base call cost ~5.7-6.6 ms
for 1, 8 or 16 tokens, a tiny.en step 2.7-4.8 ms (``benchmarks/results/gpu-h200-graphs.log``): the time goes
to launching a few hundred small kernels one by one from Python, not to arithmetic. A captured graph
launches them all at once, so a step costs what its kernels cost (fp16: 0.96 ms a step, 1.2 ms to verify 8
or 16 tokens, 0.8-1.2 ms a draft step; so with this small target the draft is no cheaper than a step).

How: a step is a pure function of (a) small per-call inputs (tokens, positions, cache slots, masks),
which are copied into the graph's own buffers before each replay, and (b) state tensors (the
decoder cache's rows) that the graph reads and writes in place at the addresses it was captured with.
Calls through ``FixedView`` have shapes that depend only on the rows and new tokens, so one graph per
input shape serves every context and audio length. The state's addresses are part of a graph's key: a
cache that is reallocated (it grows when more rows or longer audio are claimed) gets new graphs, and
the old ones stay until the ``StepGraphs`` goes (a cache grows a few times in a process).

Widths are bucketed (``bucket``): a call of ``n`` new tokens runs at the next power of two, padded with
tokens that see only themselves (their logits are dropped; their K/V land in slots past the row's
length, which no call reads: lengths exclude them and masks hide them), so a handful of graphs serves
verification passes and draft catch-up passes of any width. A server captures them before it serves
(``warm``: one row and a full batch, every width); a batch that shrinks as requests end, or a prefix
longer than 64 tokens, is captured at its first call (an H200 run at batch 16 captured 1-19 graphs so).
Each graph keeps its output buffer (batch x width x vocabulary), so a wide batch's graphs hold memory.

The kernels a graph replays are the eager step's own, so a replay computes what the eager step
computes for the same shapes. On a CPU there is nothing to capture: the step then runs over the same
buffers directly, which is what the CPU tests exercise (the plumbing, not the capture).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.whisper import block_step

_CAPTURING = threading.Lock()


@dataclass
class _Captured:
    inputs: list[torch.Tensor]  # the graph's own input buffers, refilled before each replay
    graph: torch.cuda.CUDAGraph | None = None  # None on a CPU: the step runs directly
    output: torch.Tensor | None = None  # the buffer a replay writes its result to


class StepGraphs:
    """``step(*inputs, *state)`` through one captured graph per shape of ``inputs`` and ``state``."""

    def __init__(self, step: Callable[..., torch.Tensor], device: torch.device):
        self.step = step
        self.device = device
        self._capture = device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self._capture else None  # graphs share their memory
        self._graphs: dict[tuple, _Captured] = {}
        self.calls = 0  # steps run through it

    def __len__(self) -> int:
        """How many graphs are kept (one per shape and state address seen)."""
        return len(self._graphs)

    @torch.no_grad()
    def __call__(self, inputs: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's output for these inputs, the state updated in place. ``inputs`` must be on the device."""
        key = (tuple((t.shape, t.dtype) for t in inputs), tuple((t.data_ptr(), t.shape, t.stride()) for t in state))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._new(inputs, state)
        self.calls += 1
        for buffer, value in zip(captured.inputs, inputs):
            buffer.copy_(value, non_blocking=True)
        if captured.graph is None:
            return self.step(*captured.inputs, *state)
        captured.graph.replay()
        return captured.output.clone()  # the buffer is the graph's: the next replay overwrites it

    def _new(self, inputs: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> _Captured:
        captured = _Captured([t.clone() for t in inputs])
        if not self._capture:
            return captured
        # one capture at a time in the process: gc's switch below is global, and capture streams and pools
        # live on the current device
        with _CAPTURING, torch.cuda.device(self.device):
            # one eager run on a side stream first (cuBLAS handles and workspaces are created outside the
            # capture); it writes into the state exactly what the first replay writes again
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step(*captured.inputs, *state)
            torch.cuda.current_stream(self.device).wait_stream(side)
            captured.graph = torch.cuda.CUDAGraph()
            # no garbage collection while capturing: collecting an unreachable graph (an engine dropped
            # earlier) destroys it, which is illegal during a capture and invalidates it (seen on an H200 as
            # "operation not permitted when stream is capturing", then a failed cuBLAS call); thread-local
            # errors: another thread's work (a draft running ahead) does not invalidate this capture
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(captured.graph, pool=self._pool, capture_error_mode="thread_local"):
                    captured.output = self.step(*captured.inputs, *state)
            finally:
                if collecting:
                    gc.enable()
        return captured


# the widths a server captures before it serves: verification passes reach ~25 tokens (a 24-token chain and
# the bonus token), the draft's catch-up passes with recycling candidates over 32
WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int, room: int) -> int:
    """The width a call of ``n`` new tokens runs at: the next power of two where the cache rows have ``room``
    slots left for it, else ``n`` itself (near the end of the 448 positions)."""
    width = 1 << (n - 1).bit_length()
    return width if width <= room else n


def pad_tokens(width: int, tokens: torch.Tensor, tree_mask: torch.Tensor | None,
               depths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``tokens`` (batch, n), their tree mask (default causal) and depths (default 0 .. n - 1), on the tokens'
    device, padded to ``width`` inputs that see only themselves at depth 0 (``packing.pack_rows``'s padding).
    At ``width == n`` they are returned as given (``whisper.step_inputs`` fills in the defaults)."""
    if width == tokens.shape[1]:
        return tokens, tree_mask, depths
    batch, n = tokens.shape
    device = tokens.device
    if tree_mask is None:
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)
    if depths is None:
        depths = torch.arange(n, device=device).expand(batch, n)
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(batch, 1, 1)
    mask[:, :n, :n] = tree_mask.to(device)
    return F.pad(tokens, (0, width - n)), mask, F.pad(depths.to(device), (0, width - n))


def padded_step(tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None,
                depths: torch.Tensor | None, device: torch.device) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """``whisper.block_step`` at the bucketed width of its ``n`` tokens (the width is the inputs' second size)."""
    width = bucket(tokens.shape[1], cache.capacity - max(cache.lengths(rows)))
    tokens, tree_mask, depths = pad_tokens(width, tokens.to(device, non_blocking=True), tree_mask, depths)
    return block_step(tokens, cache, rows, tree_mask, depths, device)
