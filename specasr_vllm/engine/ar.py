"""Greedy autoregressive decoding: the baseline every speedup is measured against, and the reference
output every speculative method must reproduce token for token.
"""

from __future__ import annotations

import torch

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import WhisperRules


@torch.no_grad()
def decode_ar(asr: ASRModel, rules: WhisperRules, audio_features: torch.Tensor, prefixes: list[list[int]],
              max_positions: int = MAX_TARGET_POSITIONS) -> list[list[int]]:
    """Generated tokens (end-of-text excluded) for each row; all prefixes have the same length, and
    prefix plus output stop at ``max_positions`` (Whisper's 448 by default).

    One decoder step per token for the whole batch; rows that finish leave the batch so the rest
    stop paying for them.
    """
    model = asr.model
    cache = model.new_cache(audio_features)
    prefix = torch.tensor(prefixes, device=model.device)
    logits = model.decode(prefix, cache)[:, -1]
    outputs: list[list[int]] = [[] for _ in prefixes]
    active = list(range(len(prefixes)))  # original row of each cache row
    first = True
    while active:
        tokens = rules.greedy(logits, first).tolist()
        first = False
        keep = []
        for i, (row, tok) in enumerate(zip(active, tokens)):
            if tok != rules.eot:
                outputs[row].append(tok)
            if tok != rules.eot and prefix.shape[1] + len(outputs[row]) < max_positions:
                keep.append(i)
        if len(keep) < len(active):
            cache = cache.select(keep)
            active = [active[i] for i in keep]
        if not active:
            break
        step = torch.tensor([[outputs[row][-1]] for row in active], device=model.device)
        logits = model.decode(step, cache)[:, -1]
    return outputs
