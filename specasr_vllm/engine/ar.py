"""Greedy autoregressive decoding: the baseline every speedup is measured against, and the reference
output every speculative method must reproduce token for token.
"""

from __future__ import annotations

import torch

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import WhisperRules


@torch.no_grad()
def decode_ar(asr: ASRModel, rules: WhisperRules, audio_features: torch.Tensor, prefixes: list[list[int]],
              max_positions: int = MAX_TARGET_POSITIONS, timestamps: bool = False) -> list[Decoded]:
    """One ``Decoded`` per row; all prefixes have the same length, and prefix plus output stop at
    ``max_positions`` (Whisper's 448 by default). ``timestamps`` applies the timestamp grammar.

    One decoder step per token for the whole batch; rows that finish leave the batch so the rest
    stop paying for them.
    """
    model = asr.model
    cache = model.new_cache(audio_features)
    prefix = torch.tensor(prefixes, device=model.device)
    prefill = model.decode(prefix, cache)
    outputs = [Decoded(no_speech_prob=p) for p in rules.no_speech_prob(prefill, prefixes[0])]
    logits = prefill[:, -1]
    active = list(range(len(prefixes)))  # original row of each cache row
    first = True
    while active:
        contexts = [outputs[row].tokens for row in active] if timestamps else None
        tokens, logprobs = rules.pick(logits, first, contexts)
        first = False
        keep = []
        for i, (row, tok, logprob) in enumerate(zip(active, tokens, logprobs)):
            outputs[row].extend([tok], [logprob], rules.eot)
            if tok != rules.eot and prefix.shape[1] + len(outputs[row].tokens) < max_positions:
                keep.append(i)
        if len(keep) < len(active):
            cache = cache.select(keep)
            active = [active[i] for i in keep]
        if not active:
            break
        step = torch.tensor([[outputs[row].tokens[-1]] for row in active], device=model.device)
        logits = model.decode(step, cache)[:, -1]
    return outputs
