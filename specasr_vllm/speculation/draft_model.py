"""The draft model, made cheap. The target decides every token, so anything that makes the draft
faster keeps the output exact and only changes how often drafts are accepted:

- the output layer covers only the first ``draft_vocab`` ids plus end-of-text (byte-level BPE ids
  are ordered by merge frequency, so the first 16k cover nearly all running text), which removes most
  of the 51k-way projection that dominates a small decoder's step;
- dynamic int8 quantisation of the decoder's linear layers (and that output layer) on CPU;
- the encoder may run on the unpadded audio (see ``encode``), and compiled, and on a CPU with native
  bfloat16 (AVX512-BF16 or AMX) in bfloat16: tiny.en over 12 s of audio, 2 threads, compiled 36.7 -> 26.7 ms,
  eager 59.5 -> 29.0 ms, its features within 1% of fp32's (what the draft proposes may change, never the output);
  its cross-attention K/V are then kept in bfloat16 as well (``empty_cache``);
- with ``compile``, every one-row call (greedy steps and the catch-up pass that opens each round) runs as
  one frozen TorchScript graph on a CPU, over only the cache slots and audio frames the row holds:
  inductor does not compile int8 dynamic-quantised linears into a graph, and in eager mode the step
  pays more for Python dispatch than for arithmetic. In the loop (8 dev files, 2 threads) a draft
  forward cost 1.76 ms with a one-token graph over every slot and frame and eager catch-up passes,
  and 1.29-1.35 ms this way (``benchmarks.components``). On a GPU, where an eager step is
  launch-bound, every call over a block of rows (greedy steps, catch-up passes, branches) is replayed
  as a captured CUDA graph (``StepGraphs``), and greedy drafting runs ``SpecConfig.draft_run`` steps per
  graph (``run``): each step's best token feeds the next on the device, so the host reads a run of
  choices at once instead of paying its own per-step overhead (inputs, launch, copy back) for each token.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from specasr_vllm.config import N_FRAMES, SpecConfig
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.kv_cache import DecoderCache, FixedView, OneRowView
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import Suppression
from specasr_vllm.models.step_graphs import WIDTHS, StepGraphs, padded_step
from specasr_vllm.models.whisper import Cast, StepInputs, Whisper, block_step, row_step


class DraftModel:
    def __init__(self, asr: ASRModel, config: SpecConfig, compile: bool = False, graphs: bool | None = None):
        """``compile``: on a CPU the encoder runs as a compiled graph for any audio length (``CompiledWhisper``)
        and one row's decoder calls as a frozen TorchScript graph; on a GPU every call over a block of
        rows runs as a CUDA graph (``choices``) and the encoder eager. ``graphs`` overrides the device's choice
        of CUDA graphs (on a CPU: the same steps uncaptured, how tests check them; False: eager on a GPU)."""
        self.asr = asr
        self.model = asr.model
        on_cpu = asr.model.device.type == "cpu"
        graphs = compile and not on_cpu if graphs is None else graphs
        encoder = asr.model
        bf16 = on_cpu and config.draft_bf16_audio and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self._cross_dtype = torch.bfloat16 if bf16 else None  # the cache's cross K/V (``empty_cache``)
        if bf16:
            encoder = Whisper(asr.model.dims, encoder=Cast(asr.model.encoder, torch.bfloat16),
                              decoder=asr.model.decoder)
        self._encoder = CompiledWhisper(encoder) if compile and on_cpu else encoder  # eager on a GPU
        tok = asr.tokenizer
        vocab = self.model.dims.vocab_size
        weight = self.model.decoder.embed_tokens.weight
        device = weight.device
        keep = torch.arange(min(config.draft_vocab or vocab, tok.eot), device=device)
        self.ids = torch.cat([keep, torch.tensor([tok.eot], device=device)])  # output index -> token id
        self.head = nn.Linear(weight.shape[1], len(self.ids), bias=False, device=device, dtype=weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight[self.ids])
        if config.draft_int8 and weight.device.type == "cpu":
            with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated but works in 2.13
                warnings.simplefilter("ignore")
                quantize = torch.ao.quantization.quantize_dynamic
                self.model = Whisper(self.model.dims, encoder=self.model.encoder,
                                     decoder=quantize(self.model.decoder, {nn.Linear}, dtype=torch.qint8))
                self.head = quantize(nn.Sequential(self.head), {nn.Linear}, dtype=torch.qint8)
        rules = Suppression(vocab, asr.suppress_tokens, asr.begin_suppress_tokens, device)  # Whisper's, in one place
        self.suppress, self.begin_suppress = rules.suppress[self.ids], rules.begin_suppress[self.ids]
        self._graph_step = compile and on_cpu and not graphs
        self._step: torch.jit.ScriptModule | None = None  # traced at the first one-row call
        self._block_steps: dict[int, torch.jit.ScriptModule] = {}  # one-token steps of a block of rows, by rows
        self.graph_calls = 0  # one-row calls served by the TorchScript graph
        self.graphs = StepGraphs(_DraftStep(self.model, self.head, self.suppress, self.begin_suppress, self.ids),
                                 device) if graphs else None
        # greedy steps per call: a run of them in one graph where steps are graphs, else one at a time
        self.run_length = config.draft_run if graphs else 1
        self._runs = StepGraphs(_DraftRun(self.model, self.head, self.suppress, self.begin_suppress, self.ids,
                                          self.run_length), device) if self.run_length > 1 else None
        # the encoder's input is cut to the audio's frames (``SpecConfig.draft_unpadded``), rounded up to this, and
        # ``warm`` encodes every such length once: the first call at a length pays for its own setup (oneDNN's
        # kernels for the shape) and requests rarely share one. On a CPU a second of audio: 30 lengths (Xeon, 32
        # dev files, interleaved, with the cross K/V: 40 ms a file at new even lengths, 33 ms at warmed whole
        # seconds, the padding included); on a GPU a third of a window, where the eager encoder is launch-bound
        # (padding costs it nothing) and a new length is dear (H200, fp16: 60 ms against 1.5 ms at a repeated one)
        self.frame_multiple = N_FRAMES // 30 if on_cpu else N_FRAMES // 3

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._encoder.encode(mel)

    def empty_cache(self, rows: int) -> DecoderCache:
        """The draft's cache; on a CPU with native bfloat16 its cross K/V in bfloat16: a step of several rows is
        bound by reading them (8 rows over 15 s of audio, the Xeon CPU: 9.3 ms a step in float32, 6.0 in bfloat16;
        one row 2.2 -> 2.0-2.2 ms)."""
        return self.model.empty_cache(rows, self._cross_dtype)

    def cross_kv(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.cross_kv(features)

    def decode(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None = None,
               depths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities over the draft's output ids, Whisper's suppression applied (not begin rules)."""
        return _log_probs(self.model.decode(tokens, cache, rows, tree_mask, depths, head=self.head), self.suppress)

    def choices(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None,
                depths: torch.Tensor | None, begin: dict[int, int]) -> torch.Tensor:
        """The two best token ids and their probabilities at every new token, on the host: (2, batch, n, 2),
        ids (as floats) then probabilities, read from the device in one transfer. ``begin[b] = i``: Whisper's
        begin rules apply at row ``b``'s new token ``i``. Each row's cache grows by ``n`` (as ``decode``)."""
        batch, n = tokens.shape
        at_begin = torch.zeros(batch, n, dtype=torch.bool, device="cpu" if begin else self.device)
        if begin:
            for b, i in begin.items():
                at_begin[b, i] = True
            at_begin = at_begin.to(self.device, non_blocking=True)
        block = rows == list(range(rows[0], rows[0] + batch))  # contiguous rows: one view of the cache serves them
        if self._graph_step and batch == 1:
            return self._row_graph(tokens, cache, rows[0], tree_mask, depths, at_begin)
        if self._graph_step and n == 1 and block:
            return self._block_graph(tokens, cache, rows, at_begin)
        if self.graphs is not None and block:
            return self._replay(tokens, cache, rows, tree_mask, depths, at_begin)
        logits = self.model.decode(tokens, cache, rows, tree_mask, depths, head=self.head)
        return _choose(logits, self.suppress, self.begin_suppress, at_begin, self.ids).cpu()

    def _replay(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None,
                depths: torch.Tensor | None, at_begin: torch.Tensor) -> torch.Tensor:
        """``choices`` through a captured graph of the whole step (decoder, head, suppression, top two) over a
        ``FixedView`` of the block of rows: its shapes depend only on the rows and new tokens."""
        n = tokens.shape[1]
        inputs, state = padded_step(tokens, cache, rows, tree_mask, depths, self.device)  # as the target's
        out = self.graphs((*inputs, F.pad(at_begin, (0, inputs[0].shape[1] - n))), state)
        cache.advance(rows, n)
        return out[:, :, :n].cpu()

    def run(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int]) -> torch.Tensor:
        """``run_length`` greedy steps in one call over the contiguous block ``rows``, one token per row in:
        (2, batch, run_length, 2) on the host, as ``choices`` gives for one step each, where step ``i + 1`` was
        fed step ``i``'s best token. No begin rules (greedy steps never open a round). Each row's cache grows by
        ``run_length``: slot ``start + i`` holds the K/V of the token fed at step ``i``, so a caller that keeps
        ``j`` of the run's tokens keeps exactly the slots a step-by-step draft would have written."""
        if self._runs is None:
            raise RuntimeError("runs of draft steps need the draft's steps as graphs (SpecConfig.draft_run > 1)")
        if max(cache.lengths(rows)) + self.run_length > cache.capacity:
            raise ValueError(f"a run of {self.run_length} draft steps exceeds {cache.capacity} positions")
        inputs, state = block_step(tokens, cache, rows, None, None, self.device)
        out = self._runs(inputs, state)
        cache.advance(rows, self.run_length)
        return out.cpu()

    def warm(self, cache: DecoderCache, rows: int = 1, reserve: int = 1) -> None:
        """Before serving, on ``cache`` (the drafter's): run the encoder once at every input length requests meet
        (``frame_multiple``; the first call also compiles it), trace the one-row graph and the block graphs of up to
        ``rows`` rows (a CPU with ``compile``: tracing one costs up to 0.7 s, which a batch would pay in its decode),
        and capture the step graphs (a GPU) for one row and for ``rows`` rows at every bucketed width
        (``step_graphs.WIDTHS``); the cache is first grown to ``reserve`` rows (with the tree's branch rows) and a
        30 s window's frames, so that requests within those bounds never move it."""
        d = self.model.dims
        for frames in range(self.frame_multiple, N_FRAMES + 1, self.frame_multiple):
            features = self.encode(torch.zeros(1, d.n_mels, frames, device=self.device))
        if self._graph_step:  # the one-row graph, and a block graph for each number of rows up to ``rows``
            claimed = cache.claim(*self.cross_kv(features.repeat(rows, 1, 1)))
            try:
                for batch in range(1, rows + 1):
                    tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
                    self.choices(tokens, cache, claimed[:batch], None, None, {})
                    for row in claimed:
                        cache.set_length(row, 0)
            finally:
                cache.release(claimed)
        if self.graphs is None:
            return
        cache.reserve(max(rows, reserve), d.max_source_positions)
        for batch in sorted({1, rows}):
            claimed = cache.claim(*self.cross_kv(features.repeat(batch, 1, 1)))
            try:
                for width in WIDTHS:
                    tokens = torch.zeros(batch, width, dtype=torch.long, device=self.device)
                    self.choices(tokens, cache, claimed, None, None, {})
                    for row in claimed:
                        cache.set_length(row, 0)
                if self._runs is not None:
                    self.run(torch.zeros(batch, 1, dtype=torch.long, device=self.device), cache, claimed)
                    for row in claimed:
                        cache.set_length(row, 0)
            finally:
                cache.release(claimed)

    @torch.no_grad()
    def _row_graph(self, tokens: torch.Tensor, cache: DecoderCache, row: int, tree_mask: torch.Tensor | None,
                   depths: torch.Tensor | None, at_begin: torch.Tensor) -> torch.Tensor:
        """``choices`` for one row, through the frozen graph: greedy steps and catch-up passes (pending tokens
        and recycled candidates under a tree mask) alike. The row's own K/V go in (``whisper.row_step``: the
        slots it holds, its own audio frames), and the traced operations take their sizes from their inputs,
        so one graph serves every width, context and audio length. One row only: the tracer records the
        number of rows as a constant (blocks of rows: ``_block_graph``)."""
        step, kv = row_step(tokens, cache, row, tree_mask, depths, self.device)
        inputs = (*step, at_begin, *kv)
        if self._step is None:
            self._step = _frozen(_RowStep(self.model, self.head, self.suppress, self.begin_suppress, self.ids), inputs)
        return self._run_graph(self._step, inputs, cache, [row], tokens.shape[1])

    @torch.no_grad()
    def _block_graph(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int], at_begin: torch.Tensor
                     ) -> torch.Tensor:
        """``choices`` for one token in each row of a block (greedy steps, and catch-up passes of one pending token,
        of several requests drafting together) through a frozen graph traced for that many rows: the tracer records
        the number of rows and of new tokens as constants, and takes the cache's span and the audio frames from its
        inputs (``whisper.block_step`` with a granule). 8 rows, the Xeon CPU: 6.1 ms against 7.5 ms eager."""
        step, kv = block_step(tokens, cache, rows, None, None, self.device, granule=64)
        inputs = (*step, at_begin, *kv)
        if len(rows) not in self._block_steps:
            self._block_steps[len(rows)] = _frozen(
                _DraftStep(self.model, self.head, self.suppress, self.begin_suppress, self.ids), inputs)
        return self._run_graph(self._block_steps[len(rows)], inputs, cache, rows, 1)

    def _run_graph(self, graph: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...], cache: DecoderCache,
                   rows: list[int], n: int) -> torch.Tensor:
        """One call of a frozen step; ``rows`` advance by the ``n`` tokens whose K/V it wrote (after a trace, the
        same K/V a second time: a no-op)."""
        out = graph(*inputs)
        cache.advance(rows, n)
        self.graph_calls += 1
        return out.cpu()


def _frozen(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """``module`` traced on ``inputs`` (running it once) and frozen: one TorchScript graph, weights as constants."""
    with warnings.catch_warnings():  # the tracer warns about Python values it records as constants
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), inputs, check_trace=False))


def _log_probs(logits: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float().masked_fill(suppress, float("-inf")), dim=-1)


def _choose(logits: torch.Tensor, suppress: torch.Tensor, begin_suppress: torch.Tensor, at_begin: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
    """(2, batch, n, 2): the two best output indices mapped to token ids (as floats), and their probabilities,
    under Whisper's suppression; ``begin_suppress`` where ``at_begin`` is applied after the softmax (those
    probabilities are not renormalised: the draft only ranks, and the target decides)."""
    logp = _log_probs(logits, suppress).masked_fill(at_begin[..., None] & begin_suppress, float("-inf"))
    values, index = logp.topk(2, dim=-1)
    return torch.stack([ids[index].to(values.dtype), values.exp()])


class _DraftStep(nn.Module):
    """One draft step as a module of plain tensors (what TorchScript traces): decoder over a ``FixedView``,
    the draft's head and suppression, and the top two choices."""

    def __init__(self, model: Whisper, head: nn.Module, suppress: torch.Tensor, begin_suppress: torch.Tensor,
                 ids: torch.Tensor):
        super().__init__()
        self.model, self.head = model, head
        self.register_buffer("suppress", suppress)
        self.register_buffer("begin_suppress", begin_suppress)
        self.register_buffer("ids", ids)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                audio_mask: torch.Tensor, at_begin: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        return self.run(StepInputs(positions, slots, mask, audio_mask, kv[0].shape[2]), tokens, at_begin, kv)

    def run(self, step: StepInputs, tokens: torch.Tensor, at_begin: torch.Tensor, kv: tuple[torch.Tensor, ...],
            view_type: type[FixedView] = FixedView) -> torch.Tensor:
        n = self.model.dims.decoder_layers
        view = view_type(list(kv[:n]), list(kv[n : 2 * n]), list(kv[2 * n : 3 * n]), list(kv[3 * n :]))
        logits = self.model.run_decoder(tokens, step, view, self.head)
        return _choose(logits, self.suppress, self.begin_suppress, at_begin, self.ids)


class _DraftRun(_DraftStep):
    """``steps`` greedy draft steps as one module over a ``FixedView``: step ``i`` feeds step ``i - 1``'s best
    token at the next position and slot, so a captured graph of it drafts ``steps`` tokens in one replay.
    Its inputs are one step's (``whisper.block_step`` of one token per row, a chain); the outputs of every
    step are stacked along the token axis: (2, batch, steps, 2)."""

    def __init__(self, model: Whisper, head: nn.Module, suppress: torch.Tensor, begin_suppress: torch.Tensor,
                 ids: torch.Tensor, steps: int):
        super().__init__(model, head, suppress, begin_suppress, ids)
        self.steps = steps

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                audio_mask: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        span = kv[0].shape[2]
        slot = torch.arange(span, device=positions.device)
        at_begin = torch.zeros_like(tokens, dtype=torch.bool)
        outs = []
        for i in range(self.steps):  # a chain: the token at position p sees the slots up to p (step_inputs' rule)
            step = StepInputs(positions + i, slots + i, (slot <= (positions + i)[..., None])[:, None], audio_mask, span)
            outs.append(self.run(step, tokens, at_begin, kv))
            tokens = outs[-1][0, :, :, 0].long()  # the best id (exact as a float)
        return torch.cat(outs, dim=2)


class _RowStep(_DraftStep):
    """One row's step over the K/V it holds (``whisper.row_step``): no audio mask."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                at_begin: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        return self.run(StepInputs(positions, slots, mask, None, kv[0].shape[2]), tokens, at_begin, kv, OneRowView)
