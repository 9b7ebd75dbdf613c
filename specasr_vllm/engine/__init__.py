"""The embedded engine: target (and draft) models in one process, audio in, transcripts out."""

from specasr_vllm.engine.segments import Segment
from specasr_vllm.engine.transcriber import Transcriber, Transcript

__all__ = ["Segment", "Transcriber", "Transcript"]
