"""SpecASR as a vLLM speculative proposer: ``speculative_config={"method": "custom_class",
"model": "specasr_vllm.vllm_plugin.SpecASRProposer", "num_speculative_tokens": K}``.

vLLM calls ``propose`` once per step with each batch slot's tokens and newly sampled ids. What the
plain hook lacks (request ids, the audio, notice of finished or preempted requests) the general
plugin (``hooks.py``) hands over through ``bind`` just before each call, from the model runner.

Per step: forget requests vLLM finished or preempted (``_gone``); start new ones (the draft encoder runs
on the log-mel features vLLM computed for the target); turn how many of last step's draft tokens were
accepted (the length of each slot's newly sampled ids, minus the bonus token) into the drafter's
feedback; then ask the engine-agnostic ``Drafter`` (``speculation/``: adaptive length, recycling, the token
bridge) for each request's chain. vLLM 0.32 verifies one chain per request, so the tree's second pass
is off and the proposer sends the chain; ``K`` caps its length, the adaptive rule picks it per step.
While more than ``max_batch`` requests decode together the proposer drafts nothing, and a request that
arrives then never drafts (see config; drafting for the last of a batch once it is alone measured slower).
Nor does a seeded sampled request, so that its seed gives the same text every time (see ``_start``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specasr_vllm.config import VLLMPluginConfig, compile_by_default
from specasr_vllm.models.registry import load_model
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.speculation import Drafter, SpecStats
from specasr_vllm.speculation.adaptive import Costs
from specasr_vllm.speculation.requests import audio_frames  # noqa: F401  (re-exported: tests and tools use it)
from specasr_vllm.vllm_plugin.version import check_vllm

log = logging.getLogger(__name__)


class SpecASRProposer:
    def __init__(self, vllm_config: Any):
        check_vllm()
        model_config = vllm_config.model_config
        _raise_if_not_whisper(model_config)
        self.model_dir = Path(model_config.model)
        self.settings = VLLMPluginConfig.load(self.model_dir)
        self.max_draft = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = model_config.max_model_len
        hf = model_config.hf_config
        self.target_tokenizer = WhisperTokenizer.from_dir(self.model_dir, hf.vocab_size)
        device = torch.device(vllm_config.device_config.device)
        draft = load_model(self.settings.draft, device, torch.float32 if device.type == "cpu" else torch.float16)
        _raise_if_mel_mismatch(hf.num_mel_bins, draft.n_mels, self.settings.draft)
        # compiled as in the embedded engine (the draft's encoder, the one-token step): the encoder runs once per
        # request, in the step that emits its first token (eager tiny.en ~52 ms per 10 s of audio, compiled ~32)
        # no CUDA graphs inside vLLM's process: that path has not run on a GPU (the draft steps stay eager there)
        self.drafter = Drafter.build(draft, self.target_tokenizer, self.settings.spec_config(),
                                     compile=compile_by_default(), graphs=False)
        self.runner: Any = None
        self.scheduler_output: Any = None
        self._prompt_len: dict[str, int] = {}
        self._step_done = 0.0
        self._step_started = 0.0
        self._last_ids: set[str] = set()  # the requests of the last call
        self._drafted = False  # whether the last call proposed anything
        self.totals = SpecStats()  # over finished requests
        self.draft_lengths: Counter = Counter()  # tokens proposed per (request, step), zero included
        self.fallbacks: Counter = Counter()  # requests that stopped (or never started) drafting, by reason
        self.steps, self.seconds = 0, 0.0  # propose calls and the time spent in them
        self.drafting_steps, self.drafting_seconds = 0, 0.0  # the calls that proposed at least one token
        log.info("SpecASR proposer: draft %s, method %s, up to %d tokens per step",
                 self.settings.draft, self.settings.method, self.max_draft)

    def load_model(self, target_model: Any) -> None:
        """vLLM hands over the target here, while it loads and compiles its own model before serving; the draft
        (loaded in ``__init__`` from ``specasr.json``) is warmed now too (``Drafter.warm``): else the first request
        that drafts compiled the draft's encoder and traced its step (~25 s on this CPU)."""
        began = time.perf_counter()
        with torch.inference_mode():  # as ``propose`` runs: the compiled encoder is guarded on the mode
            self.drafter.warm()
        log.info("SpecASR proposer: draft warmed in %.1f s", time.perf_counter() - began)

    def bind(self, runner: Any, scheduler_output: Any) -> None:
        """The model runner and this step's scheduler output (called by ``hooks.py`` before ``propose``)."""
        self.runner, self.scheduler_output = runner, scheduler_output

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings: Any = None) -> list[list[int]]:
        """Draft tokens per batch slot (possibly none), after each slot's newest sampled tokens."""
        self._raise_if_unbound()
        started = time.perf_counter()
        sched = self.scheduler_output
        self._forget(self._gone(sched))
        req_ids = list(self.runner.input_batch.req_ids[: len(sampled_token_ids)])
        new = [rid for rid in req_ids if rid not in self._prompt_len]
        self._start(new)
        if len(req_ids) > self.settings.max_batch:  # arrived beside others: plain vLLM even once it is alone
            self.drafter.decline(new, f"arrived while more than max_batch={self.settings.max_batch} requests decoded")
        # what the last step emitted per request; the time since the last proposal went into verifying it, and
        # since the last call began into the whole pass (unless the step also prefilled or dropped requests)
        emitted = {rid: sampled for rid, sampled in zip(req_ids, sampled_token_ids) if sampled}
        whole = started - self._step_started if not new and self._last_ids == set(req_ids) else None
        self._step_started, self._last_ids = started, set(req_ids)
        self.drafter.feedback(emitted, started - self._step_done if self._drafted else None, whole)
        outputs, budgets = {}, {}
        for row, rid in enumerate(req_ids):
            sampled = sampled_token_ids[row]
            if not sampled:  # a partial prefill or a discarded step: nothing new to draft after
                continue
            end = int(num_tokens_no_spec[row])
            if sampled[-1] == self.target_tokenizer.eot or end >= self.max_model_len - 1:
                continue  # finished: vLLM says so next step
            outputs[rid] = token_ids_cpu[row, self._prompt_len[rid] : end].tolist()
            budgets[rid] = min(self.max_draft, self.max_model_len - end - 1)
        trees = {}
        # past max_batch the step is plain vLLM (see config); and none until Costs.FIRST of vLLM's steps without drafts
        # have been timed (the process's first request: the steps after its prefill), what the drafter weighs passes
        # against (taken alone, the first one, 37 ms on this CPU, judged drafting to pay on Shakespeare's sonnets)
        if 0 < len(outputs) <= self.settings.max_batch and self.drafter.costs.ar_samples >= Costs.FIRST:
            trees = self.drafter.propose(outputs, budgets)
        drafts = []
        for rid in req_ids:
            tree = trees.get(rid)
            tokens = list(tree.tokens) if tree is not None else []
            if tree is not None:
                if tree.max_depth() != len(tree):
                    raise RuntimeError("vLLM verifies one chain per request; the drafter proposed a tree")
                self.draft_lengths[len(tokens)] += 1
            drafts.append(tokens)
        self._step_done = time.perf_counter()
        self.steps += 1
        self.seconds += self._step_done - started
        self._drafted = any(len(tree) for tree in trees.values())
        if self._drafted:
            self.drafting_steps += 1
            self.drafting_seconds += self._step_done - started
        return drafts

    # ---- request lifecycle ---------------------------------------------------------------------
    def _start(self, new: list[str]) -> None:
        """Register requests seen for the first time: language, task and timestamps from the decoder
        prompt, and a copy of the target's log-mel features for the draft encoder."""
        tok = self.target_tokenizer
        for rid in new:
            state = self.runner.requests[rid]
            prompt = list(state.prompt_token_ids or [])
            self._prompt_len[rid] = len(prompt)
            language = next((code for code, i in tok.language_ids.items() if i in prompt), "en")
            task = "translate" if tok.translate in prompt else "transcribe"
            self.drafter.start(rid, language, task, timestamps=tok.asks_for_timestamps(prompt),
                               mel=_input_features(state).clone())
            params = getattr(state, "sampling_params", None)
            if params is not None and params.temperature > 0 and params.seed is not None:
                # vLLM's rejection sampler draws per drafted position, so the text a seed gives would depend on
                # how far the adaptive rule drafted each step: a seeded request decodes undrafted, reproducibly
                self.drafter.decline([rid], "a seeded sampled request (reproducible only without drafts)")
            elif params is not None and params.max_tokens == 1:  # language detection: the draft encoder would idle
                self.drafter.decline([rid], "one token to generate: nothing to draft")

    def _gone(self, sched: Any) -> set[str]:
        """Requests to forget: those this step's scheduler output says finished or were preempted, and those the
        runner no longer holds. vLLM names a finished request in the next step's scheduler output, but where no
        request is left that step runs no model and ``propose`` never sees it (a window of our long form, a
        server's request made alone): such requests stayed in the drafter, their draft rows stepped in every
        later draft step (4 rows, 17 requests after 12 long-form windows one at a time)."""
        held = self.runner.requests
        stale = {rid for rid in self._prompt_len if rid not in held}
        return stale | set(sched.finished_req_ids) | set(sched.preempted_req_ids or ())

    def _forget(self, gone: set[str]) -> None:
        known = [rid for rid in gone if rid in self._prompt_len]
        for rid, stats in self.drafter.release(known).items():
            self.totals.merge(stats)
            self.fallbacks[stats.fallback] += stats.fallback is not None
            del self._prompt_len[rid]

    def stats(self) -> dict:
        """Counters over every request seen (finished and live), the draft-length histogram, the
        fallbacks, the proposer's own cost per step, and what the drafter judges by: vLLM's AR step as timed
        (None until timed) and whether drafting paid lately (for tests, benchmarks and logs)."""
        totals, fallbacks = SpecStats(), Counter(self.fallbacks)
        totals.merge(self.totals)
        for rid in self._prompt_len:
            live = self.drafter.stats(rid)
            totals.merge(live)
            fallbacks[live.fallback] += live.fallback is not None
        merged = {k: v for k, v in totals.to_dict().items() if k != "fallback"}  # see "fallbacks"
        return {**merged, "draft_lengths": dict(sorted(self.draft_lengths.items())),
                "fallbacks": {k: v for k, v in fallbacks.items() if v}, "steps": self.steps,
                "ms_per_step": 1000 * self.seconds / self.steps if self.steps else None,
                "drafting_steps": self.drafting_steps,
                "ms_per_drafting_step": 1000 * self.drafting_seconds / self.drafting_steps if self.drafting_steps else None,
                "ms_per_ar_step": None if self.drafter.costs.ar_step is None else 1000 * self.drafter.costs.ar_step,
                "drafting_paid_lately": self.drafter.paid_lately()}

    # ---- guards ----------------------------------------------------------------------------------
    def _raise_if_unbound(self) -> None:
        if self.runner is None:
            raise RuntimeError(
                "SpecASRProposer needs the specasr_vllm general plugin (entry point 'vllm.general_plugins'), "
                "which hands it request ids and audio; is specasr-vllm installed in this environment, and "
                "VLLM_PLUGINS (if set) listing 'specasr'?")


def _input_features(state: Any) -> torch.Tensor:
    """The (n_mels, frames) log-mel features vLLM's Whisper processor made for the request's audio."""
    for feature in state.mm_features:
        if feature.data is not None and "input_features" in feature.data:
            return feature.data["input_features"].data.squeeze(0)
    raise RuntimeError(f"request {state.req_id} has no audio features (is the target a Whisper model?)")


def _raise_if_not_whisper(model_config: Any) -> None:
    kind = getattr(model_config.hf_config, "model_type", None)
    if kind != "whisper":
        raise ValueError(f"SpecASRProposer drafts for Whisper targets; this target is a {kind!r} model")


def _raise_if_mel_mismatch(target_mels: int, draft_mels: int, draft: str) -> None:
    if target_mels != draft_mels:
        raise ValueError(
            f"draft {draft!r} reads {draft_mels} mel bins but the target's features have {target_mels}; inside vLLM the "
            "draft shares the target's features, so pick a draft with the same front end")
