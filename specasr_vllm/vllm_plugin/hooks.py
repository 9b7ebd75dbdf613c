"""vLLM general plugin (entry point ``vllm.general_plugins: specasr``), loaded by vLLM in every process
(``EngineArgs``, the engine core, each worker) before a config or a model runner is built.

It adds one method to vLLM's workers, ``specasr_proposer_stats`` (the proposer's counters, for
``collective_rpc`` by name), and wraps three methods of vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``;
the CPU build's ``CPUModelRunner`` and XPU's inherit them), each a no-op unless it concerns a Whisper
target or the SpecASR proposer:

- ``execute_model``: notes which requests start this step (their first sampled token is the one
  Whisper's ``begin_suppress_tokens`` apply to);
- ``_sample``: applies Whisper's suppression to the logits of every sampled or verified position, and
  the timestamp grammar (``models.rules.TimestampRules``) to the positions of requests whose decoder
  prompt asks for timestamps (``WhisperTokenizer.asks_for_timestamps``), each position with the tokens
  before it (the request's output so far, then the draft tokens ahead of that position). vLLM 0.32 applies none of these rules, and
  it refuses custom logits processors once speculative decoding is on, so they go in here, for vLLM
  with and without speculation alike;
- ``propose_draft_token_ids``: binds the runner and scheduler output to ``SpecASRProposer`` (request
  ids, audio features, finished and preempted requests), which the ``custom_class`` hook does not pass.

These hooks exist only in the V1 runner, so the plugin also decides the runner for Whisper models.
vLLM 0.32 picks it in one place, the property ``VllmConfig.use_v2_model_runner`` (config/vllm.py),
which every consumer reads (``Worker._make_model_runner``, ``CPUWorker.init_device``, the engine core,
the input processor): ``VLLM_USE_V2_MODEL_RUNNER`` if set, else V1 without Triton, else V1 if
``_get_v2_model_runner_unsupported_features()`` lists anything (it already lists ``custom_class``),
else V2. The plugin adds Whisper to that list, so vLLM's own fallback chooses V1 (and logs why); where
V2 is forced anyway (``VLLM_USE_V2_MODEL_RUNNER=1``, or a V2-only feature) the property raises
``RunnerNotCoveredError`` at start-up instead of letting Whisper decode without its rules.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.models.registry import load_tokenizer, suppression_lists
from specasr_vllm.models.rules import Suppression, TimestampRules
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.vllm_plugin.version import check_vllm

log = logging.getLogger(__name__)
_PATCHED = "_specasr_patched"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"  # vLLM's switch (envs.py): "0" forces the V1 model runner
WHY_V1 = "Whisper models with the specasr-vllm plugin (its hooks cover the V1 model runner only)"


class RunnerNotCoveredError(UnsupportedVLLMError):
    """vLLM chose a model runner for a Whisper model that the plugin's hooks do not cover."""


def register() -> None:
    """Patch vLLM's V1 model runner and its runner choice once per process. An unsupported vLLM is left
    untouched (with a warning): this plugin is loaded for every model, and only Whisper needs it."""
    try:
        check_vllm()
    except UnsupportedVLLMError as exc:
        log.warning("specasr-vllm plugin not active: %s", exc)
        return
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    patch_runner(GPUModelRunner)
    patch_runner_choice(VllmConfig)
    setattr(WorkerBase, PROPOSER_STATS, proposer_stats)  # collective_rpc(PROPOSER_STATS) reaches it by name


# ---- what the engine's clients may ask the workers ----------------------------------------------------
PROPOSER_STATS = "specasr_proposer_stats"


def proposer_stats(worker: Any) -> dict | None:
    """The SpecASR proposer's counters in this worker (None without one). Added to vLLM's workers as a
    method, so a client in another process (``AsyncLLM.collective_rpc``) can ask by name; a function would
    need vLLM's pickle fallback (``VLLM_ALLOW_INSECURE_SERIALIZATION``)."""
    from specasr_vllm.vllm_plugin.proposer import SpecASRProposer

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return drafter.stats() if isinstance(drafter, SpecASRProposer) else None


# ---- which runner ------------------------------------------------------------------------------------
def is_whisper(model_config: Any) -> bool:
    """Whether vLLM serves a Whisper model (the only kind the plugin changes anything for)."""
    hf_config = getattr(model_config, "hf_config", None)
    return getattr(hf_config, "model_type", None) == "whisper"


def runner_not_covered_message() -> str:
    """The problem and both fixes, for whoever starts vLLM on a Whisper model with the V2 runner forced."""
    return ("vLLM chose its V2 model runner for a Whisper model, but specasr-vllm applies Whisper's "
            "suppress_tokens / begin_suppress_tokens and feeds the SpecASR proposer only in the V1 model runner "
            "(vllm.v1.worker.gpu_model_runner.GPUModelRunner and its CPU subclass); without them vLLM's tokens "
            f"differ from Whisper's. Set {RUNNER_ENV}=0 (and enable no V2-only feature such as HiSparse or "
            "watermarking), or run vLLM without this plugin (VLLM_PLUGINS listing the plugins to load, "
            "without 'specasr')")


def patch_runner_choice(config_cls: type) -> None:
    """Make ``config_cls`` (vLLM's ``VllmConfig``) choose the V1 runner for Whisper, or refuse to start."""
    if config_cls.__dict__.get(_PATCHED, False):
        return
    config_cls._get_v2_model_runner_unsupported_features = _wrap_unsupported(
        config_cls._get_v2_model_runner_unsupported_features)
    config_cls.use_v2_model_runner = property(_wrap_choice(config_cls.use_v2_model_runner.fget))
    setattr(config_cls, _PATCHED, True)


def _wrap_unsupported(unsupported: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
    """vLLM falls back to V1 (logging the reason) when V2 lacks a feature; Whisper's rules are one."""

    @functools.wraps(unsupported)
    def _get_v2_model_runner_unsupported_features(self) -> list[str]:
        features = unsupported(self)
        return [*features, WHY_V1] if is_whisper(self.model_config) else features

    return _get_v2_model_runner_unsupported_features


def _wrap_choice(choose: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """V2 for a Whisper model can only have been forced; stop there rather than decode without the rules."""

    @functools.wraps(choose)
    def use_v2_model_runner(self) -> bool:
        v2 = choose(self)
        if v2 and is_whisper(self.model_config):
            raise RunnerNotCoveredError(runner_not_covered_message())
        return v2

    return use_v2_model_runner


# ---- the V1 runner's hooks -------------------------------------------------------------------------
def is_hooked(runner: Any) -> bool:
    """Whether ``runner`` is a V1 model runner whose methods the plugin wraps (``offline`` reports it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return isinstance(runner, GPUModelRunner) and bool(GPUModelRunner.__dict__.get(_PATCHED, False))


def patch_runner(runner_cls: type) -> None:
    """Wrap the three methods of vLLM's V1 model runner class (subclasses inherit the wrappers)."""
    if runner_cls.__dict__.get(_PATCHED, False):
        return
    runner_cls.execute_model = _wrap_execute(runner_cls.execute_model)
    runner_cls._sample = _wrap_sample(runner_cls._sample)
    runner_cls.propose_draft_token_ids = _wrap_propose(runner_cls.propose_draft_token_ids)
    setattr(runner_cls, _PATCHED, True)


def _wrap_execute(execute: Callable) -> Callable:
    """Remember this step's new requests: ``_sample`` begin-suppresses their first position."""

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        self._specasr_new_reqs = {req.req_id for req in scheduler_output.scheduled_new_reqs}
        return execute(self, scheduler_output, *args, **kwargs)

    return execute_model


def _wrap_sample(sample: Callable) -> Callable:
    """Apply Whisper's rules before vLLM samples or verifies (greedy picks from the masked logits)."""

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata):
        rules = _rules(self)
        if rules is not None and logits is not None:
            suppression, timestamps, tokenizer = rules
            req_ids = self.input_batch.req_ids
            first = first_positions(req_ids, getattr(self, "_specasr_new_reqs", set()), spec_decode_metadata,
                                    logits.shape[0])
            logits = suppression.mask(logits, first.to(logits.device))
            rows, contexts = timestamp_contexts(
                [self.requests[rid] for rid in req_ids], tokenizer.asks_for_timestamps, spec_decode_metadata)
            if rows:
                _raise_if_async(self)
                index = torch.tensor(rows, device=logits.device)
                logits = logits.index_copy(0, index, timestamps.mask(logits[index], contexts))
        return sample(self, logits, spec_decode_metadata)

    return _sample


def _wrap_propose(propose: Callable) -> Callable:
    """Hand the SpecASR proposer what vLLM's ``custom_class`` call leaves out (request ids, audio, departures)."""
    from specasr_vllm.vllm_plugin.proposer import SpecASRProposer

    @functools.wraps(propose)
    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        if isinstance(getattr(self, "drafter", None), SpecASRProposer):
            self.drafter.bind(self, scheduler_output)
        return propose(self, scheduler_output, *args, **kwargs)

    return propose_draft_token_ids


def _rules(runner: Any) -> tuple[Suppression, TimestampRules, WhisperTokenizer] | None:
    """The runner's Whisper rules (built once), or ``None`` for other models."""
    if not hasattr(runner, "_specasr_rules"):
        config = runner.model_config
        rules = None
        if is_whisper(config):
            directory = Path(config.model)
            vocab = config.get_vocab_size()
            if directory.is_dir():
                suppress, begin = suppression_lists(directory)
                tokenizer = load_tokenizer(directory)
            else:  # a hub name vLLM resolved itself: its config holds the lists
                suppress = list(config.hf_config.suppress_tokens or [])
                begin = list(config.hf_config.begin_suppress_tokens or [])
                from transformers import AutoTokenizer

                fast = AutoTokenizer.from_pretrained(config.tokenizer)  # vLLM has fetched it by now
                tokenizer = WhisperTokenizer(fast.backend_tokenizer, multilingual=vocab >= 51865)
            rules = Suppression(vocab, suppress, begin, runner.device), TimestampRules(tokenizer), tokenizer
            log.info("Whisper rules active: %d tokens suppressed, %d more at the first step, timestamps from id %d",
                     len(suppress), len(begin), tokenizer.timestamp_begin)
        runner._specasr_rules = rules
    return runner._specasr_rules


def timestamp_contexts(requests: list[Any], timed: Callable[[list[int]], bool],
                       spec: Any) -> tuple[list[int], list[list[int]]]:
    """The logits rows that decode with timestamps, and for each the tokens generated before it.

    ``requests`` are vLLM's per-request states in batch order (``prompt_token_ids``: the decoder prompt;
    ``output_token_ids``: the tokens sampled so far); ``timed(prompt)`` says whether a request decodes with
    timestamps (``WhisperTokenizer.asks_for_timestamps``). Rows are laid out as in ``first_positions``; a
    request's row ``k`` follows its first ``k`` drafts.
    """
    per_request = [1] * len(requests) if spec is None else [n + 1 for n in spec.num_draft_tokens]
    flags = [timed(state.prompt_token_ids or []) for state in requests]
    if not any(flags):
        return [], []
    drafts = spec.draft_token_ids.tolist() if spec is not None and any(spec.num_draft_tokens) else []
    rows, contexts, start, drafted = [], [], 0, 0
    for state, count, flag in zip(requests, per_request, flags):
        if flag:
            output = list(state.output_token_ids)
            ahead = drafts[drafted : drafted + count - 1]
            rows += range(start, start + count)
            contexts += [output + ahead[:k] for k in range(count)]
        start += count
        drafted += count - 1
    return rows, contexts


def _raise_if_async(runner: Any) -> None:
    """With asynchronous scheduling a request's newest tokens are placeholders when the rules need them."""
    if getattr(runner, "use_async_scheduling", False):
        raise RuntimeError("Whisper's timestamp rules need each request's tokens so far, which vLLM's asynchronous "
                           "scheduling has not filled in yet; start vLLM with --no-async-scheduling")


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
