"""vLLM general plugin (entry point ``vllm.general_plugins: specasr``), loaded by vLLM in every process
(``EngineArgs``, the engine core, each worker) before a config or a model runner is built.

It adds one method to vLLM's workers, ``specasr_proposer_stats`` (the proposer's counters, for
``collective_rpc`` by name), and wraps two methods of vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``;
the CPU build's ``CPUModelRunner`` and XPU's inherit them), each a no-op unless it concerns a Whisper
target or the SpecASR proposer:

- ``_sample``: applies Whisper's rules to the logits of every sampled or verified position: the
  suppression lists (``begin_suppress_tokens`` too at a request's first generated token), and the timestamp
  grammar (``models.rules.TimestampRules``) at the positions of requests whose decoder prompt asks for
  timestamps (``WhisperTokenizer.asks_for_timestamps``), each position with the tokens before it (the
  request's output so far, then the draft tokens ahead of that position). vLLM 0.32 applies none of these
  rules, and it refuses custom logits processors once speculative decoding is on, so they go in here, for
  vLLM with and without speculation alike. The rules read each request's tokens so far, which vLLM's
  asynchronous scheduling leaves as placeholders until later, so for Whisper the plugin turns that
  scheduling off unless asked for (and refuses to start when it is);
- ``propose_draft_token_ids``: binds the runner and scheduler output to ``SpecASRProposer`` (request
  ids, audio features, finished and preempted requests), which the ``custom_class`` hook does not pass.

These hooks exist only in the V1 runner, so the plugin also decides the runner for Whisper models.
vLLM 0.32 picks it in one place, the property ``VllmConfig.use_v2_model_runner`` (config/vllm.py),
which every consumer reads (``Worker._make_model_runner``, ``CPUWorker.init_device``, the engine core,
the input processor): ``VLLM_USE_V2_MODEL_RUNNER`` if set, else V1 without Triton, else V1 if
``_get_v2_model_runner_unsupported_features()`` lists anything (it already lists ``custom_class``),
else V2. The plugin adds Whisper to that list, so vLLM's own fallback chooses V1 (and logs why); where
V2 is forced anyway (``VLLM_USE_V2_MODEL_RUNNER=1``, or a V2-only feature) the property raises
``RunnerNotCoveredError`` at start-up instead of letting Whisper decode without its rules. In the same
way ``VllmConfig.__post_init__`` (where vLLM resolves ``async_scheduling``) sets it off for Whisper unless
the user set it, and refuses it if they did.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.models.registry import suppression_lists
from specasr_vllm.models.rules import Suppression, TimestampRules
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.vllm_plugin.version import check_vllm

log = logging.getLogger(__name__)
_PATCHED = "_specasr_patched"
_PATCHED_SCHEDULING = "_specasr_patched_scheduling"
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
    patch_scheduling(VllmConfig)
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
            "suppress_tokens / begin_suppress_tokens and timestamp rules and feeds the SpecASR proposer only in the V1 model runner "
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
    """Wrap the two methods of vLLM's V1 model runner class (subclasses inherit the wrappers)."""
    if runner_cls.__dict__.get(_PATCHED, False):
        return
    runner_cls._sample = _wrap_sample(runner_cls._sample)
    runner_cls.propose_draft_token_ids = _wrap_propose(runner_cls.propose_draft_token_ids)
    setattr(runner_cls, _PATCHED, True)


def _wrap_sample(sample: Callable) -> Callable:
    """Apply Whisper's rules before vLLM samples or verifies (greedy picks from the masked logits)."""

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata):
        rules = _rules(self)
        if rules is not None and logits is not None:
            suppression, timestamps, tokenizer = rules
            requests = [self.requests[rid] for rid in self.input_batch.req_ids]
            first = first_positions(requests, spec_decode_metadata, logits.shape[0], logits.device)
            logits = suppression.mask(logits, first)  # a new tensor: the rules below may write into it
            rows, contexts = timestamp_contexts(requests, tokenizer.asks_for_timestamps, spec_decode_metadata)
            if rows:
                index = torch.tensor(rows, device=logits.device)
                logits.index_copy_(0, index, timestamps.mask(logits[index], contexts))
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
            directory, vocab = Path(config.model), config.get_vocab_size()
            suppress, begin = suppression_lists(directory) if directory.is_dir() else (  # a hub name: its config
                list(config.hf_config.suppress_tokens or []), list(config.hf_config.begin_suppress_tokens or []))
            tokenizer = _tokenizer(config.tokenizer, vocab)
            rules = Suppression(vocab, suppress, begin, runner.device), TimestampRules(tokenizer), tokenizer
            log.info("Whisper rules active: %d tokens suppressed, %d more at the first step, timestamps from id %d",
                     len(suppress), len(begin), tokenizer.timestamp_begin)
        runner._specasr_rules = rules
    return runner._specasr_rules


def _tokenizer(name: str, vocab: int) -> WhisperTokenizer:
    """vLLM's tokenizer (``--tokenizer``, by default the model) as ours: from its directory, or for a hub name
    from the copy vLLM has fetched."""
    if (Path(name) / "tokenizer.json").is_file():
        return WhisperTokenizer.from_dir(Path(name), vocab)
    from transformers import AutoTokenizer

    return WhisperTokenizer(AutoTokenizer.from_pretrained(name).backend_tokenizer, multilingual=vocab >= 51865)


def timestamp_contexts(requests: list[Any], timed: Callable[[list[int]], bool],
                       spec: Any) -> tuple[list[int], list[list[int]]]:
    """The logits rows that decode with timestamps, and for each the tokens generated before it.

    ``requests`` are vLLM's per-request states in batch order (``prompt_token_ids``: the decoder prompt;
    ``output_token_ids``: the tokens sampled so far); ``timed(prompt)`` says whether a request decodes with
    timestamps (``WhisperTokenizer.asks_for_timestamps``). Rows as ``rows_per_request`` lays them out; a
    request's row ``k`` follows its first ``k`` drafts.
    """
    per_request = rows_per_request(requests, spec)
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


def rows_per_request(requests: list[Any], spec: Any) -> list[int]:
    """Logits rows per request, in batch order: one each without drafts; with drafts, request ``i`` owns
    ``num_draft_tokens[i] + 1`` consecutive rows (its draft positions, then the bonus position)."""
    return [1] * len(requests) if spec is None else [n + 1 for n in spec.num_draft_tokens]


def first_positions(requests: list[Any], spec: Any, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which logits rows are a request's first generated token (where ``begin_suppress_tokens`` apply): the
    first row of each request that has generated nothing yet (it has no drafts then; vLLM does not chunk an
    encoder-decoder model's prefill, so that row is sampled)."""
    first, start = [False] * rows, 0
    for state, count in zip(requests, rows_per_request(requests, spec)):
        first[start] = not state.output_token_ids
        start += count
    return torch.tensor(first, device=device)


# ---- scheduling ----------------------------------------------------------------------------------------
class AsyncSchedulingError(UnsupportedVLLMError):
    """vLLM was asked for asynchronous scheduling, under which the plugin cannot apply Whisper's timestamp rules."""


def patch_scheduling(config_cls: type) -> None:
    """Make ``config_cls`` (vLLM's ``VllmConfig``) schedule Whisper synchronously (see the module's docstring)."""
    if config_cls.__dict__.get(_PATCHED_SCHEDULING, False):
        return
    config_cls.__post_init__ = _wrap_post_init(config_cls.__post_init__)
    setattr(config_cls, _PATCHED_SCHEDULING, True)


def _wrap_post_init(post_init: Callable) -> Callable:
    """Before vLLM resolves ``async_scheduling`` (unset: on where it can be), set it off for Whisper."""

    @functools.wraps(post_init)
    def __post_init__(self) -> None:
        scheduler = getattr(self, "scheduler_config", None)
        if scheduler is not None and is_whisper(self.model_config):
            if scheduler.async_scheduling:
                raise AsyncSchedulingError(
                    "vLLM's asynchronous scheduling leaves each request's newest tokens as placeholders when "
                    "specasr-vllm applies Whisper's timestamp rules; drop --async-scheduling (the plugin schedules "
                    "Whisper synchronously), or run vLLM without this plugin")
            scheduler.async_scheduling = False
        post_init(self)

    return __post_init__
