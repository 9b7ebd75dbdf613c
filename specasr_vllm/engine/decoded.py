"""What a decoder returns for one window: the tokens, and what the API reports about them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decoded:
    tokens: list[int] = field(default_factory=list)  # generated tokens, end-of-text excluded
    logprobs: list[float] = field(default_factory=list)  # the target's log-probability of each token
    no_speech_prob: float = 0.0  # probability of <|nospeech|> at <|startoftranscript|>
    passes: int = 0  # target forwards that emitted tokens for this window (AR: one per token, end included)
    end_logprob: float = 0.0  # log-probability of the end-of-text token (0 when the window hit the length limit)
    temperature: float = 0.0  # of the decode (0: greedy)

    def extend(self, tokens: list[int], logprobs: list[float], eot: int) -> None:
        for token, logprob in zip(tokens, logprobs):
            if token != eot:
                self.tokens.append(token)
                self.logprobs.append(logprob)
            else:
                self.end_logprob = logprob

    @property
    def avg_logprob(self) -> float:
        """Mean log-probability over the tokens and the end of text, as Whisper's fallback measures it."""
        return (sum(self.logprobs) + self.end_logprob) / (len(self.tokens) + 1)
