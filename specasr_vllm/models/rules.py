"""Whisper's greedy decoding rules, in one place for every decoder (AR, draft, verification, vLLM).

- ``suppress_tokens`` never appear;
- ``begin_suppress_tokens`` (a blank and end-of-text) cannot be the first token after the prefix;
- with timestamps, the timestamp grammar of Whisper's reference decoder: the text starts with a
  timestamp no later than ``MAX_INITIAL_TIMESTAMP``, timestamps come in pairs around each segment and
  never go back in time, and a timestamp is forced wherever the timestamps' total probability beats
  every single text token;
- language detection is the argmax over language tokens after <|startoftranscript|>.

Every rule is a function of the logits at one position and the tokens generated before it, so a
speculative verifier that applies them per tree node reproduces autoregressive decoding exactly. So is
temperature sampling (``models/sampling.py``): its noise depends on the position alone.
"""

from __future__ import annotations

import torch

from specasr_vllm.config import MAX_INITIAL_TIMESTAMP
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.tokenizer import TIME_PRECISION, WhisperTokenizer


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The best id of each row of (..., vocab) scores: ``argmax(-1)``, through ``max(-1)``, which picks the same
    index (the first of tied maxima, a NaN if any) and cost 2.5x less on the 2-core CPU (8 x 51865 floats: 0.11
    against 0.28 ms; one row: 0.02 against 0.07 ms)."""
    return logits.max(-1).indices


class Suppression:
    """Whisper's token suppression alone: the rules that hold with or without timestamps.

    The vLLM plugin applies exactly this to vLLM's logits, so vLLM and the embedded engine agree.
    """

    def __init__(self, vocab: int, suppress_tokens: list[int], begin_suppress_tokens: list[int],
                 device: torch.device | str = "cpu"):
        self.suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.suppress[[t for t in suppress_tokens if t < vocab]] = True
        self.begin_suppress = self.suppress.clone()
        self.begin_suppress[[t for t in begin_suppress_tokens if t < vocab]] = True
        # the same as ids: a verification pass's (n, 51865) logits are then masked by writing ~90 columns, not
        # by a full-size boolean select (which cost more than the argmax on the 2-core CPU)
        self.ids = self.suppress.nonzero()[:, 0]
        self._begin_ids = (self.begin_suppress & ~self.suppress).nonzero()[:, 0]
        self.suppressed = frozenset(self.ids.tolist())  # the same on the host, to check chosen ids against

    def mask(self, logits: torch.Tensor, first: torch.Tensor | bool = False) -> torch.Tensor:
        """``logits`` (..., vocab) with forbidden tokens at -inf; ``first`` marks positions right after the prefix
        (a bool for all of them, or a bool tensor of the leading shape)."""
        out = logits.index_fill(-1, self.ids, float("-inf"))
        if isinstance(first, bool):
            return out.index_fill_(-1, self._begin_ids, float("-inf")) if first else out
        first = first.to(logits.device, non_blocking=True)
        begin = out.index_select(-1, self._begin_ids).masked_fill(first[..., None], float("-inf"))
        return out.index_copy_(-1, self._begin_ids, begin)


class TimestampRules:
    """Whisper's timestamp grammar alone, from the tokenizer's ids: what the embedded engine's ``WhisperRules``
    and the vLLM plugin's ``_sample`` hook both apply to rows that decode with timestamps."""

    def __init__(self, tokenizer: WhisperTokenizer):
        self.eot = tokenizer.eot
        self.no_timestamps = tokenizer.no_timestamps
        self.timestamp_begin = tokenizer.timestamp_begin
        self.max_initial = self.timestamp_begin + round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION)

    def mask(self, logits: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
        """(n, vocab) logits under the timestamp grammar; ``contexts[i]``: the tokens generated before row ``i``."""
        logits = logits.clone()
        ts = self.timestamp_begin
        logits[:, self.no_timestamps] = float("-inf")
        for i, seq in enumerate(contexts):
            row = logits[i]
            if not seq:  # the first token is a timestamp, and an early one
                row[:ts] = float("-inf")
                row[self.max_initial + 1 :] = float("-inf")
                continue
            last_ts = seq[-1] >= ts
            penultimate_ts = len(seq) < 2 or seq[-2] >= ts
            if last_ts:
                if penultimate_ts:  # a closed pair: text (or the end) follows
                    row[ts:] = float("-inf")
                else:  # an open segment just ended: another timestamp (or the end) follows
                    row[: self.eot] = float("-inf")
            stamps = [t for t in seq if t >= ts]
            if stamps:  # never back in time; a new segment starts after the last one ended
                floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
                row[ts:floor] = float("-inf")
        logprobs = logits.float().log_softmax(-1)
        timestamp_wins = logprobs[:, ts:].logsumexp(-1) > logprobs[:, :ts].max(-1).values
        logits[timestamp_wins, :ts] = float("-inf")
        return logits


class WhisperRules:
    """The embedded engine's rules for one target: suppression, the timestamp grammar, how a token is picked
    (greedy or sampled) and its log-probability, the no-speech probability and language detection."""

    def __init__(self, asr: ASRModel):
        vocab = asr.model.dims.vocab_size
        device = asr.model.device
        tok = asr.tokenizer
        self.eot = tok.eot
        self.sot = tok.sot
        self.no_speech = tok.no_speech
        self.suppression = Suppression(vocab, asr.suppress_tokens, asr.begin_suppress_tokens, device)
        self.mask = self.suppression.mask
        self.timestamp_mask = TimestampRules(tok).mask
        self.language_ids = tok.language_ids

    def pick(self, logits: torch.Tensor, first: torch.Tensor | bool = False,
             contexts: list[list[int]] | None = None,
             noise: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        """The token and its log-probability for each row of (n, vocab) logits: greedy, or with
        ``noise`` ((n, vocab) float32, ``Sampling.noise``) the Gumbel-max sample ``argmax(masked + noise)``.

        ``contexts`` switches on timestamps (and then also decides which rows are first). The noise is
        added after every rule, so a sample never breaks one. The log-probability is always that of
        the unscaled distribution (as openai-whisper and transformers report ``avg_logprob``).
        """
        masked, best = self._choose(logits, first, contexts, noise)
        masked = masked.float()
        logprobs = masked.gather(-1, best[:, None])[:, 0] - masked.logsumexp(-1)
        return best.tolist(), logprobs.tolist()  # one wait for the device: the second read is ready

    def choose(self, logits: torch.Tensor, first: torch.Tensor | bool = False,
               contexts: list[list[int]] | None = None,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """``pick``'s tokens, and the logits under the rules (for ``logprobs``): a verifier takes the
        log-probabilities of the rows it keeps only (a pass of 16 nodes keeps about 6). With the suppression
        alone and no favourite suppressed, the logits come back as given: masking a copy of a verification
        pass's (n, 51865) logits cost ~0.17 ms in the loop, and ``logprobs`` masks the rows it reads."""
        if contexts is None and noise is None and first is False:
            best = greedy(logits).tolist()
            # a favourite that is allowed is also the favourite among the allowed ids (ties go to the lowest id, so
            # a suppressed id tying with it and lower would have been chosen): the masked copy is not needed
            if self.suppression.suppressed.isdisjoint(best):
                return logits, best
        masked, best = self._choose(logits, first, contexts, noise)
        return masked, best.tolist()

    def _choose(self, logits: torch.Tensor, first: torch.Tensor | bool, contexts: list[list[int]] | None,
                noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if contexts is not None:
            first = torch.tensor([not c for c in contexts], device=logits.device)
        masked = self.mask(logits, first)
        if contexts is not None:
            masked = self.timestamp_mask(masked, contexts)
        return masked, greedy(masked if noise is None else masked.float() + noise)

    def logprobs(self, masked: torch.Tensor, rows: list[int], tokens: list[int]) -> list[float]:
        """Log-probabilities of ``tokens`` at ``rows`` of ``choose``'s logits, without materialising the whole
        log-softmax. The suppression is applied again to the rows read (``choose`` returns its input unmasked
        when no position's favourite is suppressed; on masked logits it changes nothing)."""
        if not rows:
            return []
        index, chosen_ids = torch.tensor([rows, tokens], device=masked.device)  # one upload
        picked = masked[index].float().index_fill_(-1, self.suppression.ids, float("-inf"))  # a copy: fill in place
        chosen = picked.gather(-1, chosen_ids[:, None])[:, 0]
        return (chosen - picked.logsumexp(-1)).tolist()

    def no_speech_prob(self, prefill_logits: torch.Tensor, prefix: list[int]) -> list[float]:
        """Probability of <|nospeech|> at <|startoftranscript|>, from the (batch, len(prefix), vocab) prefill."""
        if self.no_speech is None:
            return [0.0] * prefill_logits.shape[0]
        return prefill_logits[:, prefix.index(self.sot)].float().softmax(-1)[:, self.no_speech].tolist()

    def detect_language(self, sot_logits: torch.Tensor) -> list[str]:
        """Language codes from (batch, vocab) logits at <|startoftranscript|>."""
        codes = list(self.language_ids)
        ids = torch.tensor([self.language_ids[c] for c in codes], device=sot_logits.device)
        return [codes[i] for i in sot_logits[:, ids].argmax(-1).tolist()]
