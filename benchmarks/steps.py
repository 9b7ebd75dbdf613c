"""What a decoding step costs alone: the encoder, the target's one-token step and verification passes, the
draft's step (medians, context of 30 tokens, one 30 s window; a GPU is waited for around each call).

Its own module, with nothing but torch and the models behind it, so the GPU check can time steps on a
machine without the audio and evaluation stack (``benchmarks/components.py`` adds the in-loop figures).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from specasr_vllm.models.whisper import block_step
from specasr_vllm.speculation.draft_model import DraftModel

CONTEXT = 30  # cached tokens before the timed call


def _median_ms(call: Callable[[], object], reps: int, reset: Callable[[], None] = lambda: None,
               sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``call``; ``sync`` waits for the device (a GPU's work is asynchronous)."""
    times = []
    for _ in range(reps + 2):  # the first two calls warm caches and allocations
        reset()
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def alone(model, draft: DraftModel | None, reps: int) -> dict[str, float]:
    """Isolated costs (ms) of one model (eager ``Whisper`` or ``CompiledWhisper``) and the draft."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    d = model.dims
    mel = torch.randn(1, d.n_mels, 2 * d.max_source_positions, device=model.device)
    out = {"encoder": _median_ms(lambda: model.encode(mel), max(reps // 6, 3), sync=sync)}
    cache = model.empty_cache(1)  # claimed rows of a kept cache, as the engine decodes (graphs are bound to it)
    cache.claim(*model.cross_kv(model.encode(mel)))
    model.decode(torch.randint(0, 50000, (1, CONTEXT)), cache)
    reset = lambda: cache.set_length(0, CONTEXT)
    for n, name in ((1, "target_step"), (8, "verify_8"), (16, "verify_16")):
        tokens = torch.randint(0, 50000, (1, n))
        out[name] = _median_ms(lambda t=tokens: model.decode(t, cache), reps, reset, sync)
        if getattr(model, "graphs", None) is not None:  # the replay alone: inputs built once, not per call
            cache.set_length(0, CONTEXT)
            inputs, state = block_step(tokens, cache, [0], None, None, model.device)
            out[f"{name}_replay"] = _median_ms(lambda i=inputs, s=state: model.graphs(i, s), reps, sync=sync)
    if draft is not None:
        # the draft's encoder reads the audio's own frames: a first call at a new length against a repeated one
        frames = iter(range(1000, 3000, 2))
        out["draft_encoder_new_length"] = _median_ms(lambda: draft.encode(mel[:, :, : next(frames)]), reps, sync=sync)
        out["draft_encoder_same_length"] = _median_ms(lambda: draft.encode(mel[:, :, :1000]), reps, sync=sync)
        dcache = draft.empty_cache(1)
        dcache.claim(*draft.cross_kv(draft.encode(mel)))
        draft.decode(torch.randint(0, 16000, (1, CONTEXT)), dcache, [0])
        step, mask = torch.randint(0, 16000, (1, 1)), torch.ones(1, 1, 1, dtype=torch.bool)
        depths = torch.zeros(1, 1, dtype=torch.long)
        # what a greedy draft step is in the loop: the step, the two best choices, the copy to the host
        out["draft_step"] = _median_ms(lambda: draft.choices(step, dcache, [0], mask, depths, {}), reps,
                                       lambda: dcache.set_length(0, CONTEXT))
        if draft.run_length > 1:  # a run of greedy steps in one call (graphs only), and what that is per step
            run = _median_ms(lambda: draft.run(step, dcache, [0]), reps, lambda: dcache.set_length(0, CONTEXT))
            out[f"draft_run_{draft.run_length}"] = run
            out["draft_step_in_run"] = run / draft.run_length
    return out
