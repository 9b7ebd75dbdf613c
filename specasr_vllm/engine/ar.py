"""Autoregressive decoding, greedy or seeded sampling: the baseline every speedup is measured against, and
the reference output every speculative method must reproduce token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.rows import BatchRows
from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.models.sampling import Sampling


@torch.no_grad()
def decode_ar(asr: ASRModel, rules: WhisperRules, audio_features: torch.Tensor, prefixes: list[list[int]],
              max_positions: int = MAX_TARGET_POSITIONS, timestamps: bool = False,
              cache: DecoderCache | None = None, sampling: Sampling | None = None) -> list[Decoded]:
    """One ``Decoded`` per row; all prefixes have the same length, and prefix plus output stop at
    ``max_positions`` (Whisper's 448 by default). ``timestamps`` applies the timestamp grammar.
    ``cache`` (optional) is a preallocated cache whose rows this batch claims and gives back.
    ``sampling`` (one seed per row of ``prefixes``) samples instead of picking greedily; the token a
    row picks after generating ``p`` tokens uses the noise of position ``p``.

    One decoder step per token for the whole batch; rows that finish leave the batch so the rest
    stop paying for them.
    """
    model = asr.model
    if sampling is not None and len(sampling.seeds) != len(prefixes):
        raise ValueError(f"{len(sampling.seeds)} sampling seeds for {len(prefixes)} rows")
    with BatchRows(model, audio_features, cache) as batch:
        prefill = model.decode(torch.tensor(prefixes, device=model.device), batch.cache, batch.rows)
        outputs = [Decoded(no_speech_prob=p) for p in rules.no_speech_prob(prefill, prefixes[0])]
        ar_steps(asr, rules, batch, outputs, [max_positions - len(p) for p in prefixes], timestamps, sampling,
                 logits=prefill[:, -1])
    return outputs


def ar_steps(asr: ASRModel, rules: WhisperRules, batch: BatchRows, outputs: list[Decoded], limit: list[int],
             timestamps: bool = False, sampling: Sampling | None = None, logits: torch.Tensor | None = None,
             emitted: Callable[[dict[int, int], float], None] | None = None) -> None:
    """AR steps for the rows of ``batch`` until each ends: ``outputs[i]`` grows by one token a step and stops at
    end-of-text or ``limit[i]`` tokens. ``logits`` (one row per active request) are the target's at each row's
    next position, right after the prefill (the first pick); without them each row's newest token is fed first
    (speculative decoding hands over here once no row drafts). ``emitted`` hears each step's tokens per request
    and the step's seconds.
    """
    model = asr.model
    first = logits is not None
    while batch.active:
        began = time.perf_counter()
        if logits is None:
            step = torch.tensor([[outputs[i].tokens[-1]] for i in batch.active], device=model.device)
            logits = model.decode(step, batch.cache, batch.rows)[:, -1]
        contexts = [outputs[i].tokens for i in batch.active] if timestamps else None
        noise = None if sampling is None else sampling.noise(
            batch.active, [len(outputs[i].tokens) for i in batch.active], logits.shape[-1], logits.device)
        tokens, logprobs = rules.pick(logits, first, contexts, noise)
        first, logits = False, None
        keep = []
        for pos, (i, tok, logprob) in enumerate(zip(batch.active, tokens, logprobs)):
            outputs[i].extend([tok], [logprob], rules.eot)
            outputs[i].passes += 1
            if tok != rules.eot and len(outputs[i].tokens) < limit[i]:
                keep.append(pos)
        if emitted is not None:
            emitted(dict(zip(batch.active, tokens)), time.perf_counter() - began)
        batch.keep(keep)
