"""Split audio longer than one 30 s window at its quietest moments.

Whisper sees 30 s at a time. Cutting at a fixed 30 s would split words; instead each cut is placed
at the lowest-energy 20 ms frame within the last few seconds before the window would overflow.
"""

from __future__ import annotations

import numpy as np

from specasr_vllm.config import N_SAMPLES, SAMPLE_RATE

FRAME = SAMPLE_RATE // 50  # 20 ms energy frames
SEARCH_SECONDS = 5.0


def split_points(audio: np.ndarray, window: int = N_SAMPLES, search: float = SEARCH_SECONDS) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` sample ranges covering ``audio``, each at most ``window`` long."""
    spans, start, n = [], 0, len(audio)
    search_len = min(int(search * SAMPLE_RATE), window // 2)
    while n - start > window:
        lo = start + window - search_len
        region = audio[lo : start + window]
        frames = region[: len(region) // FRAME * FRAME].reshape(-1, FRAME)
        quietest = int(np.argmin((frames.astype(np.float64) ** 2).mean(axis=1)))
        cut = lo + quietest * FRAME + FRAME // 2
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans
