"""SpecASR inside vLLM: the proposer (``SpecASRProposer``), the general plugin that feeds it and applies
Whisper's suppression in vLLM's V1 model runner, keeping Whisper models on that runner (``hooks.register``),
the install repair (``install``), the launcher (``launch``) and the offline runner (``offline``).
See README "vLLM".
"""

from specasr_vllm.vllm_plugin.proposer import SpecASRProposer

__all__ = ["SpecASRProposer"]
