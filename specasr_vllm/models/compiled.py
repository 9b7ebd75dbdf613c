"""Whisper with compiled fixed-shape decoder steps and a compiled encoder: the engine's default path.

Why: an eager decoder step pays per-op dispatch and MKL's re-packing of every weight, so on a 2-core
CPU one whisper-base token costs ~15 ms eager against ~5 ms compiled, and verifying 8 tokens ~25 ms
against ~12 ms (``benchmarks/components.py``). Inductor with *freezing* treats the weights as
constants and packs them once for oneDNN; *max-autotune* picks, per shape, between its own GEMV/GEMM
templates and the packed library kernels (the 51865-way output projection is most of a step).

How: a compiled graph has fixed shapes, so every decode call is padded to a bucket of rows
(``ROW_BUCKETS``) and of new tokens per row (``WIDTH_BUCKETS``), and attends over all 448 cache slots
and every audio frame under a mask (``FixedView``). Padding never changes what a real token sees:
padded tokens see only themselves, padded rows are free cache rows. A shape is compiled the first time
it is used (10-25 s on this CPU); the C++ kernels and autotuning results are kept on disk
(``TORCHINDUCTOR_CACHE_DIR``, by default under the project's cache), so a second start skips the C++
build and the benchmarks, though inductor re-lowers each frozen graph (it does not cache graphs whose
weights are packed oneDNN tensors). Calls that fit no bucket (a custom head, scattered rows, too many
tokens, the end of the 448 positions) run the eager module.

Exactness: compiled and eager kernels round differently (logits agree to ~1e-4), and a one-token step
and a many-token verification pass are different graphs. What is guaranteed and tested is the argmax:
AR with one-token steps and speculative decoding with verification passes pick the same tokens on
every dev file (``tests/test_compiled.py``, and the harness's identity check on every run).
On CUDA the same steps are captured as CUDA graphs (inductor's cudagraphs); that path is untested here.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable

import torch

from specasr_vllm.config import cache_dir
from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.whisper import FixedView, StepInputs, Whisper, WhisperDims, step_inputs

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16)  # rows per call, padded up to one of these
WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32)  # new tokens per row, padded up to one of these


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n``, or None."""
    return next((b for b in buckets if b >= n), None)


def compile_options(device: torch.device) -> dict:
    """Inductor's options: frozen, autotuned weights on CPU; CUDA graphs on a GPU (launch-bound steps).
    Autotuning reports stay in inductor's logs instead of stderr."""
    quiet = {"max_autotune": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
    if device.type == "cuda":
        return {**quiet, "triton.cudagraphs": True}
    return {**quiet, "freezing": True}


class CompiledWhisper:
    """A ``Whisper`` whose ``decode`` and ``encode`` run compiled graphs where the shapes allow.

    It offers the interface the engine uses (``decode``, ``encode``, ``cross_kv``, caches, ``dims``);
    ``eager`` is the wrapped module, for code that hooks into its layers.
    """

    def __init__(self, model: Whisper):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        # one compiled entry per (rows, width, frames) bucket, all from the same function
        limit = 2 * len(ROW_BUCKETS) * len(WIDTH_BUCKETS) + 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        self.eager = model.eval()
        # inductor reads these while compiling, which happens inside a call; freezing only takes effect
        # when set in the global config during the call (an ``options=`` dict leaves the weights unfrozen)
        self._options = compile_options(model.device)
        self._step = torch.compile(self._run_step, dynamic=False)
        self._encoder = torch.compile(model.encoder, dynamic=False)
        self.compiled: dict[tuple, float] = {}  # each shape compiled so far -> seconds its first call took
        self.eager_calls = 0  # decode calls that fit no bucket

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

    def cross_kv(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eager.cross_kv(audio_features)

    def empty_cache(self, rows: int) -> DecoderCache:
        return self.eager.empty_cache(rows)

    def new_cache(self, audio_features: torch.Tensor) -> DecoderCache:
        return self.eager.new_cache(audio_features)

    def warm(self, rows: int = 1) -> float:
        """Compile the encoder and every width bucket for ``rows`` rows now (a server's start, a benchmark's
        warm-up) instead of at first use; returns the seconds it took."""
        began = time.perf_counter()
        d = self.dims
        features = self.encode(torch.zeros(1, d.n_mels, 2 * d.max_source_positions, device=self.device))
        cache = self.empty_cache(bucket(rows, ROW_BUCKETS) or rows)
        claimed = cache.claim(*self.cross_kv(features.expand(rows, -1, -1)))
        for width in WIDTH_BUCKETS:
            self.decode(torch.zeros(rows, width, dtype=torch.long, device=self.device), cache, claimed)
            for row in claimed:
                cache.set_length(row, 0)
        return time.perf_counter() - began

    # ---- compiled paths ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Full 30 s windows go through the encoder compiled for one window, one window at a time (the
        encoder's matrices are large enough that batching windows gains little); other lengths run eager."""
        d = self.dims
        if mel.shape[-1] != 2 * d.max_source_positions:
            return self.eager.encode(mel)
        mel = mel.to(self.device, self.dtype)
        return torch.cat([self._first_call(("encoder",), lambda i=i: self._encoder(mel[i : i + 1]))
                          for i in range(mel.shape[0])])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int] | None = None,
               tree_mask: torch.Tensor | None = None, depths: torch.Tensor | None = None,
               head: Callable[[torch.Tensor], torch.Tensor] | None = None, fixed: bool = False) -> torch.Tensor:
        """``Whisper.decode``'s contract, through a compiled step padded to the smallest bucket that fits."""
        batch, n = tokens.shape
        rows = list(range(batch)) if rows is None else rows
        shape = None if head is not None else self._bucket(cache, rows, n)
        if shape is None:
            self.eager_calls += 1
            return self.eager.decode(tokens, cache, rows, tree_mask, depths, head, fixed)
        padded_rows, width = shape
        dev = self.device
        pad_tokens = torch.zeros(padded_rows, width, dtype=torch.long, device=dev)
        pad_tokens[:batch, :n] = tokens.to(dev, non_blocking=True)
        # padding tokens see only themselves and sit at depth 0; real tokens keep their tree and depths
        pad_mask = torch.eye(width, dtype=torch.bool, device=dev).repeat(padded_rows, 1, 1)
        pad_mask[:batch, :n, :n] = (torch.ones(n, n, dtype=torch.bool, device=dev).tril() if tree_mask is None
                                    else tree_mask.to(dev, non_blocking=True))
        pad_depths = torch.zeros(padded_rows, width, dtype=torch.long, device=dev)
        pad_depths[:batch, :n] = torch.arange(n, device=dev) if depths is None else depths.to(dev, non_blocking=True)
        spare = padded_rows - batch
        starts = cache.lengths(rows) + [0] * spare
        frames = cache.frames(rows) + [cache.cross_k[0].shape[2]] * spare
        step = step_inputs(starts, width, pad_mask, pad_depths, cache.capacity, frames, cache.cross_k[0].shape[2], dev)
        block = slice(rows[0], rows[0] + padded_rows)
        view = [[t[block] for t in tensors] for tensors in (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v)]
        key = (padded_rows, width, cache.cross_k[0].shape[2])
        logits = self._first_call(key, lambda: self._step(pad_tokens, step.positions, step.slots, step.mask,
                                                           step.audio_mask, *view))
        cache.advance(rows, n)
        return logits[:batch, :n]

    def _run_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                  audio_mask: torch.Tensor, self_k: list[torch.Tensor], self_v: list[torch.Tensor],
                  cross_k: list[torch.Tensor], cross_v: list[torch.Tensor]) -> torch.Tensor:
        """The function that is compiled: the eager decoder over one block of cache rows."""
        step = StepInputs(positions, slots, mask, audio_mask, self_k[0].shape[2])
        return self.eager.run_decoder(tokens, step, FixedView(self_k, self_v, cross_k, cross_v))

    def _bucket(self, cache: DecoderCache, rows: list[int], n: int) -> tuple[int, int] | None:
        """(rows, width) of the compiled step for this call, or None where only the eager module fits."""
        padded_rows, width = bucket(len(rows), ROW_BUCKETS), bucket(n, WIDTH_BUCKETS)
        if padded_rows is None or width is None:
            return None
        if rows != list(range(rows[0], rows[0] + len(rows))) or rows[0] + padded_rows > cache.rows:
            return None
        if not cache.is_free(range(rows[0] + len(rows), rows[0] + padded_rows)):
            return None
        if max(cache.lengths(rows)) + width > cache.capacity:
            return None
        return padded_rows, width

    def _first_call(self, key: tuple, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``call``; the first time for ``key`` (a compilation), log and keep how long it took."""
        with torch._inductor.config.patch(self._options):
            if key in self.compiled:
                return call()
            began = time.perf_counter()
            with warnings.catch_warnings():  # inductor's autotuner touches TypedStorage while compiling
                warnings.simplefilter("ignore", UserWarning)
                out = call()
        self.compiled[key] = time.perf_counter() - began
        log.info("compiled %s in %.1f s", key, self.compiled[key])
        return out
