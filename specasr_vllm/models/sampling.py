"""Seeded temperature sampling that speculative decoding reproduces exactly.

The token at generated position ``p`` of a row is the Gumbel-max draw

    argmax(masked_logits + T * g_p),   g_p = -log(-log(u_p)),   u_p ~ U(0, 1)^vocab,

where ``masked_logits`` are the logits after every Whisper rule (``WhisperRules.pick`` applies them)
and ``u_p`` comes from a generator seeded by (row seed, p) alone. ``argmax(l + T g) = argmax(l / T + g)``
and the Gumbel-max trick makes that a draw from softmax(masked_logits / T); noise at different
positions is independent, so a decoded window is a draw from the model at temperature ``T``.

Why key the noise by position rather than by draw order: the token at position ``p`` is then a fixed
function of the tokens before it and of ``g_p``, whoever computes it. The speculative verifier
applies the same rule at every tree node (a node at depth ``d`` of a row that has emitted ``L``
tokens predicts position ``L + d``), so the target's choice at each node is exactly the token AR
decoding would pick there, and the greedy acceptance rule reproduces AR output token for token at any
temperature, for the same seed. It is also the lossless rejection rule of speculative sampling for a
deterministic draft: a drafted token ``x`` at position ``p`` was chosen without looking at ``g_p``,
so it is accepted with probability ``P(argmax(l/T + g_p) = x) = q(x)``, ``q = softmax(l/T)``, and on
rejection the emitted token is the Gumbel-max draw conditioned on not being ``x``, i.e. distributed as
``q`` with ``x`` removed and renormalised (see ``speculation/acceptance.py``).

The uniforms come from ``torch.Generator`` on the logits' device, so a seed reproduces its output on
the same kind of device (CPU and CUDA generators draw different streams).
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 step: spreads nearby seeds (0, 1, 2, ...) over unrelated 64-bit values."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _fmix32(x: int) -> int:
    """MurmurHash3's finaliser: a bijection on 32 bits, so distinct inputs never share an output."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


class Sampling:
    """Seeded temperature sampling for a batch: one seed per row (per decoded window)."""

    def __init__(self, temperature: float, seeds: list[int]):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.temperature = float(temperature)
        self.seeds = list(seeds)
        self._mixed = [_splitmix64(s & _MASK64) for s in self.seeds]

    def _generator_seed(self, row: int, position: int) -> int:
        """The 64-bit seed of (row, position)'s uniforms.

        The CPU generator (mt19937) reads only the low 32 bits of a seed, so those are a bijection of
        the position within a row: no two positions of one window ever share noise. The high 32 bits
        (used by CUDA's Philox) separate the rows' seeds further.
        """
        mixed = self._mixed[row]
        return (mixed & ~_MASK32 & _MASK64) | _fmix32((mixed + position) & _MASK32)

    def noise(self, rows: list[int], positions: list[int], vocab: int, device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(rows), vocab): temperature * Gumbel noise for row rows[k] at generated position positions[k].

        ``rows`` index ``seeds`` (the batch index, not a cache row). Repeated (row, position) pairs, as
        tree nodes of equal depth give, are drawn once and share their noise.
        """
        keys = list(zip(rows, positions))
        unique = list(dict.fromkeys(keys))
        device = torch.device(device)
        generator = torch.Generator(device=device)
        finfo = torch.finfo(dtype)
        draws = []
        for row, position in unique:
            generator.manual_seed(self._generator_seed(row, position))
            draws.append(torch.rand(vocab, generator=generator, device=device, dtype=dtype))
        u = torch.stack(draws).clamp_(finfo.tiny, 1.0 - finfo.eps / 2)  # log(0) and log(1) would give inf
        gumbel = u.log_().neg_().log_().neg_().mul_(self.temperature)
        if len(unique) == len(keys):
            return gumbel
        where = {key: k for k, key in enumerate(unique)}
        return gumbel[torch.tensor([where[key] for key in keys], device=device)]
