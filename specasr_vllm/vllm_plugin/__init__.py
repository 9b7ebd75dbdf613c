"""SpecASR inside vLLM: the proposer (``SpecASRProposer``), the general plugin that feeds it and applies
Whisper's suppression (``hooks.register``), the install repair (``install``) and the launcher
(``serve``). See README "vLLM".
"""

from specasr_vllm.vllm_plugin.proposer import SpecASRProposer

__all__ = ["SpecASRProposer"]
