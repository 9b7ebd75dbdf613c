"""Per-request counters of speculative decoding (summed over a request's windows)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class SpecStats:
    output_tokens: int = 0
    target_passes: int = 0  # target forwards that emitted tokens (the prefill, then each verification or AR step)
    draft_steps: int = 0  # draft forwards on the critical path, each one sequential step
    draft_parallel_passes: int = 0  # of which fed several tokens at once (catch-up and recycling re-checks)
    draft_steps_hidden: int = 0  # draft steps run concurrently with target passes (off the critical path)
    drafted_tokens: int = 0  # target-space tokens proposed (chain and tree)
    accepted_tokens: int = 0  # drafted tokens the target kept
    recycled_accepted: int = 0  # accepted tokens that came from recycling
    fallback: str | None = None  # why drafting was switched off for this request, if it was
    acceptance_lengths: Counter = field(default_factory=Counter)  # accepted drafted tokens per verifying pass

    def merge(self, other: SpecStats) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.acceptance_lengths.update(other.acceptance_lengths)
        self.fallback = self.fallback or other.fallback

    @property
    def mean_acceptance(self) -> float:
        """Mean tokens per verifying pass, the target's bonus token included."""
        passes = sum(self.acceptance_lengths.values())
        return (self.accepted_tokens + passes) / passes if passes else 0.0

    def to_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in COUNTERS}, "fallback": self.fallback,
                "mean_acceptance": round(self.mean_acceptance, 3),
                "acceptance_lengths": dict(sorted(self.acceptance_lengths.items()))}


COUNTERS = tuple(f.name for f in fields(SpecStats) if f.type in (int, "int"))  # the additive counters
