"""specasr-vllm: lossless speculative decoding (SpecASR) for Whisper-style speech recognition."""

__version__ = "0.1.0"
