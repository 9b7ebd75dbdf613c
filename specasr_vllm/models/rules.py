"""Whisper's greedy decoding rules, in one place for every decoder (AR, draft, verification, vLLM).

- ``suppress_tokens`` never appear;
- ``begin_suppress_tokens`` (a blank and end-of-text) cannot be the first token after the prefix;
- language detection is the argmax over language tokens after <|startoftranscript|>.
"""

from __future__ import annotations

import torch

from specasr_vllm.models.registry import ASRModel


class WhisperRules:
    def __init__(self, asr: ASRModel):
        vocab = asr.model.dims.vocab_size
        device = asr.model.device
        self.eot = asr.tokenizer.eot
        self.suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.suppress[[t for t in asr.suppress_tokens if t < vocab]] = True
        self.begin_suppress = self.suppress.clone()
        self.begin_suppress[[t for t in asr.begin_suppress_tokens if t < vocab]] = True
        self.language_ids = asr.tokenizer.language_ids

    def mask(self, logits: torch.Tensor, first: torch.Tensor | bool = False) -> torch.Tensor:
        """``logits`` (..., vocab) with forbidden tokens at -inf; ``first`` marks positions right after the prefix."""
        first = torch.as_tensor(first, device=logits.device)
        forbidden = torch.where(first[..., None], self.begin_suppress, self.suppress)
        return logits.masked_fill(forbidden, float("-inf"))

    def greedy(self, logits: torch.Tensor, first: torch.Tensor | bool = False) -> torch.Tensor:
        return self.mask(logits, first).argmax(-1)

    def detect_language(self, sot_logits: torch.Tensor) -> list[str]:
        """Language codes from (batch, vocab) logits at <|startoftranscript|>."""
        codes = list(self.language_ids)
        ids = torch.tensor([self.language_ids[c] for c in codes], device=sot_logits.device)
        return [codes[i] for i in sot_logits[:, ids].argmax(-1).tolist()]
