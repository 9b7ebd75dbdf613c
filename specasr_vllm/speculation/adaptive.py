"""When to stop drafting: a fixed length (plain speculative decoding) or adaptively on confidence.

``ConfidencePolicy`` keeps drafting while the draft's top-1 probability and the path's cumulative
probability stay above thresholds. With ``auto=True`` the decision is instead made online to
maximise expected tokens per second: the draft's probabilities are calibrated against the
acceptance actually observed (per probability bucket), and the measured cost of a whole pass, as a line in
the number of draft tokens it verifies (``PassLine``), prices one more token against what it is expected to
add; until that line is known, a draft step and a verification pass of any width stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BUCKETS = 10


@dataclass
class PassLine:
    """Whole speculative passes' seconds as a line in the draft nodes each verified: ``fixed + per_node * nodes``,
    fitted by least squares with older passes weighing less (``FORGET`` per pass).

    Why: one more drafted token costs a draft step *and* a wider verification, and every pass also pays for
    what does not depend on its width (the target's step, the draft call that opens the round and the one whose
    choice stops the chain, the host's work). The Xeon CPU, whisper-base verifying tiny.en's chains at batch 1
    (32 dev files): a pass cost 18.7 ms with one node and 2.2 ms more per node, where the draft step alone was
    1.7 ms; priced by this line instead of a draft step against a verification of any width, chains averaged
    6.6 nodes instead of 7.4 and decoding ran 0.8-1.3% faster (two interleaved runs, identical output).
    """

    FORGET = 0.99
    MIN_PASSES = 8  # passes before the line is used
    weight: float = 0.0
    nodes: float = 0.0  # weighted sums of x = nodes, y = seconds, x * x and x * y
    seconds: float = 0.0
    nodes_sq: float = 0.0
    cross: float = 0.0
    passes: int = 0

    def observe(self, nodes: int, seconds: float) -> None:
        line = self.line()
        if line is not None:  # a pause or a compile counts as at most Costs.OUTLIER times the line's price
            seconds = min(seconds, Costs.OUTLIER * (line[0] + line[1] * nodes))
        f = self.FORGET
        self.weight = f * self.weight + 1
        self.nodes = f * self.nodes + nodes
        self.seconds = f * self.seconds + seconds
        self.nodes_sq = f * self.nodes_sq + nodes * nodes
        self.cross = f * self.cross + nodes * seconds
        self.passes += 1

    def line(self) -> tuple[float, float] | None:
        """``(fixed, per_node)`` seconds, or None until ``MIN_PASSES`` passes of more than one width gave a line
        whose both terms are positive."""
        if self.passes < self.MIN_PASSES:
            return None
        w = self.weight
        spread = self.nodes_sq / w - (self.nodes / w) ** 2
        if spread <= 1e-9:
            return None
        per_node = (self.cross / w - self.nodes / w * self.seconds / w) / spread
        fixed = self.seconds / w - per_node * self.nodes / w
        return (fixed, per_node) if fixed > 0 and per_node > 0 else None


@dataclass
class Costs:
    """Measured seconds of a draft step, of a target verification pass and of one AR step per row, a target step
    that verified nothing, as the host runs it (moving averages; ``ar_step`` is None until one is measured): at one
    row (``ar_step``) and at wider batches (``ar_wide``), where a step costs less per row (the Xeon CPU, whisper-base:
    12.2 ms for one row, 36.2 ms for eight, 4.5 ms a row), so drafting in a batch must beat AR at that width.

    One slow call (a first call that traces or compiles a graph, a pause of the machine) counts as at most
    ``OUTLIER`` times the current estimate: unclamped, a 0.5 s trace once moved the draft step's estimate
    from 1.4 ms to 50 ms, and drafting was judged not to pay for the request that met it.
    """

    draft_step: float = 0.01
    verify: float = 0.05
    ar_step: float | None = None
    ar_samples: int = 0  # AR steps observed at one row
    ar_wide: dict[int, float] = field(default_factory=dict)  # rows -> an AR step's seconds per row, at 2 rows or more
    ar_wide_samples: dict[int, int] = field(default_factory=dict)  # AR steps observed at each of those widths
    passes: PassLine = field(default_factory=PassLine)  # whole passes of one drafting request, by width
    OUTLIER = 4.0
    FIRST = 3  # the AR step's first estimate is the least of this many (a slow first step does not set the price)

    def observe(self, draft_step: float | None = None, verify: float | None = None,
                ar_step: float | None = None, rows: int = 1) -> None:
        """``ar_step``: an AR step's seconds per row, at ``rows`` rows."""
        if draft_step is not None:
            self.draft_step = 0.9 * self.draft_step + 0.1 * min(draft_step, self.OUTLIER * self.draft_step)
        if verify is not None:
            self.verify = 0.9 * self.verify + 0.1 * min(verify, self.OUTLIER * self.verify)
        if ar_step is not None and rows > 1:
            samples = self.ar_wide_samples[rows] = self.ar_wide_samples.get(rows, 0) + 1
            self.ar_wide[rows] = self._averaged(self.ar_wide.get(rows), ar_step, samples)
        elif ar_step is not None:
            self.ar_samples += 1
            self.ar_step = self._averaged(self.ar_step, ar_step, self.ar_samples)

    def _averaged(self, known: float | None, seconds: float, samples: int) -> float:
        """An AR step's new estimate: the least of the first ``FIRST`` (a step that also paid for something else,
        a compile or a batch's rows moving up in the cache, does not set the price), then a moving average."""
        if known is None or samples <= self.FIRST:
            return seconds if known is None else min(known, seconds)
        return 0.9 * known + 0.1 * min(seconds, self.OUTLIER * known)

    def ar_price(self, rows: int) -> float | None:
        """An AR step's seconds per row at ``rows`` rows: measured there, else a whole step's seconds interpolated
        linearly between the nearest widths measured (one row always is), else beyond the widest one measured its
        price per row. None until an AR step at one row is measured."""
        if self.ar_step is None:
            return None
        step = {1: self.ar_step, **{w: price * w for w, price in self.ar_wide.items()}}  # whole steps, by rows
        if rows in step:
            return step[rows] / rows
        below = max(w for w in step if w < rows)
        above = min((w for w in step if w > rows), default=None)
        if above is None:
            return step[below] / below
        return (step[below] + (step[above] - step[below]) * (rows - below) / (above - below)) / rows


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
        fixed, per_token = c.passes.line() or (c.verify, c.draft_step)
        before = (1 + expected) / (fixed + depth * per_token)
        after = (1 + expected + gain) / (fixed + (depth + 1) * per_token)
        return after >= before

    def observe(self, probs: list[float], accepted: int) -> None:
        """A chain's draft probabilities and how many leading tokens the target accepted."""
        for i, p in enumerate(probs[: accepted + 1]):  # nodes after the first rejection were never judged
            b = min(int(p * BUCKETS), BUCKETS - 1)
            self.tries[b] += 1
            self.hits[b] += i < accepted
