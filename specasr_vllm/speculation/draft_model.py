"""The draft model, made cheap. The target decides every token, so anything that makes the draft
faster keeps the output exact and only changes how often drafts are accepted:

- the output layer covers only the first ``draft_vocab`` ids plus end-of-text (byte-level BPE ids
  are ordered by merge frequency, so the first 16k cover nearly all running text), which removes most
  of the 51k-way projection that dominates a small decoder's step;
- dynamic int8 quantisation of the decoder's linear layers (and that output layer) on CPU;
- the encoder may run on the unpadded audio (see ``encode``), and compiled.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from specasr_vllm.config import SpecConfig
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import Suppression
from specasr_vllm.models.whisper import Whisper


class DraftModel:
    def __init__(self, asr: ASRModel, config: SpecConfig, compile: bool = False):
        """``compile``: the encoder runs as a compiled graph for any audio length (``CompiledWhisper``); the
        decoder stays eager (its int8 kernels do not compile into one graph, and its head is its own)."""
        self.asr = asr
        self.model = asr.model
        self._encoder = CompiledWhisper(asr.model) if compile else asr.model
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

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._encoder.encode(mel)

    def empty_cache(self, rows: int) -> DecoderCache:
        return self.model.empty_cache(rows)

    def cross_kv(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.cross_kv(features)

    def decode(self, tokens: torch.Tensor, cache: DecoderCache, rows: list[int], tree_mask: torch.Tensor | None = None,
               depths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities over the draft's output ids, Whisper's suppression applied (not begin rules)."""
        logits = self.model.decode(tokens, cache, rows, tree_mask, depths, head=self.head)
        return torch.log_softmax(logits.float().masked_fill(self.suppress, float("-inf")), dim=-1)
