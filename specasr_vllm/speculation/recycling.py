"""Draft recycling: reuse the rest of a rejected draft instead of drafting it again.

ASR drafts slip locally (a word, a comma, casing) and then realign with the audio. After the target
rejects at some byte of the old proposal and emits its own token, the old proposal's remainder is
usually still right, shifted by the slip: resuming just after the token the target replaced
(substitution), at it (the target inserted a token) or one further (the target dropped one). Those
candidates go to the draft model, which re-checks them all in one parallel pass; the drafter keeps the
candidate whose leading tokens the draft itself would have generated.
"""

from __future__ import annotations


def common_prefix(a: bytes | list[int], b: bytes | list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def recycle_candidates(old_tokens: list[int], old_pieces: list[bytes], matched_bytes: int, max_len: int,
                       accepted: int | None = None) -> list[list[int]]:
    """Remainders of ``old_tokens`` to re-check, in order of preference (substitution, insertion, deletion).

    ``old_pieces[i]`` are token ``i``'s bytes; the first ``matched_bytes`` of the proposal agree with
    the corrected context. The token holding the first disagreeing byte is the one the target replaced.
    If the whole new context (``accepted`` bytes) matched and ends on a token boundary, there was no
    slip: the proposal simply runs on, and its continuation is the only candidate.
    """
    end, slip, boundary = 0, len(old_tokens), matched_bytes == 0
    for i, piece in enumerate(old_pieces):
        if end == matched_bytes:
            boundary = True
        end += len(piece)
        if end > matched_bytes:
            slip = i
            break
    if boundary and matched_bytes == accepted:
        rest = old_tokens[slip : slip + max_len]
        return [rest] if rest else []
    candidates = []
    for start in (slip + 1, slip, slip + 2):
        rest = old_tokens[start : start + max_len]
        if rest and rest not in candidates:
            candidates.append(rest)
    return candidates
