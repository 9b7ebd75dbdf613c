"""Token bridges between a draft's vocabulary and the target's.

Same vocabulary: ``IdentityBridge``, no work. Different vocabularies (tiny.en drafting for
multilingual base: only 270 ids mean the same bytes): ``TextBridge`` goes through bytes.
- Context: the target's accepted tokens become bytes, then the draft's own tokenisation of that text.
- Proposals: the draft's tokens become bytes, then the target's tokenisation, cut at the last
  pre-tokenizer boundary unless the draft's next token starts a new word (a half-drafted word
  retokenises differently once complete, so its target tokens would be wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tokenizers import pre_tokenizers

from specasr_vllm.models.tokenizer import WhisperTokenizer


@dataclass
class Mapped:
    tokens: list[int]  # target ids
    probs: list[float]  # per target token: the least confident draft token it overlaps
    draft_used: int  # how many draft tokens the mapped target tokens cover entirely


@dataclass
class TextSoFar:
    """One request's accepted target output as text, kept between passes by ``TextBridge.to_draft``.

    A request's output only grows, and a word's draft tokens are final once a later word has begun (byte-level
    BPE tokenises each pre-tokenizer piece alone, and the pieces before the last one never change when text is
    appended). So each pass re-tokenises only the text from the last word on, whatever the request's length.
    """

    read: int = 0  # target tokens read so far
    last: int | None = None  # the last of them (a cheap check that the output only grew)
    data: bytes = b""  # their text
    stable: int = 0  # bytes of ``data`` whose draft tokens are final
    stable_tokens: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.read, self.last, self.data, self.stable, self.stable_tokens = 0, None, b"", 0, []


class TokenBridge(Protocol):
    def to_draft(self, target_tokens: list[int], so_far: TextSoFar | None = None) -> list[int] | None:
        """The draft's tokens for the target's accepted output (``None``: not representable yet); ``so_far`` (one
        per request, updated in place) saves re-reading what earlier calls for the same request read."""

    def to_target(self, draft_tokens: list[int], probs: list[float], next_draft_token: int | None) -> Mapped:
        """Target tokens for a draft continuation; ``next_draft_token`` is the draft's token after it."""


class IdentityBridge:
    def __init__(self, eot: int):
        self.eot = eot

    def to_draft(self, target_tokens: list[int], so_far: TextSoFar | None = None) -> list[int]:
        return target_tokens

    def to_target(self, draft_tokens: list[int], probs: list[float], next_draft_token: int | None) -> Mapped:
        return Mapped(list(draft_tokens), list(probs), len(draft_tokens))


_WORDS = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _starts_word(piece: bytes) -> bool:
    """A token that begins with a space or punctuation cannot continue the previous word."""
    return bool(piece) and not chr(piece[0]).isalnum() and piece[0] < 0x80


class TextBridge:
    def __init__(self, target: WhisperTokenizer, draft: WhisperTokenizer):
        self.target, self.draft = target, draft

    def to_draft(self, target_tokens: list[int], so_far: TextSoFar | None = None) -> list[int] | None:
        grew = so_far is not None and so_far.read <= len(target_tokens) and (
            so_far.read == 0 or target_tokens[so_far.read - 1] == so_far.last)
        if so_far is None:
            so_far = TextSoFar()
        elif not grew:  # an output that did not simply grow: read it from the start
            so_far.clear()
        new = target_tokens[so_far.read :]
        so_far.data += b"".join(self.target.token_bytes[t] for t in new if t < self.target.eot)
        so_far.read, so_far.last = len(target_tokens), (target_tokens[-1] if target_tokens else None)
        try:
            text = so_far.data[so_far.stable :].decode("utf-8")  # ``stable`` ends a word, so a character
        except UnicodeDecodeError:  # ends inside a character: wait for the rest
            return None
        words = _WORDS.pre_tokenize_str(text)
        if len(words) < 2:
            return so_far.stable_tokens + self.draft.encode(text)
        # every word but the last is final: tokenised once, here, and kept; the last word again next time
        done, last = text[: words[-1][1][0]], text[words[-1][1][0] :]
        so_far.stable_tokens = so_far.stable_tokens + self.draft.encode(done)
        so_far.stable += len(done.encode("utf-8"))
        return so_far.stable_tokens + self.draft.encode(last)

    def to_target(self, draft_tokens: list[int], probs: list[float], next_draft_token: int | None) -> Mapped:
        ends_text = bool(draft_tokens) and draft_tokens[-1] == self.draft.eot
        body = draft_tokens[:-1] if ends_text else draft_tokens
        pieces = [self.draft.token_bytes[t] if t < self.draft.eot else None for t in body]
        if None in pieces:  # a special token mid-draft: use what precedes it
            body = body[: pieces.index(None)]
            pieces, ends_text, next_draft_token = pieces[: len(body)], False, None
        data = b"".join(pieces)
        complete = ends_text or (next_draft_token is not None and (
            next_draft_token >= self.draft.eot or _starts_word(self.draft.token_bytes[next_draft_token])))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="ignore")
            complete = False
        if not complete:
            words = _WORDS.pre_tokenize_str(text)
            text = text[: words[-1][1][0]] if words else ""
        tokens = self.target.encode(text) if text else []
        # draft tokens wholly inside the mapped text, and each target token's weakest overlapping draft token
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        limit = len(text.encode("utf-8"))
        used = sum(1 for e in ends if e <= limit)
        out_probs, start = [], 0
        for tok in tokens:
            stop = start + len(self.target.token_bytes[tok])
            overlapping = [p for p, e, piece in zip(probs, ends, pieces) if e - len(piece) < stop and e > start]
            out_probs.append(min(overlapping, default=1.0))
            start = stop
        if ends_text and complete and used == len(body):
            tokens.append(self.target.eot)
            out_probs.append(probs[len(body)] if len(probs) > len(body) else 1.0)
            used += 1
        return Mapped(tokens, out_probs, used)


def make_bridge(target: WhisperTokenizer, draft: WhisperTokenizer) -> TokenBridge:
    same = target.tokenizer.to_str() == draft.tokenizer.to_str()
    return IdentityBridge(target.eot) if same else TextBridge(target, draft)
