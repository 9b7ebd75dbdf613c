"""vLLM general plugin (entry point ``vllm.general_plugins: specasr``), loaded in every vLLM process
before the model runner is built. It wraps three model-runner methods, each a no-op unless it concerns
a Whisper target or the SpecASR proposer:

- ``execute_model``: notes which requests start this step (their first sampled token is the one
  Whisper's ``begin_suppress_tokens`` apply to);
- ``_sample``: applies Whisper's suppression to the logits of every sampled or verified position.
  vLLM 0.32 applies neither list, and it refuses custom logits processors once speculative decoding
  is on, so the rules go in here, for vLLM with and without speculation alike;
- ``propose_draft_token_ids``: binds the runner and scheduler output to ``SpecASRProposer`` (request
  ids, audio features, finished and preempted requests), which the ``custom_class`` hook does not pass.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from specasr_vllm.models.registry import suppression_lists
from specasr_vllm.models.rules import Suppression
from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.vllm_plugin.version import check_vllm

log = logging.getLogger(__name__)
_PATCHED = "_specasr_patched"


def register() -> None:
    """Patch vLLM's model runner once per process. An unsupported vLLM is left untouched (with a
    warning): this plugin is loaded for every model, and only SpecASR needs the patches."""
    try:
        check_vllm()
    except UnsupportedVLLMError as exc:
        log.warning("specasr-vllm plugin not active: %s", exc)
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # CPUModelRunner inherits these methods

    if getattr(GPUModelRunner, _PATCHED, False):
        return
    GPUModelRunner.execute_model = _wrap_execute(GPUModelRunner.execute_model)
    GPUModelRunner._sample = _wrap_sample(GPUModelRunner._sample)
    GPUModelRunner.propose_draft_token_ids = _wrap_propose(GPUModelRunner.propose_draft_token_ids)
    setattr(GPUModelRunner, _PATCHED, True)


def _wrap_execute(execute):
    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        self._specasr_new_reqs = {req.req_id for req in scheduler_output.scheduled_new_reqs}
        return execute(self, scheduler_output, *args, **kwargs)

    return execute_model


def _wrap_sample(sample):
    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata):
        suppression = _suppression(self)
        if suppression is not None and logits is not None:
            first = first_positions(self.input_batch.req_ids, getattr(self, "_specasr_new_reqs", set()),
                                    spec_decode_metadata, logits.shape[0])
            logits = suppression.mask(logits, first.to(logits.device))
        return sample(self, logits, spec_decode_metadata)

    return _sample


def _wrap_propose(propose):
    from specasr_vllm.vllm_plugin.proposer import SpecASRProposer

    @functools.wraps(propose)
    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        if isinstance(getattr(self, "drafter", None), SpecASRProposer):
            self.drafter.bind(self, scheduler_output)
        return propose(self, scheduler_output, *args, **kwargs)

    return propose_draft_token_ids


def _suppression(runner: Any) -> Suppression | None:
    """The runner's Whisper suppression (built once), or ``None`` for other models."""
    if not hasattr(runner, "_specasr_suppression"):
        config = runner.model_config
        rules = None
        if getattr(config.hf_config, "model_type", None) == "whisper":
            directory = Path(config.model)
            suppress, begin = suppression_lists(directory) if directory.is_dir() else (
                list(config.hf_config.suppress_tokens or []), list(config.hf_config.begin_suppress_tokens or []))
            rules = Suppression(config.get_vocab_size(), suppress, begin, runner.device)
            log.info("Whisper suppression active: %d tokens, %d more at the first step", len(suppress), len(begin))
        runner._specasr_suppression = rules
    return runner._specasr_suppression


def first_positions(req_ids: list[str], new: set[str], spec: Any, rows: int) -> torch.Tensor:
    """Which logits rows are a request's first generated token (the rows of new requests' first position).

    Without drafts there is one row per request in batch order; with drafts, request ``i`` owns
    ``num_draft_tokens[i] + 1`` consecutive rows (its draft positions, then the bonus position).
    """
    first = torch.zeros(rows, dtype=torch.bool)
    if not new:
        return first
    per_request = [1] * len(req_ids) if spec is None else [n + 1 for n in spec.num_draft_tokens]
    start = 0
    for rid, count in zip(req_ids, per_request):
        if rid in new:
            first[start] = True
        start += count
    return first
