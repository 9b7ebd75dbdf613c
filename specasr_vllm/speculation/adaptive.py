"""When to stop drafting: a fixed length (plain speculative decoding) or adaptively on confidence.

``ConfidencePolicy`` keeps drafting while the draft's top-1 probability and the path's cumulative
probability stay above thresholds. With ``auto=True`` the decision is instead made online to
maximise expected tokens per second: the draft's probabilities are calibrated against the
acceptance actually observed (per probability bucket), and the measured costs of a draft step and a
verification pass price one more token against what it is expected to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BUCKETS = 10


@dataclass
class Costs:
    """Measured seconds of a draft step, of a target verification pass and of one AR step per row, a target step
    that verified nothing, as the host runs it (moving averages; ``ar_step`` is None until one is measured).

    One slow call (a first call that traces or compiles a graph, a pause of the machine) counts as at most
    ``OUTLIER`` times the current estimate: unclamped, a 0.5 s trace once moved the draft step's estimate
    from 1.4 ms to 50 ms, and drafting was judged not to pay for the request that met it.
    """

    draft_step: float = 0.01
    verify: float = 0.05
    ar_step: float | None = None
    ar_samples: int = 0  # AR steps observed
    OUTLIER = 4.0
    FIRST = 3  # the AR step's first estimate is the least of this many (a slow first step does not set the price)

    def observe(self, draft_step: float | None = None, verify: float | None = None,
                ar_step: float | None = None) -> None:
        if draft_step is not None:
            self.draft_step = 0.9 * self.draft_step + 0.1 * min(draft_step, self.OUTLIER * self.draft_step)
        if verify is not None:
            self.verify = 0.9 * self.verify + 0.1 * min(verify, self.OUTLIER * self.verify)
        if ar_step is not None:
            self.ar_samples += 1
            if self.ar_step is None or self.ar_samples <= self.FIRST:
                self.ar_step = ar_step if self.ar_step is None else min(self.ar_step, ar_step)
            else:
                self.ar_step = 0.9 * self.ar_step + 0.1 * min(ar_step, self.OUTLIER * self.ar_step)


class FixedLength:
    def __init__(self, k: int):
        self.k = k

    def keep_going(self, depth: int, prob: float, path_prob: float, expected: float) -> bool:
        return depth < self.k

    def observe(self, probs: list[float], accepted: int) -> None:
        pass


@dataclass
class ConfidencePolicy:
    threshold: float = 0.4
    min_path: float = 0.05
    cap: int = 24
    auto: bool = True
    # calibration: hits / tries per draft-probability bucket, with a prior equal to the bucket's probability
    hits: np.ndarray = field(default_factory=lambda: (np.arange(BUCKETS) + 0.5) / BUCKETS * 4)
    tries: np.ndarray = field(default_factory=lambda: np.full(BUCKETS, 4.0))
    costs: Costs = field(default_factory=Costs)

    def acceptance(self, prob: float) -> float:
        b = min(int(prob * BUCKETS), BUCKETS - 1)
        return float(self.hits[b] / self.tries[b])

    def keep_going(self, depth: int, prob: float, path_prob: float, expected: float) -> bool:
        """May token number ``depth + 1`` (draft probability ``prob``) join the draft?

        ``expected`` is the expected number of accepted tokens so far and ``path_prob`` the calibrated
        chance that all of them are accepted (auto mode), or the draft's cumulative probability.
        """
        if depth >= self.cap:
            return False
        if not self.auto:
            return prob >= self.threshold and path_prob * prob >= self.min_path
        gain = path_prob * self.acceptance(prob)
        c = self.costs
        before = (1 + expected) / (c.verify + depth * c.draft_step)
        after = (1 + expected + gain) / (c.verify + (depth + 1) * c.draft_step)
        return after >= before

    def observe(self, probs: list[float], accepted: int) -> None:
        """A chain's draft probabilities and how many leading tokens the target accepted."""
        for i, p in enumerate(probs[: accepted + 1]):  # nodes after the first rejection were never judged
            b = min(int(p * BUCKETS), BUCKETS - 1)
            self.tries[b] += 1
            self.hits[b] += i < accepted
