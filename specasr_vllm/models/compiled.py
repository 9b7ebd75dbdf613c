"""Whisper with compiled decoder steps and a compiled encoder: the engine's default path.

Why: an eager decoder step pays per-op dispatch and MKL's re-packing of every weight, so on a 2-core
CPU one whisper-base token costs ~15 ms eager against ~5.5 ms compiled, and verifying 16 tokens ~28
ms against ~11 ms, and the encoder ~290 ms per 30 s window against ~470 ms (``benchmarks/components.py``).
Inductor with *freezing* treats the weights as constants and packs them once (for oneDNN where a shape
is dynamic: MKL's packed fp32 kernels reach ~215 GFLOP/s here, oneDNN's ~500); *max-autotune* picks,
per shape, between its own GEMV/GEMM templates and the packed library kernels (the 51865-way output
projection is most of a one-token step).

How: each call attends over all 448 cache slots and every audio frame under a mask (``FixedView``),
so its shapes depend only on its rows and new tokens, and reads a contiguous block of cache rows as
views (``DecoderCache.compact`` keeps a batch's rows at the front). Two compiled graphs serve every
call: one row and one token with static shapes (AR at batch 1, where inductor's GEMV template is
fastest), and every other shape with dynamic rows and tokens (verification passes, batches,
prefixes). Dynamo specialises sizes of 1, so the dynamic function ends up with three graphs (see
``warm``); each costs 10-30 s to compile on this CPU. The C++ kernels and
autotuning results are kept on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under the project's
cache), so a second start skips the C++ build and the benchmarks, though inductor re-lowers each frozen
graph (it does not cache graphs whose weights are packed oneDNN tensors). Calls with a custom head (the
draft's) or scattered rows run the eager module.

Exactness: compiled and eager kernels round differently (logits agree to ~1e-4), and a one-token step
and a many-token verification pass are different compiled graphs. What is guaranteed and tested is the
argmax: AR with one-token steps and speculative decoding with verification passes pick the same tokens
on the dev files (``tests/test_compiled.py``; the harness checks identity on every run).
On CUDA the decoder steps are not compiled but captured: the same fixed-shape step replayed as CUDA
graphs (``step_graphs.StepGraphs``), since there an eager step is launch-bound; the encoder and the
cross-attention K/V (a few large products per window) run eager.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch

from specasr_vllm.config import cache_dir
from specasr_vllm.models.kv_cache import DecoderCache, FixedView
from specasr_vllm.models.step_graphs import WIDTHS, StepGraphs, padded_step
from specasr_vllm.models.whisper import StepInputs, Whisper, WhisperDims, block_step

log = logging.getLogger(__name__)


# Inductor's options: frozen, autotuned weights; autotuning reports stay in inductor's logs, not stderr
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "autotune_num_choices_displayed": 0,
                   "max_autotune_report_choices_stats": False}


class CompiledWhisper:
    """A ``Whisper`` whose ``decode`` and ``encode`` run compiled graphs where the shapes allow (on a GPU:
    ``decode`` through captured CUDA graphs, ``encode`` eager).

    It offers the interface the engine uses (``decode``, ``encode``, ``cross_kv``, caches, ``dims``);
    ``eager`` is the wrapped module, for code that hooks into its layers.
    """

    def __init__(self, model: Whisper, graphs: bool | None = None):
        """``graphs``: decode through ``StepGraphs`` with an eager encoder instead of compiling; by default on a
        GPU only (on a CPU it runs the same steps uncaptured: how the tests check the GPU path's plumbing)."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        self.eager = model.eval()
        # on a GPU: captured graphs of the eager step; the encoder's large products gain nothing from either
        graphs = model.device.type == "cuda" if graphs is None else graphs
        self.graphs = StepGraphs(self._run_flat, model.device) if graphs else None
        compiled = self.graphs is None
        self._one_token = torch.compile(self._run_one_token, dynamic=False) if compiled else None
        self._any_shape = torch.compile(self._run_any_shape, dynamic=True) if compiled else None
        # dynamic shapes: inductor then packs the linears for oneDNN, not MKL (with static shapes it takes
        # MKL for fp32), and oneDNN runs these 1500-row products 2.3x faster here (~500 against ~215 GFLOP/s)
        self._encoder = torch.compile(model.encoder, dynamic=True) if compiled else model.encoder
        self._cross_kv = torch.compile(model.cross_kv, dynamic=True) if compiled else model.cross_kv
        self.compiled: dict[tuple, float] = {}  # each shape compiled so far -> seconds its first call took
        self.calls: Counter[tuple[int, int]] = Counter()  # compiled decode calls per (rows, tokens)
        self.eager_calls = 0  # decode calls no compiled graph serves

    # ---- what the engine reads of a model ------------------------------------------------------------
    @property
    def dims(self) -> WhisperDims:
        return self.eager.dims

    @property
    def device(self) -> torch.device:
        return self.eager.device

    @property
    def dtype(self) -> torch.dtype:
        return self.eager.dtype

    @property
    def decoder(self) -> torch.nn.Module:
        return self.eager.decoder

    @torch.no_grad()
    def cross_kv(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("cross_kv", min(audio_features.shape[0], 2), audio_features.shape[1])
        return self._first_call(key, lambda: self._cross_kv(audio_features))

    def empty_cache(self, rows: int) -> DecoderCache:
        return self.eager.empty_cache(rows)

    def new_cache(self, audio_features: torch.Tensor) -> DecoderCache:
        cache = self.empty_cache(audio_features.shape[0])
        cache.claim(*self.cross_kv(audio_features))
        return cache

    def warm(self, rows: int = 1, cache: DecoderCache | None = None) -> float:
        """Compile (or capture) the encoder and the decode graphs now (a server's start, a benchmark's warm-up)
        instead of at first use; returns the seconds it took. Compiled: dynamo specialises sizes of 1, so
        calls of one row or several and of one token or several are four graphs. Captured: every bucketed
        width (``step_graphs.WIDTHS``), on ``cache`` (the engine's: a graph is bound to the cache it was captured on).
        ``rows`` > 1 does the batched ones too."""
        began = time.perf_counter()
        d = self.dims
        features = self.encode(torch.zeros(1, d.n_mels, 2 * d.max_source_positions, device=self.device))
        # compiled: 5 tokens, a width no other size of the step has. At 8 (base's heads) dynamo's duck sizing tied
        # the width to the heads' count, which the attention's view fixes, and the next width compiled again
        widths = WIDTHS if self.graphs is not None else (1, 5)
        for batch in sorted({1, rows}):
            target = cache if cache is not None else self.empty_cache(batch)
            claimed = target.claim(*self.cross_kv(features.repeat(batch, 1, 1)))
            try:
                for width in widths:
                    self.decode(torch.zeros(batch, width, dtype=torch.long, device=self.device), target, claimed)
                    for row in claimed:
                        target.set_length(row, 0)
            finally:
                target.release(claimed)
        return time.perf_counter() - began

    # ---- compiled paths ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Through the compiled encoder (eager on a GPU) one window at a time (its matrices are large enough that
        batching windows gains little), any number of frames (the draft's unpadded audio): one graph serves all."""
        # each window as a tensor of its own, not a view: dynamo guards a view's base as well (its layout, and its
        # sizes by index), so a strided view (a long recording's window) or a view of another rank (an unpadded
        # window of a long recording: "tuple index out of range") compiled the draft's encoder again (5-7 s)
        mel = mel.to(self.device, self.dtype)
        return torch.cat([self._first_call(("encoder",), lambda i=i: self._encoder(mel[i : i + 1].clone()))
                          for i in range(mel.shape[0])])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int] | None = None,
               tree_mask: torch.Tensor | None = None, depths: torch.Tensor | None = None,
               head: Callable[[torch.Tensor], torch.Tensor] | None = None, fixed: bool = False) -> torch.Tensor:
        """``Whisper.decode``'s contract, through a compiled graph for a contiguous block of cache rows."""
        batch, n = tokens.shape
        rows = list(range(batch)) if rows is None else rows
        if head is not None or rows != list(range(rows[0], rows[0] + batch)):
            self.eager_calls += 1
            return self.eager.decode(tokens, cache, rows, tree_mask, depths, head, fixed)
        if self.graphs is not None:  # at a bucketed width (``step_graphs.bucket``)
            logits = self.graphs(*padded_step(tokens, cache, rows, tree_mask, depths, self.device))[:, :n]
        else:
            inputs, state = block_step(tokens, cache, rows, tree_mask, depths, self.device)
            layers = self.dims.decoder_layers
            view = [state[i * layers : (i + 1) * layers] for i in range(4)]  # self K, self V, cross K, cross V
            graph = self._one_token if (batch, n) == (1, 1) else self._any_shape
            key = ("decode", min(batch, 2), min(n, 2), cache.cross_k[0].shape[2])  # sizes of 1 are specialised
            logits = self._first_call(key, lambda: graph(*inputs, *view))
        cache.advance(rows, n)
        self.calls[(batch, n)] += 1
        return logits

    def _run_one_token(self, *inputs) -> torch.Tensor:
        """Compiled with static shapes: AR's step at batch 1, where inductor's GEMV kernels pay most."""
        return self._run_decoder(*inputs)

    def _run_any_shape(self, *inputs) -> torch.Tensor:
        """Compiled with dynamic rows and tokens: verification passes, batches, prefixes."""
        return self._run_decoder(*inputs)

    def _run_flat(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                  audio_mask: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        """The step as a function of tensors alone (what ``StepGraphs`` captures): K/V of each layer in turn."""
        n = self.dims.decoder_layers
        return self._run_decoder(tokens, positions, slots, mask, audio_mask,
                                 *(list(kv[i * n : (i + 1) * n]) for i in range(4)))

    def _run_decoder(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     audio_mask: torch.Tensor, self_k: list[torch.Tensor], self_v: list[torch.Tensor],
                     cross_k: list[torch.Tensor], cross_v: list[torch.Tensor]) -> torch.Tensor:
        """What both graphs compute: the eager decoder over one block of cache rows, as plain tensors."""
        step = StepInputs(positions, slots, mask, audio_mask, self_k[0].shape[2])
        return self.eager.run_decoder(tokens, step, FixedView(self_k, self_v, cross_k, cross_v))

    def _first_call(self, key: tuple, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``call``; the first time for ``key`` (a compilation), log and keep how long it took."""
        if self.graphs is not None:  # nothing is compiled on a GPU
            return call()
        # inductor reads these while compiling, which happens inside a call; freezing only takes effect
        # when set in the global config during the call (an ``options=`` dict leaves the weights unfrozen)
        with torch._inductor.config.patch(COMPILE_OPTIONS):
            if key in self.compiled:
                return call()
            began = time.perf_counter()
            with warnings.catch_warnings():  # inductor's autotuner touches TypedStorage while compiling
                warnings.simplefilter("ignore", UserWarning)
                out = call()
        self.compiled[key] = time.perf_counter() - began
        log.info("compiled %s in %.1f s", key, self.compiled[key])
        return out
